"""The peers' calling convention: ``[B, T, H]`` hidden states with ``labels`` [B, T], an
optional attention mask and ``shift``, as Liger-Kernel's and Cut Cross-Entropy's fused losses
and TRL's padded batches take them, mapped onto the packed ops of ``api.py``.

Each batch row is one sequence: ``hidden`` becomes the packed ``[B·T, H]`` rows by a view (no
copy unless its last two dimensions are not contiguous), ``cu_seqlens`` is ``0, T, 2T, …``, and
only the ``[B·T]`` targets are built: the label each position predicts, ``ignore_index`` where
it predicts nothing (padding, the last position with ``shift``), so padding costs no vocabulary
work. docs/ops.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .api import linear_logprobs, linear_spin_loss


def _packed(hidden: Tensor, labels: Tensor, attention_mask: Tensor | None, shift: bool,
            ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """-> (hidden [B·T, H], targets [B·T] int64, cu_seqlens [B+1] int64), checked."""
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be a [B, T, H] tensor, got {getattr(hidden, 'shape', type(hidden).__name__)}")
    b, t, h = hidden.shape
    if not isinstance(labels, Tensor) or labels.shape != (b, t):
        raise ValueError(f"labels must be a [B, T] = [{b}, {t}] tensor like hidden's first two dimensions, got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels must be int32/int64, got {labels.dtype}")
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.shape != (b, t)):
        raise ValueError(f"attention_mask must be None or a [B, T] = [{b}, {t}] tensor, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    for name, x in (("labels", labels), ("attention_mask", attention_mask)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}")
    labels = labels.long()
    real = None if attention_mask is None else attention_mask.bool()
    if shift:  # position t predicts labels[:, t + 1], from a real token to a real token
        targets = torch.full_like(labels, ignore_index)
        targets[:, :-1] = labels[:, 1:]
        if real is not None:
            targets[:, :-1].masked_fill_(~(real[:, :-1] & real[:, 1:]), ignore_index)
    else:
        targets = labels if real is None else labels.masked_fill(~real, ignore_index)
    cu_seqlens = torch.arange(0, (b + 1) * t, t, device=hidden.device) if t else hidden.new_zeros(b + 1,
                                                                                                 dtype=torch.long)
    return hidden.reshape(b * t, h), targets.reshape(b * t), cu_seqlens


def _per_position(rows: Tensor, batch: int, length: int, shift: bool) -> Tensor:
    """Per packed row [B·T] -> [B, T] aligned with ``labels`` (Cut Cross-Entropy's convention):
    with ``shift``, row (b, t) scored labels[b, t + 1], so it goes to column t + 1 and column 0 is 0."""
    out = rows.view(batch, length)
    return torch.nn.functional.pad(out[:, :-1], (1, 0)) if shift and length else out


def batched_linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    shift: bool = True,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    reduction: str = "sum",
    return_entropy: bool = False,
    impl: str = "auto",
    check_values: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """``linear_logprobs`` on ``[B, T, H]`` hidden states, one sequence per batch row.

    Args:
        hidden: [B, T, H] the last hidden states. weight, bias: the lm_head, as ``linear_logprobs``.
        labels: [B, T] int32/int64 token ids (HF's ``labels``: ``ignore_index`` on the prompt and
            padding).
        attention_mask: None or [B, T], 0 on padding: a position counts only between real tokens.
        shift: True: position t predicts labels[:, t + 1] (the model's inputs as labels); False:
            labels are already aligned with hidden.
        reduction: "sum" or "mean" -> [B]; "none" -> [B, T] aligned with labels (with shift,
            column 0 is 0 and column t holds log p(labels[:, t])).
        Others: as ``linear_logprobs``.

    Returns:
        logps, or (logps, entropy) with return_entropy, float32, differentiable.
    """
    b, t = hidden.shape[:2] if isinstance(hidden, Tensor) and hidden.dim() == 3 else (0, 0)
    rows, targets, cu_seqlens = _packed(hidden, labels, attention_mask, shift, ignore_index)
    out = linear_logprobs(rows, weight, targets, cu_seqlens, bias=bias, ignore_index=ignore_index,
                          temperature=temperature, softcap=softcap, reduction=reduction,
                          return_entropy=return_entropy, impl=impl, check_values=check_values)
    if reduction != "none":
        return out
    if return_entropy:
        return tuple(_per_position(x, b, t, shift) for x in out)
    return _per_position(out, b, t, shift)


def batched_linear_spin_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ref_logps: Tensor,
    *,
    pairs: str,
    attention_mask: Tensor | None = None,
    shift: bool = True,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    token_metrics: bool = False,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    average: bool = False,
    impl: str = "auto",
    check_values: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``linear_spin_loss`` on ``[B, T, H]`` hidden states, one sequence per batch row.

    Args:
        hidden, weight, labels, attention_mask, shift: as ``batched_linear_logprobs``.
        ref_logps: [B] the opponent's log-probs of the rows, in the rows' order.
        pairs: required, the layout of the B = 2P rows: "halves" (rows 0..P-1 the real/chosen
            responses, P..2P-1 the synthetic/rejected ones: TRL's and Liger's concatenation) or
            "interleaved" (row 2p real, 2p+1 synthetic).
        Others: as ``linear_spin_loss``.

    Returns:
        (loss, metrics) as ``linear_spin_loss``.
    """
    rows, targets, cu_seqlens = _packed(hidden, labels, attention_mask, shift, ignore_index)
    return linear_spin_loss(rows, weight, targets, cu_seqlens, ref_logps, beta=beta, loss_type=loss_type, pairs=pairs,
                            token_metrics=token_metrics, bias=bias, ignore_index=ignore_index, temperature=temperature,
                            softcap=softcap, average=average, impl=impl, check_values=check_values)
