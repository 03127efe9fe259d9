"""Full lm_head parameters around a fused call, whatever framework shards them.

The fused ops read ``lm_head.weight`` directly instead of calling the ``lm_head`` module, so a
framework that gathers parameters in the module's forward hook never gathers it for them (the
failure of Liger's and CCE's losses under FSDP2 and ZeRO-3). ``gathered`` is the one place that
turns whatever the framework left in the parameter into the full tensor the kernels need, for the
duration of a ``with`` block, in the spirit of DeepSpeed's ``GatheredParameters``:

* a DTensor (FSDP2 ``fully_shard`` outside the owning module's forward, or tensor parallelism on a
  1-D mesh): all-gathered on entry; the gradient that flows into the full tensor is averaged over
  the mesh and reduce-scattered into ``param.grad`` with the parameter's placements
  (spin_kernels.ops.sharded, the same path the ops take when handed a DTensor directly); ops
  called inside the block do not keep the full copy between forward and backward;
* a plain tensor: used as it is. This covers unsharded training, DDP, and FSDP2 while the owning
  module is unsharded (inside its forward, or the root after its forward: FSDP2 keeps the root
  unsharded until backward and reduce-scatters the gradient itself);
* a DeepSpeed ZeRO-3 parameter (``ds_id``): refused with the recipe to use instead (not tested
  here: DeepSpeed does not run on this project's CPU CI).

Every rank must enter the block (the gather is a collective), and run the backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from ..models import lm_head_kwargs
from ..ops.sharded import gather_full, is_dtensor, regather_in_backward


def _check_param(name: str, t: Tensor | None) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if hasattr(t, "ds_id"):
        raise TypeError(f"{name} is a DeepSpeed ZeRO-3 parameter; gather it with deepspeed.zero.GatheredParameters "
                        "inside the model's forward (as TRL's maybe_gather_lm_head_ctx does): spin_kernels.distributed."
                        "gathered handles DTensors (FSDP2, tensor parallelism) and plain tensors")


@contextmanager
def gathered(*params: Tensor | None) -> Iterator[tuple[Tensor | None, ...]]:
    """Full versions of possibly sharded parameters, for the duration of the block.

    Args:
        *params: tensors or None (e.g. ``lm_head.weight, lm_head.bias``). DTensors must live on one
            1-D mesh with Shard or Replicate placements.

    Yields:
        A tuple, one entry per argument: the full plain tensor (differentiable: gradients reach the
        original parameter), the argument itself if it was not a DTensor, or None.

    Example::

        with gathered(model.lm_head.weight) as (weight,):
            loss, metrics = linear_spin_loss(hidden, weight, targets, cu_seqlens, ref_logps)
        loss.backward()       # weight.grad of the sharded parameter: a DTensor, reduce-scattered
    """
    mesh = None
    for i, p in enumerate(params):
        _check_param(f"params[{i}]", p)
    fulls = []
    for i, p in enumerate(params):
        fulls.append(gather_full(p, f"params[{i}]", mesh))
        if is_dtensor(p) and mesh is None:
            mesh = p.device_mesh
    with regather_in_backward(list(zip(fulls, params))):
        yield tuple(fulls)


@contextmanager
def unsharded_lm_head(model: nn.Module) -> Iterator[dict]:
    """``spin_kernels.models.lm_head_kwargs(model)`` with the weight and bias gathered (see ``gathered``).

    Args:
        model: a Hugging Face causal LM, PEFT-wrapped or not, possibly inside DDP (unwrapped here).

    Yields:
        ``{"weight": [V, H], "bias": [V] or None, "softcap": ..., "temperature": ...}``, ready to
        splat into ``linear_spin_loss`` / ``linear_logprobs``.
    """
    head = lm_head_kwargs(model)
    with gathered(head["weight"], head["bias"]) as (weight, bias):
        yield {**head, "weight": weight, "bias": bias}
