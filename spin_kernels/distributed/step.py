"""One optimizer step of distributed SPIN: packed micro-batches, accumulation, clipping.

The loss of a step is the mean over ALL pairs of the global batch (every rank's micro-batches),
exactly as one process would compute it on the whole batch: micro-batch m (a mean over its P_m
pairs) is weighted by P_m / P_global. FSDP averages gradients over ranks in its
reduce-scatter, so each rank multiplies its weights by the world size to turn that average
back into the sum the global mean needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .env import all_reduce_sum, world_size
from .fsdp import inner_model

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass
class StepResult:
    """What one step did, identical on every rank: global mean ``loss``, pair-weighted mean
    ``metrics``, ``grad_norm`` before clipping, and the global number of pairs."""

    loss: float
    grad_norm: float
    num_pairs: int
    metrics: dict[str, float] = field(default_factory=dict)


class NonFiniteError(FloatingPointError):
    """A training step produced NaN/inf; raised before the step is applied (loss, gradient norm)
    or right after it (parameters), identically on every rank.

    Attributes:
        quantity: "loss", "gradient norm" or "parameters".
        examples: ids of the examples involved (``example_ids`` of the micro-batches whose loss was
            non-finite; all of the step's for the gradient norm and the parameters), every rank's.
    """

    def __init__(self, quantity: str, examples: list[int], detail: str = ""):
        self.quantity, self.examples, self.detail = quantity, sorted(set(examples)), detail
        super().__init__(f"non-finite {quantity}{': ' + detail if detail else ''} (examples {self.examples[:20]})")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def nonfinite_names(named: Any) -> list[str]:
    """Names of the tensors of ``named`` ((name, tensor) pairs; DTensors: this rank's shard) that
    hold a NaN or inf. One fused max-abs reduction and one host synchronisation for all of them."""
    named = [(n, _local(t).detach()) for n, t in named if t is not None and t.is_floating_point()]
    named = [(n, t) for n, t in named if t.numel()]
    if not named:
        return []
    # The inf-norm (max |x|) is inf for an inf and NaN for a NaN, and cannot overflow.
    norms = torch._foreach_norm([t for _, t in named], float("inf"))
    finite = torch.isfinite(torch.stack([v.float().to(norms[0].device) for v in norms])).tolist()
    return [n for (n, _), ok in zip(named, finite) if not ok]


def _any_rank(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([float(flag)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _gather_ids(ids: list[int]) -> list[int]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(ids)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(ids))
    return [i for part in parts for i in part]


def default_loss_fn(**loss_kwargs: Any) -> LossFn:
    """``packed_spin_loss(model, batch, **loss_kwargs)`` from spin_kernels.models."""
    from ..models import packed_spin_loss

    def fn(model: nn.Module, batch: Any):
        return packed_spin_loss(model, batch, **loss_kwargs)

    return fn


def global_grad_norm(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients (over all ranks' shards), a plain scalar tensor.

    With FSDP2 the gradients are DTensors: their norm is a partial DTensor whose
    ``full_tensor()`` all-reduces the squared sums, so every rank gets the same global norm.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return total.full_tensor() if isinstance(total, DTensor) else total


def grad_norm_and_clip_(params: Sequence[nn.Parameter], max_norm: float | None) -> float:
    """Global L2 norm of the gradients (``global_grad_norm``); clip in place to ``max_norm``."""
    total = global_grad_norm(params)
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
    example_ids: Callable[[Any], list[int]] = lambda b: b.example_index.tolist(),
) -> StepResult:
    """Forward/backward this rank's micro-batches, clip, and take one optimizer step.

    Args:
        model: a ``ModelRunner`` (the FSDP root from ``apply_fsdp2``, or the one-process
            wrapper), or any module whose ``__call__(fn, batch)`` runs ``fn(inner_model, batch)``.
        optimizer: built over ``model.parameters()`` (after sharding).
        micro_batches: this rank's micro-batches (e.g. PackedBatch, already on the device);
            every rank must pass the same number (FSDP collectives).
        loss_fn: ``(inner_model, batch) -> (loss mean over the batch's pairs, metrics)``.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        scheduler: stepped after the optimizer if given.
        num_pairs: pairs in a micro-batch (the weight of its mean loss).
        keep_grads: leave the (clipped) gradients on the parameters after the step; by default
            they are freed (set to None) so that generation between steps has that memory.
        example_ids: the example ids of a micro-batch (named when the step is non-finite).

    Returns:
        StepResult, identical on all ranks.

    Raises:
        NonFiniteError: on every rank alike, when the global loss or gradient norm is NaN/inf
            (before clipping and the optimizer step: nothing is applied) or when the update
            made a parameter NaN/inf (the model must then not be saved or used).
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    device = next(iter(model.parameters())).device
    _check_same_count(len(micro_batches), device)
    local_pairs = [num_pairs(b) for b in micro_batches]
    (global_pairs,) = all_reduce_sum([float(sum(local_pairs))], device)

    optimizer.zero_grad(set_to_none=True)
    means, local_bad, any_bad = _forward_backward(model, loss_fn, micro_batches, local_pairs, global_pairs, device)
    params = [p for p in model.parameters() if p.requires_grad]
    total_norm = global_grad_norm(params)
    norm = float(total_norm)
    if any_bad or not math.isfinite(means["loss"]):
        bad = [i for b, flag in zip(micro_batches, local_bad) if flag for i in example_ids(b)]
        raise NonFiniteError("loss", _gather_ids(bad), f"{means['loss']}")
    if not math.isfinite(norm):
        raise NonFiniteError("gradient norm", _step_ids(micro_batches, example_ids),
                             f"{norm} (the loss was finite: {means['loss']:.6g})")
    if max_grad_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, total_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if not keep_grads:
        optimizer.zero_grad(set_to_none=True)
    broken = nonfinite_names(inner_model(model).named_parameters())
    if _any_rank(bool(broken), device):
        raise NonFiniteError("parameters", _step_ids(micro_batches, example_ids),
                             f"after the optimizer step, e.g. {broken[:3]}")
    loss_mean = means.pop("loss")
    return StepResult(loss=loss_mean, grad_norm=norm, num_pairs=int(global_pairs), metrics=means)


def _forward_backward(model: nn.Module, loss_fn: LossFn, micro_batches: Sequence[Any], local_pairs: list[int],
                      global_pairs: float, device: torch.device) -> tuple[dict[str, float], list[bool], bool]:
    """Forward/backward of this rank's micro-batches, accumulating the gradients of the global
    pair mean (micro-batch m weighted by P_m * W / P_global: FSDP averages over the W ranks).

    Returns:
        (means, local_bad, any_bad): the loss and metrics averaged over the global batch's pairs,
        which of this rank's micro-batches had a non-finite loss, and whether any rank's had.
    """
    scale = world_size() / global_pairs
    # Sums stay on the device (no host sync per micro-batch); one all-reduce, before the update,
    # so that every rank sees the same global loss and decides alike whether to apply it.
    sums: dict[str, torch.Tensor] = {}
    losses = []
    for batch, pairs in zip(micro_batches, local_pairs):
        loss, metrics = model(loss_fn, batch)
        (loss * (pairs * scale)).backward()
        losses.append(loss.detach().to(device=device, dtype=torch.float64))
        for k, v in {"loss": loss, **metrics}.items():
            v = v.detach().to(device=device, dtype=torch.float64) * pairs
            sums[k] = sums[k] + v if k in sums else v
    keys = sorted(sums)
    local_bad = ~torch.isfinite(torch.stack(losses))
    totals = torch.cat([torch.stack([sums[k] for k in keys]), local_bad.any().to(torch.float64).reshape(1)])
    if dist.is_initialized():
        dist.all_reduce(totals)
    values = totals.tolist()
    return dict(zip(keys, (v / global_pairs for v in values[:-1]))), local_bad.tolist(), values[-1] > 0


def _step_ids(micro_batches: Sequence[Any], example_ids: Callable[[Any], list[int]]) -> list[int]:
    """Every rank's example ids of this step (named when the gradient or the update is non-finite)."""
    return _gather_ids([i for b in micro_batches for i in example_ids(b)])
