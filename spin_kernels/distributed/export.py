"""A model as one Hugging Face directory (safetensors + config + tokenizer), sharded or not.

This is a conversion for other tools (``from_pretrained``, vLLM, the next SPIN iteration), not a
resumable checkpoint: step checkpoints are torch.distributed.checkpoint directories written by
``spin_kernels.training.checkpoint.Checkpointer``.

``save_model_dir`` writes a directory under a temporary name and renames it into place, so a
killed process leaves the previous directory or the new one, never a half-written one.
``full_state_dict`` gathers an FSDP model's weights on rank 0; ``export_hf`` does both.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from .env import barrier, rank
from .fsdp import inner_model
from .init import tied_aliases

INFO_FILE = "spin_info.json"


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (best effort: not every file system allows it)."""
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
                   state_dict: dict[str, torch.Tensor] | None = None, max_shard_size: str = "5GB",
                   also: Callable[[str], None] | None = None) -> str:
    """Atomically write ``path``: weights (safetensors), config, tokenizer and ``spin_info.json``
    (``extra``). Replaces an existing ``path``.

    ``state_dict``: the weights to save instead of ``model``'s own (an FSDP model's full state
    dict, gathered on rank 0 by ``full_state_dict``). ``also(tmp)`` writes more files into the
    directory before it is renamed into place (a LoRA adapter)."""
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
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict, max_shard_size=max_shard_size)
    finally:
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if extra is not None:
        with open(os.path.join(tmp, INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(extra, f, indent=1)
    if also is not None:
        also(tmp)
    fsync_dir(tmp)
    if os.path.exists(path):
        old = os.path.join(parent, f".old-{os.path.basename(path)}")
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    fsync_dir(parent)
    return path


def read_info(path: str) -> dict[str, Any]:
    """The ``spin_info.json`` of a model directory written by ``save_model_dir`` ({} if none)."""
    try:
        with open(os.path.join(path, INFO_FILE), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on rank 0's CPU (empty on other ranks); a collective.

    A tied weight appears once, under its first name (the embeddings, not lm_head), as in a
    Hugging Face checkpoint; ``load_full_weights`` fills the aliases back in.
    """
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(inner_model(model), options=opts)
    for names in tied_aliases(inner_model(model)):
        for alias in names[1:]:
            sd.pop(alias, None)
    return sd


def export_hf(path: str, model: nn.Module, *, tokenizer: Any = None, dtype: torch.dtype | None = None,
              max_shard_size: str = "5GB") -> None:
    """Save one Hugging Face directory (``save_model_dir``) from a sharded model; a collective.

    Rank 0 gathers the full state dict in host memory (the whole model must fit there, e.g.
    140 GB for 70B in bf16) and writes it.

    Args:
        dtype: cast floating tensors to this dtype before saving (e.g. torch.bfloat16).
    """
    sd = full_state_dict(model)
    if rank() == 0:
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        save_model_dir(inner_model(model), tokenizer, path, state_dict=sd, max_shard_size=max_shard_size)
    barrier()
