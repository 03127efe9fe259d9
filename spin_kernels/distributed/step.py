"""One optimizer step of distributed SPIN: packed micro-batches, accumulation, clipping.

The loss of a step is the mean over ALL pairs of the global batch (every rank's micro-batches),
exactly as one process would compute it on the whole batch: micro-batch m (a mean over its P_m
pairs) is weighted by P_m / P_global. FSDP averages gradients over ranks in its
reduce-scatter, so each rank multiplies its weights by the world size to turn that average
back into the sum the global mean needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .env import all_reduce_sum, world_size

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass
class StepResult:
    """What one step did, identical on every rank: global mean ``loss``, pair-weighted mean
    ``metrics``, ``grad_norm`` before clipping, and the global number of pairs."""

    loss: float
    grad_norm: float
    num_pairs: int
    metrics: dict[str, float] = field(default_factory=dict)


def default_loss_fn(**loss_kwargs: Any) -> LossFn:
    """``packed_spin_loss(model, batch, **loss_kwargs)`` from spin_kernels.models."""
    from ..models import packed_spin_loss

    def fn(model: nn.Module, batch: Any):
        return packed_spin_loss(model, batch, **loss_kwargs)

    return fn


def grad_norm_and_clip_(params: Sequence[nn.Parameter], max_norm: float | None) -> float:
    """Global L2 norm of the gradients (over all ranks' shards); clip in place to ``max_norm``.

    With FSDP2 the gradients are DTensors: their norm is a partial DTensor whose
    ``full_tensor()`` all-reduces the squared sums, so every rank clips by the same global norm.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def _check_same_count(n: int, device: torch.device) -> None:
    """Every rank must run the same number of forwards: each one all-gathers every layer."""
    if not dist.is_initialized():
        return
    t = torch.tensor([n, -n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if t[0].item() != -t[1].item():
        raise ValueError(f"ranks have different numbers of micro-batches (this rank {n}, min {-int(t[1])}, "
                         f"max {int(t[0])}); plan them with plan_micro_batches(..., num_ranks=world_size)")


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Any],
    *,
    loss_fn: LossFn,
    max_grad_norm: float | None = None,
    scheduler: Any = None,
    num_pairs: Callable[[Any], int] = lambda b: b.num_pairs,
    keep_grads: bool = False,
) -> StepResult:
    """Forward/backward this rank's micro-batches, clip, and take one optimizer step.

    Args:
        model: the ``ShardedModel`` root from ``apply_fsdp2`` (or any module whose
            ``__call__(fn, batch)`` runs ``fn(inner_model, batch)``; see ShardedModel).
        optimizer: built over ``model.parameters()`` (after sharding).
        micro_batches: this rank's micro-batches (e.g. PackedBatch, already on the device);
            every rank must pass the same number (FSDP collectives).
        loss_fn: ``(inner_model, batch) -> (loss mean over the batch's pairs, metrics)``.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        scheduler: stepped after the optimizer if given.
        num_pairs: pairs in a micro-batch (the weight of its mean loss).
        keep_grads: leave the (clipped) gradients on the parameters after the step; by default
            they are freed (set to None) so that generation between steps has that memory.

    Returns:
        StepResult, identical on all ranks.
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    device = next(iter(model.parameters())).device
    _check_same_count(len(micro_batches), device)
    local_pairs = [num_pairs(b) for b in micro_batches]
    (global_pairs,) = all_reduce_sum([float(sum(local_pairs))], device)
    scale = world_size() / global_pairs

    optimizer.zero_grad(set_to_none=True)
    # Sums stay on the device (no host sync per micro-batch); one all-reduce at the end.
    sums: dict[str, torch.Tensor] = {}
    for batch, pairs in zip(micro_batches, local_pairs):
        loss, metrics = model(loss_fn, batch)
        (loss * (pairs * scale)).backward()
        for k, v in {"loss": loss, **metrics}.items():
            v = v.detach().to(device=device, dtype=torch.float64) * pairs
            sums[k] = sums[k] + v if k in sums else v
    norm = grad_norm_and_clip_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if not keep_grads:
        optimizer.zero_grad(set_to_none=True)

    keys = sorted(sums)
    totals = torch.stack([sums[k] for k in keys])
    if dist.is_initialized():
        dist.all_reduce(totals)
    means = dict(zip(keys, (totals / global_pairs).tolist()))
    loss_mean = means.pop("loss")
    return StepResult(loss=loss_mean, grad_norm=norm, num_pairs=int(global_pairs), metrics=means)
