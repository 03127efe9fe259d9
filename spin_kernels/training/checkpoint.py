"""Checkpoints: a Hugging Face model directory (save_pretrained, safetensors) plus, for resuming
mid-iteration, ``trainer_state.pt`` (optimizer, scheduler, step, RNG states).

Every directory is written under a temporary name and renamed into place, so a killed process
leaves either the previous checkpoint or the new one, never a half-written one; a leftover
temporary directory is simply ignored (and removed by the next save).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import torch

STATE_FILE = "trainer_state.pt"
INFO_FILE = "spin_info.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_model_dir(model, tokenizer, path: str, *, extra: dict[str, Any] | None = None,
                   state: dict[str, Any] | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """Atomically write ``path``: weights (safetensors), config, tokenizer, optional trainer state
    and ``spin_info.json`` (``extra``). Replaces an existing ``path``.

    ``state_dict``: the weights to save instead of ``model``'s own (an FSDP model's full state
    dict, gathered on rank 0 by ``spin_kernels.distributed.full_state_dict``)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(path)}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache is False:
        # prepare_model turns the cache off for packed training; the saved model is for ordinary
        # use (generate with a KV cache), and prepare_model turns it off again when reloaded.
        config.use_cache = True
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    finally:
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if extra is not None:
        with open(os.path.join(tmp, INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(extra, f, indent=1)
    if state is not None:
        torch.save(state, os.path.join(tmp, STATE_FILE))
    _fsync_dir(tmp)
    if os.path.exists(path):
        old = os.path.join(parent, f".old-{os.path.basename(path)}")
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    _fsync_dir(parent)
    return path


def read_info(path: str) -> dict[str, Any]:
    """The ``spin_info.json`` of a model directory written by ``save_model_dir`` ({} if none)."""
    try:
        with open(os.path.join(path, INFO_FILE), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def latest_step_checkpoint(ckpt_root: str) -> tuple[int, str] | None:
    """The highest ``step-N`` directory holding a trainer state, or None."""
    if not os.path.isdir(ckpt_root):
        return None
    best = None
    for name in os.listdir(ckpt_root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(ckpt_root, name, STATE_FILE)):
            step = int(m.group(1))
            if best is None or step > best[0]:
                best = (step, os.path.join(ckpt_root, name))
    return best


def prune_step_checkpoints(ckpt_root: str, keep: int | None = None) -> None:
    """Remove step checkpoints (all, or all but step ``keep``) and stale temporary directories."""
    if not os.path.isdir(ckpt_root):
        return
    for name in os.listdir(ckpt_root):
        m = _STEP_DIR.match(name)
        if (m and int(m.group(1)) != keep) or name.startswith((".tmp-", ".old-")):
            shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)


def load_weights_into(model, path: str) -> None:
    """Copy the safetensors weights of the model directory ``path`` into ``model`` (strict)."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    # Tied weights are stored once; fill the aliases so the strict load sees every key.
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if getattr(model.config, "tie_word_embeddings", False):
        for k in list(missing):
            if k.endswith("lm_head.weight"):
                missing.remove(k)
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
