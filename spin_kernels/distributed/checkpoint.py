"""Sharded checkpoints (torch.distributed.checkpoint) with resume, and Hugging Face export.

A checkpoint directory holds DCP's shard files (model + optimizer, each rank writing only its
own shards, loadable on a different number of ranks) and ``trainer_state.json`` (step and any
JSON-able extras, written by rank 0). Parameter names are the Hugging Face ones: DCP's
state-dict helpers drop the FSDP and checkpoint-wrapper prefixes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from .env import barrier, rank
from .fsdp import ShardedModel
from .init import tied_aliases

TRAINER_STATE = "trainer_state.json"


def _inner(model: nn.Module) -> nn.Module:
    """The wrapped HF model of a ShardedModel (so the names carry no ``model.`` prefix)."""
    return model.model if isinstance(model, ShardedModel) else model


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, *, step: int,
                    extra: dict[str, Any] | None = None) -> None:
    """Write a sharded checkpoint of model + optimizer + step; a collective (call on every rank)."""
    model_sd, optim_sd = get_state_dict(_inner(model), optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    if rank() == 0:
        tmp = os.path.join(path, TRAINER_STATE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"step": int(step), "extra": extra or {}}, f)
        os.replace(tmp, os.path.join(path, TRAINER_STATE))  # the state file marks a complete save
    barrier()


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` into an already sharded model/optimizer.

    Returns:
        {"step": int, "extra": dict} from trainer_state.json.

    Raises:
        FileNotFoundError: no complete checkpoint at ``path``.
    """
    state_file = os.path.join(path, TRAINER_STATE)
    if not os.path.exists(state_file):
        raise FileNotFoundError(f"no complete checkpoint at {path!r} ({TRAINER_STATE} missing)")
    inner = _inner(model)
    optimizers = [] if optimizer is None else [optimizer]
    model_sd, optim_sd = get_state_dict(inner, optimizers)
    state = {"model": model_sd} if optimizer is None else {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(inner, optimizers, model_state_dict=state["model"], optim_state_dict=state.get("optim", {}))
    with open(state_file) as f:
        return json.load(f)


def latest_checkpoint(root: str, prefix: str = "step-") -> str | None:
    """The complete checkpoint ``root/<prefix><N>`` with the largest N, or None."""
    if not os.path.isdir(root):
        return None
    found = []
    for name in os.listdir(root):
        if name.startswith(prefix) and name[len(prefix):].isdigit() and \
                os.path.exists(os.path.join(root, name, TRAINER_STATE)):
            found.append((int(name[len(prefix):]), name))
    return os.path.join(root, max(found)[1]) if found else None


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on rank 0's CPU (empty on other ranks); a collective.

    A tied weight appears once, under its first name (the embeddings, not lm_head), as in a
    Hugging Face checkpoint; ``load_full_weights`` fills the aliases back in.
    """
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(_inner(model), options=opts)
    for names in tied_aliases(_inner(model)):
        for alias in names[1:]:
            sd.pop(alias, None)
    return sd


def export_hf(path: str, model: nn.Module, *, tokenizer: Any = None, dtype: torch.dtype | None = None,
              max_shard_size: str = "5GB") -> None:
    """Save one Hugging Face checkpoint (safetensors) from a sharded model; a collective.

    Rank 0 gathers the full state dict in host memory (the whole model must fit there, e.g.
    140 GB for 70B in bf16) and calls ``save_pretrained`` with it.

    Args:
        dtype: cast floating tensors to this dtype before saving (e.g. torch.bfloat16).
    """
    sd = full_state_dict(model)
    if rank() == 0:
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        _inner(model).save_pretrained(path, state_dict=sd, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    barrier()
