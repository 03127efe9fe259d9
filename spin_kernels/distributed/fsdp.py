"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for SPIN models.

Layout: every decoder layer is its own FSDP unit; the root unit is a ``ModelRunner`` wrapper
that owns everything else (embeddings, final norm, lm_head). The wrapper's ``forward`` runs an
arbitrary function of the wrapped model, so the fused SPIN loss, reference log-probs and
``generate`` all run *inside* the root's forward: FSDP's root pre-forward hook has all-gathered
the lm_head weight before the loss reads it, and the root's post-backward reduce-scatters its
gradient. Reading ``model.lm_head.weight`` outside that window gives a sharded DTensor (the
failure mode of Liger's DPO loss under ZeRO-3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class ModelRunner(nn.Module):
    """Runs functions of a model: ``self(fn, *args, **kwargs)`` returns ``fn(self.model, *args, **kwargs)``.

    In one process it is a plain pass-through (``spin_kernels.training.parallel.as_runner``).
    ``apply_fsdp2`` makes it the FSDP root unit, which owns the embeddings and the lm_head: then
    everything that touches them (the fused loss reads the lm_head weight) must go through
    ``__call__`` so that they are unsharded while it runs. One code path serves both.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)

    @property
    def config(self):
        return getattr(self.model, "config", None)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` under FSDP.

        ``synced_gpus`` keeps every rank stepping until all ranks are done: each decode step
        all-gathers every layer, so a rank that stopped early would leave the others waiting
        forever in a collective.
        """
        kwargs.setdefault("synced_gpus", torch.distributed.is_initialized()
                          and torch.distributed.get_world_size() > 1)
        return self.no_grad(lambda m, *a, **k: m.generate(*a, **k), *args, **kwargs)

    def no_grad(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``self(fn, ...)`` without autograd (generation, reference log-probs).

        The root keeps its parameters unsharded after forward because training needs them
        again in backward; with no backward coming they are resharded here to free the memory.
        """
        with torch.no_grad():
            out = self(fn, *args, **kwargs)
        if hasattr(self, "reshard"):  # only once fully_shard made this an FSDPModule
            self.reshard()
        return out


def inner_model(model: nn.Module) -> nn.Module:
    """The model a ``ModelRunner`` wraps (parameter names as in its Hugging Face checkpoint), or
    ``model`` itself."""
    return model.model if isinstance(model, ModelRunner) else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a Hugging Face model (PEFT-wrapped or not).

    Uses the model's ``_no_split_modules`` (the block class names HF itself refuses to split
    across devices); falls back to the first ``nn.ModuleList`` named ``layers`` or ``h``.
    """
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names] if names else []
    if not layers:
        for name, m in model.named_modules():
            if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h") and len(m):
                layers = list(m)
                break
    if not layers:
        raise ValueError(f"could not find the decoder layers of {type(model).__name__}: it has no "
                         "_no_split_modules and no ModuleList named 'layers' or 'h'")
    return layers


def _wrap_with_checkpointing(model: nn.Module, layers: list[nn.Module]) -> list[nn.Module]:
    """Replace each layer, in its parent, by a non-reentrant ``checkpoint_wrapper`` of it.

    Applied before ``fully_shard`` so that the checkpointed region and the FSDP unit coincide:
    the recomputation in backward runs right after FSDP's pre-backward all-gather of the same
    layer (the torchtitan recipe). Unlike ``model.gradient_checkpointing_enable()`` it depends
    on no transformers internals; DCP's state-dict helpers strip the wrapper's name prefix, so
    checkpoints and exports keep the Hugging Face parameter names.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    targets = {id(layer) for layer in layers}
    wrapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in targets:
                w = checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
                setattr(parent, name, w)
                wrapped.append(w)
    return wrapped


@dataclass(frozen=True)
class FSDPOptions:
    """How ``apply_fsdp2`` shards (see its docstring)."""

    mixed_precision: str | None = "bf16"
    reduce_fp32: bool = True
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True


def _policies(opts: FSDPOptions) -> tuple[MixedPrecisionPolicy, MixedPrecisionPolicy, OffloadPolicy]:
    if opts.mixed_precision is None:
        param_dtype = None
    elif opts.mixed_precision in _DTYPES:
        param_dtype = _DTYPES[opts.mixed_precision]
    else:
        raise ValueError(f"mixed_precision must be 'bf16', 'fp16' or None, got {opts.mixed_precision!r}")
    reduce_dtype = torch.float32 if (opts.reduce_fp32 and param_dtype is not None) else None
    layer_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # The root's inputs include PackedBatch.ref_logps (sums of hundreds of log-probs): casting
    # them to bf16 would round them by whole nats and ruin the SPIN margin, so the root never
    # casts its inputs (the layers get bf16 hidden states from the bf16 embedding anyway).
    root_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    # pin_memory needs an accelerator; on a CPU-only build there is nothing to pin for.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if opts.cpu_offload else OffloadPolicy()
    return layer_mp, root_mp, offload


def apply_fsdp2(
    model: nn.Module,
    *,
    mesh: DeviceMesh | None = None,
    mixed_precision: str | None = "bf16",
    reduce_fp32: bool = True,
    cpu_offload: bool = False,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
) -> ModelRunner:
    """Shard ``model`` with FSDP2: ``fully_shard`` per decoder layer, then the root wrapper.

    Args:
        model: a Hugging Face causal LM (optionally PEFT-wrapped), already on its device (or on
            CPU with ``cpu_offload``). Its parameters become DTensors sharded over ``mesh``.
        mesh: a 1-D device mesh; default all ranks of the default process group on this
            process's device type.
        mixed_precision: "bf16" (default) / "fp16": parameters are all-gathered and computed in
            that dtype while the sharded fp32 parameters stay the optimizer's master weights;
            None computes in the parameters' own dtype.
        reduce_fp32: reduce-scatter gradients in fp32 (recommended with mixed precision).
        cpu_offload: keep sharded parameters, gradients and optimizer states in host memory
            (CPUOffloadPolicy); the optimizer step then runs on the CPU.
        activation_checkpointing: recompute each decoder layer in backward (see
            ``_wrap_with_checkpointing`` for why torch's checkpoint_wrapper is used).
        reshard_after_forward: free each layer's unsharded parameters after its forward
            (ZeRO-3); False keeps them until backward (ZeRO-2-like, more memory, less traffic).

    Returns:
        The ``ModelRunner`` root. Call it (``sharded(fn, ...)``) for anything that reads the
        embeddings or lm_head; ``sharded.model`` is the original module object.
    """
    opts = FSDPOptions(mixed_precision, reduce_fp32, cpu_offload, activation_checkpointing, reshard_after_forward)
    if mesh is None:
        if not torch.distributed.is_initialized():
            raise RuntimeError("apply_fsdp2 needs an initialised process group (launch with torchrun and call "
                               "spin_kernels.distributed.init_distributed()), or pass a mesh")
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    layer_mp, root_mp, offload = _policies(opts)
    layers = decoder_layers(model)
    if activation_checkpointing:
        layers = _wrap_with_checkpointing(model, layers)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=layer_mp, offload_policy=offload,
                    reshard_after_forward=reshard_after_forward)
    root = ModelRunner(model)
    # The root's parameters (embeddings, lm_head) are needed again right at the start of
    # backward, so resharding them after forward would only add an all-gather.
    fully_shard(root, mesh=mesh, mp_policy=root_mp, offload_policy=offload, reshard_after_forward=False)
    return root
