"""Checkpoints of a training run: the ``Checkpointer`` (step checkpoints, resume, the final
model) and the Hugging Face model directories it writes (save_pretrained, safetensors, plus
``trainer_state.pt`` with optimizer, scheduler, step and RNG states for resuming mid-iteration).
Sharded (FSDP) checkpoints go through spin_kernels.distributed.checkpoint
(torch.distributed.checkpoint).

Every directory is written under a temporary name and renamed into place, so a killed process
leaves either the previous checkpoint or the new one, never a half-written one; a leftover
temporary directory is simply ignored (and removed by the next save).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from typing import Any

import torch

from .config import ConfigError

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
                   state: dict[str, Any] | None = None, state_dict: dict[str, torch.Tensor] | None = None,
                   also: Callable[[str], None] | None = None) -> str:
    """Atomically write ``path``: weights (safetensors), config, tokenizer, optional trainer state
    and ``spin_info.json`` (``extra``). Replaces an existing ``path``.

    ``state_dict``: the weights to save instead of ``model``'s own (an FSDP model's full state
    dict, gathered on rank 0 by ``spin_kernels.distributed.full_state_dict``). ``also(tmp)``
    writes more files into the directory before it is renamed into place (a LoRA adapter)."""
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
    if also is not None:
        also(tmp)
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
    """Copy the safetensors weights of the model directory ``path`` into ``model`` (strict). For a
    LoRA (peft) model the directory holds the adapter only (what ``save_pretrained`` of a peft
    model writes): every adapter weight must be there."""
    from safetensors.torch import load_file

    from .lora import is_lora

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    if is_lora(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"adapter checkpoint {path} does not match the model: missing {missing[:5]}, "
                               f"unexpected {result.unexpected_keys[:5]}")
        return
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


class Checkpointer:
    """The checkpoints of one training run in ``out_dir``: resumable step checkpoints
    (``checkpoints/step-N``) and the final model (``model/``).

    It owns the one choice between the two kinds of step checkpoint: unsharded (a Hugging Face
    directory + ``trainer_state.pt`` with optimizer, scheduler, step and RNG states) for one
    process, sharded (torch.distributed.checkpoint of model and optimizer, loadable on another
    number of ranks, + scheduler in ``trainer_state.json``) under FSDP. Every checkpoint and the
    final model record the run's training ``key`` (spin_kernels.training.provenance): a
    checkpoint written from other inputs is never resumed.

        ckpt = Checkpointer(runner, optimizer, scheduler, tokenizer, out_dir, key=key, num_steps=n, save_every=50)
        start = ckpt.load()                 # 0, or the step of the latest checkpoint of this run
        for step in range(start, n): ...; ckpt.save(step + 1)
        model_dir = ckpt.export(info)       # the final HF model (rank 0 writes it)
    """

    def __init__(self, runner, optimizer, scheduler, tokenizer, out_dir: str, *, key: str, num_steps: int,
                 save_every: int, on_stale: str = "regenerate"):
        from .parallel import is_sharded

        self.runner, self.optimizer, self.scheduler, self.tokenizer = runner, optimizer, scheduler, tokenizer
        self.root = os.path.join(out_dir, "checkpoints")
        self.model_dir = os.path.join(out_dir, "model")
        self.key, self.num_steps, self.save_every, self.on_stale = key, num_steps, save_every, on_stale
        self.sharded = is_sharded(runner)

    @staticmethod
    def finished(out_dir: str, key: str) -> bool:
        """Whether ``out_dir`` holds a final model trained from the inputs of ``key``."""
        return trained_model_key(out_dir) == key

    def latest(self) -> tuple[int, str] | None:
        """The latest step checkpoint of this kind, as (step, path)."""
        from spin_kernels.distributed import latest_checkpoint

        sharded = latest_checkpoint(self.root)
        sharded = None if sharded is None else (int(os.path.basename(sharded)[len("step-"):]), sharded)
        plain = latest_step_checkpoint(self.root)
        found, other = (sharded, plain) if self.sharded else (plain, sharded)
        if found is None and other is not None:
            kinds = ("a single-process", "an FSDP") if self.sharded else ("an FSDP (sharded)", "a single-process")
            raise ConfigError(f"--resume: {other[1]} is {kinds[0]} checkpoint and this is {kinds[1]} run; resume it "
                              f"the way it was started (distributed.fsdp)")
        return found

    def _key_of(self, path: str) -> str | None:
        if self.sharded:
            from spin_kernels.distributed.checkpoint import TRAINER_STATE

            with open(os.path.join(path, TRAINER_STATE)) as f:
                return json.load(f).get("extra", {}).get("training_key")
        return read_info(path).get("training_key")

    def load(self) -> int:
        """Continue the latest checkpoint of this run (weights, optimizer, scheduler, RNG) and
        return its step; 0 when there is none. One written from other inputs is discarded
        (``on_stale="regenerate"``, with a warning) or refused (``"error"``)."""
        from spin_kernels.distributed import load_checkpoint

        from .loading import set_rng_state
        from .parallel import barrier, is_main

        found = self.latest()
        if found is None:
            return 0
        step, path = found
        if self._key_of(path) != self.key:
            message = (f"{path} was trained from other inputs (examples, reference log-probs, training options or "
                       f"starting weights) than this run")
            if self.on_stale == "error":
                raise ConfigError(f"--resume: {message}; remove {self.root} or rerun with --on-stale regenerate")
            if is_main():
                print(f"spin-kernels: warning: {message}; training starts over", file=sys.stderr)
                prune_step_checkpoints(self.root)
            barrier()
            return 0
        if self.sharded:
            state = load_checkpoint(path, self.runner, self.optimizer)["extra"]
        else:
            load_weights_into(self.runner.model, path)
            state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
            self.optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["num_steps"] != self.num_steps:
            raise RuntimeError(f"cannot resume from {path}: it planned {state['num_steps']} steps, this run "
                               f"{self.num_steps} (data or batch settings changed)")
        return step

    def save(self, step: int) -> None:
        """After optimizer step ``step``: a step checkpoint every ``save_every`` steps (not after
        the last one: ``export`` writes the final model), the previous one removed. A collective
        under FSDP."""
        from spin_kernels.distributed import save_checkpoint

        from .loading import rng_state
        from .parallel import is_main

        if not self.save_every or step % self.save_every or step >= self.num_steps:
            return
        path = os.path.join(self.root, f"step-{step}")
        state = {"scheduler": self.scheduler.state_dict(), "num_steps": self.num_steps, "training_key": self.key}
        if self.sharded:
            save_checkpoint(path, self.runner, self.optimizer, step=step, extra=state)
        else:
            state.update(optimizer=self.optimizer.state_dict(), rng=rng_state(), step=step)
            save_model_dir(self.runner.model, self.tokenizer, path, state=state, extra={"training_key": self.key})
        if is_main():
            prune_step_checkpoints(self.root, keep=step)

    def export(self, info: dict[str, Any]) -> str:
        """Write the final model (one Hugging Face checkpoint, gathered on rank 0 under FSDP) with
        ``info`` and the training key in its spin_info.json; remove the step checkpoints. A
        collective; every rank returns after the model exists (the next iteration loads it)."""
        from spin_kernels.distributed import full_state_dict

        from .parallel import barrier, is_main

        from .lora import ADAPTER_DIR, export_target, full_precision_state, is_lora, merged_state_dict

        model = self.runner.model
        full = full_state_dict(self.runner) if self.sharded else None  # a collective: the weights on rank 0
        if is_main():
            info = {**info, "training_key": self.key}
            if is_lora(model):  # the adapter merged into a full checkpoint (the next opponent), and beside it
                full = full if full is not None else full_precision_state(model)
                adapter = model.peft_config["default"]
                merged = merged_state_dict(full, adapter.lora_alpha / adapter.r)
                save_model_dir(export_target(model), self.tokenizer, self.model_dir, state_dict=merged, extra=info,
                               also=lambda tmp: model.save_pretrained(os.path.join(tmp, ADAPTER_DIR), state_dict=full))
            else:
                save_model_dir(model, self.tokenizer, self.model_dir, state_dict=full, extra=info)
            prune_step_checkpoints(self.root)
        barrier()
        return self.model_dir


def trained_model_key(out_dir: str) -> str | None:
    """The training key recorded with the final model of ``out_dir`` (None if there is none)."""
    model_dir = os.path.join(out_dir, "model")
    return read_info(model_dir).get("training_key") if os.path.isdir(model_dir) else None
