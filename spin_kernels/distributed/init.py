"""Building a big model without a full copy per rank: empty parameters, shard, then fill.

A 70B model in fp32 is 282 GB: ``from_pretrained`` on each of 8 ranks would need 2.2 TB of
host memory. Instead every rank builds the model with parameters on the meta device (no
memory; buffers such as rotary frequencies stay real, computed by the constructors),
``apply_fsdp2`` shards the empty parameters, and ``load_full_weights`` allocates only this
rank's shards and fills them from one full state dict read by rank 0 and broadcast.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from .env import rank
from .fsdp import ModelRunner


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device, their buffers unchanged.

    Buffers are kept real on purpose: non-persistent ones (rotary ``inv_freq``) are not in any
    checkpoint, so they must come from the constructor.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def read_safetensors(path: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face checkpoint directory (every ``*.safetensors`` file)."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path!r}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in load_file(f).items():
            out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return out


def tied_aliases(model: nn.Module) -> list[list[str]]:
    """Names sharing one parameter (e.g. tied embeddings and lm_head), as state-dict keys."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name.replace("_checkpoint_wrapped_module.", ""))
    return [names for names in groups.values() if len(names) > 1]


def load_full_weights(model: ModelRunner, weights: str | dict[str, torch.Tensor] | None, *,
                      device: torch.device | str, dtype: torch.dtype = torch.float32) -> None:
    """Allocate the shards of a model built under ``empty_parameters`` and fill them; a collective.

    Args:
        model: the ModelRunner from ``apply_fsdp2`` (parameters still on meta).
        weights: on rank 0, a Hugging Face checkpoint directory or a full state dict (names as
            in ``model.model.state_dict()``); ignored on the other ranks (pass None).
        device: where the shards live (with CPU offload FSDP moves them to the host itself).
        dtype: dtype of stored (master) parameters whose name the model does not hold (each
            tensor is otherwise cast to the dtype of the parameter it fills).
    """
    inner = model.model
    aliases = tied_aliases(inner)
    # to_empty() replaces buffers too: keep the constructors' values and put them back.
    buffers = {n: b.detach().clone() for n, b in inner.named_buffers() if b.device.type != "meta"}
    model.to_empty(device=device)
    with torch.no_grad():
        for n, b in buffers.items():
            inner.get_buffer(n).copy_(b)
    full: dict[str, torch.Tensor] = {}
    if rank() == 0:
        # Each tensor in the dtype of the parameter it fills (a LoRA adapter stays float32 on a
        # bfloat16 base); names the model lacks are left to set_model_state_dict to report.
        own = {k: v.dtype for k, v in inner.state_dict(keep_vars=True).items()}
        full = read_safetensors(weights) if isinstance(weights, str) else dict(weights)
        full = {k: v.to(own.get(k, dtype)) if v.is_floating_point() else v for k, v in full.items()}
        for names in aliases:  # a tied weight is stored once (HF drops lm_head.weight): name every alias
            present = [n for n in names if n in full]
            for n in names:
                if present and n not in full:
                    full[n] = full[present[0]]
    set_model_state_dict(inner, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
