"""Test helpers: the SPIN step on packed micro-batches in one process: forward, fused loss,
backward (no optimizer), and the micro-batches of a global batch.

A global batch of P pairs is split into micro-batches under a token budget. The step's loss
must be the mean over all P pairs, so each micro-batch's loss (a mean over its own p_k pairs)
is weighted by p_k / P before its backward; the summed gradients are then exactly those of
one big batch, and the metrics are pair-weighted the same way.

The trainer itself takes whole optimizer steps with ``spin_kernels.distributed.train_step``
(the same weighting, over every rank's micro-batches, plus clipping and the optimizer);
``spin_step`` is the gradient-only form the tests compare with a padded reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch



def spin_step(
    model,
    micro_batches: Sequence,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    average: bool = False,
    impl: str = "auto",
    bf16: bool = False,
) -> tuple[float, dict[str, float]]:
    """Accumulate the gradients of one global batch into ``model``'s ``.grad``.

    Args:
        micro_batches: ``PackedBatch`` es (on the model's device) with ``ref_logps`` set.
    Returns:
        (loss, metrics) as Python floats: the pair-weighted means over the global batch.
    """
    from spin_kernels.models import packed_spin_loss

    total_pairs = sum(mb.num_pairs for mb in micro_batches)
    if total_pairs == 0:
        raise ValueError("spin_step: the global batch holds no pair")
    device = next(model.parameters()).device
    # Sums stay on the device until the end: one host sync per step, not per micro-batch.
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    metric_sums: dict[str, torch.Tensor] = {}
    for mb in micro_batches:
        if mb.ref_logps is None:
            raise ValueError("spin_step: micro-batch without ref_logps (run the reference pass first)")
        weight = mb.num_pairs / total_pairs
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else nullcontext()
        with ctx:
            loss, metrics = packed_spin_loss(model, mb, beta=beta, loss_type=loss_type, impl=impl, average=average)
        (loss * weight).backward()
        loss_sum = loss_sum + loss.detach().double() * weight
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + v.detach().double() * weight
    return float(loss_sum), {k: float(v) for k, v in metric_sums.items()}


def micro_batches(examples: list, idx: list[int], token_budget: int, device: torch.device) -> list:
    """The packed micro-batches of the global batch ``idx`` in one process (``spin_step``'s input)."""
    from spin_kernels.training.trainer import rank_micro_batches

    return [b for b, pairs in rank_micro_batches(examples, idx, token_budget, device) if pairs]
