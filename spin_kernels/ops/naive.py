"""The naive computation: full [N, V] logits, log_softmax, gather, segment sums.

The oracle of the tests (called on float64 copies) and the "naive full-logits PyTorch"
baseline of the benchmarks. Differentiable by plain autograd; memory O(N·V).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .objective import spin_loss


def naive_linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    cu_seqlens: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    average: bool = False,
) -> Tensor:
    """Same contract as ``linear_logprobs`` (per sequence, no reduction="none" nor entropy:
    ``naive_row_stats``); computes in the promoted dtype of hidden/weight (at least float32)."""
    logp = naive_row_stats(hidden, weight, targets, bias=bias, ignore_index=ignore_index, temperature=temperature,
                           softcap=softcap)["logp"]
    dtype = logp.dtype
    counted = targets != ignore_index
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_id = torch.repeat_interleave(torch.arange(lengths.shape[0], device=hidden.device), lengths)
    sums = torch.zeros(lengths.shape[0], dtype=dtype, device=hidden.device).index_add(0, seq_id, logp)
    if average:
        counts = torch.zeros_like(sums).index_add(0, seq_id, counted.to(dtype))
        sums = sums / counts.clamp(min=1)
    return sums


def naive_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None = None, temperature: float = 1.0,
                 softcap: float | None = None) -> Tensor:
    """[N, V] logits z = softcap·tanh(((W h + b) / temperature) / softcap), in the promoted dtype of
    hidden/weight (at least float32)."""
    dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    logits = logits / temperature
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def naive_row_stats(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                    ignore_index: int = -100, temperature: float = 1.0, softcap: float | None = None
                    ) -> dict[str, Tensor]:
    """Per row [N], 0 on rows whose target is ignore_index: ``logp`` = log softmax(z)[target],
    ``entropy`` = −Σ p log p, ``mean_logit`` = mean of z, ``top1`` = 1.0 where torch.argmax(z)
    (the first maximal index) is the target. Differentiable (logp, entropy, mean_logit)."""
    logits = naive_logits(hidden, weight, bias, temperature, softcap)
    logp_all = torch.log_softmax(logits, dim=-1)
    counted = targets != ignore_index
    safe = torch.where(counted, targets, torch.zeros_like(targets)).long()
    mask = counted.to(logits.dtype)
    return {
        "logp": logp_all.gather(1, safe[:, None]).squeeze(1) * mask,
        "entropy": -(logp_all.exp() * logp_all).sum(1) * mask,
        "mean_logit": logits.mean(1) * mask,
        "top1": (logits.argmax(1) == safe).to(logits.dtype) * mask,
    }


def naive_linear_spin_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    cu_seqlens: Tensor,
    ref_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    **head_options,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Same contract as ``linear_spin_loss``, by full logits (head_options as linear_logprobs)."""
    seq = naive_linear_logprobs(hidden, weight, targets, cu_seqlens, **head_options)
    ref = ref_logps.detach().to(seq.dtype)
    return spin_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta=beta, loss_type=loss_type)
