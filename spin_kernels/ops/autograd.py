"""autograd.Functions of the fused ops; backend-agnostic (the backend does the vocabulary work).

* ``LinearLogprobsFunction``: forward saves only the per-row log-sum-exp; backward recomputes.
* ``LinearSPINLossFunction``: gradients are computed during the forward (the loss is known
  there) and only scaled by the upstream gradient in backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import Backend, HeadSpec, Needs
from .layout import CountedRows
from .objective import spin_terms


def _unless_one(grad_loss: Tensor) -> Tensor | None:
    """None when the upstream gradient is exactly 1 (``loss.backward()``) on CPU, where reading
    it is free; on other devices reading it would synchronise, so the scale is always applied."""
    if grad_loss.device.type == "cpu" and grad_loss.numel() == 1 and grad_loss.item() == 1.0:
        return None
    return grad_loss


def _scaled_(grad: Tensor | None, scale: Tensor | None) -> Tensor | None:
    """A gradient saved by the forward, handed over scaled in place: one [V, H] dweight at the
    peak, not two. A second backward through the same graph (retain_graph) then stops at torch's
    saved-tensor version check instead of scaling twice."""
    if grad is None or scale is None:
        return grad
    return grad.mul_(scale.to(grad.dtype))


def _cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    """grad in like's dtype (the same tensor when it already is); None if either is None."""
    if grad is None or like is None:
        return None
    return grad.to(like.dtype)


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, cu_seqlens, ignore_index: int, spec: HeadSpec,
                average: bool, backend: Backend):
        rows = CountedRows.build(targets, cu_seqlens, ignore_index, backend.pads_rows(hidden, weight, bias))
        logp, lse = backend.rows_forward(hidden, weight, bias, rows.targets, spec, rows.index, rows.count)
        ctx.save_for_backward(hidden, weight, bias, lse)
        ctx.rows, ctx.spec, ctx.average, ctx.backend = rows, spec, average, backend
        return rows.seq_logps(logp, average)

    @staticmethod
    def backward(ctx, grad_seq):
        hidden, weight, bias, lse = ctx.saved_tensors
        rows: CountedRows = ctx.rows
        needs = Needs(*ctx.needs_input_grad[:3])
        grad = rows.row_grads(grad_seq.to(lse.dtype), ctx.average)
        dh, dw, db = ctx.backend.rows_backward(
            hidden, weight, bias, rows.targets, lse, grad, ctx.spec, needs, rows.index, rows.count)
        return _cast(dh, hidden), _cast(dw, weight), _cast(db, bias), None, None, None, None, None, None


class LinearSPINLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, cu_seqlens, ref_logps, ignore_index: int, spec: HeadSpec,
                average: bool, beta: float, loss_type: str, backend: Backend):
        rows = CountedRows.build(targets, cu_seqlens, ignore_index, backend.pads_rows(hidden, weight, bias))
        ref = ref_logps.detach()
        needs = Needs(*ctx.needs_input_grad[:3])
        if needs.hidden or needs.weight or needs.bias:
            seq, loss, dh, dw, db = backend.spin_forward_backward(
                hidden, weight, bias, rows, ref, beta, loss_type, average, spec, needs)
        else:
            logp, _ = backend.rows_forward(hidden, weight, bias, rows.targets, spec, rows.index, rows.count)
            seq = rows.seq_logps(logp, average)
            loss, _ = spin_terms(seq, ref, beta, loss_type, max(rows.num_seqs // 2, 1))
            dh = dw = db = None
        # Stored in the parameters' dtypes: they are the gradients, only rescaled in backward.
        ctx.save_for_backward(_cast(dh, hidden), _cast(dw, weight), _cast(db, bias))
        ctx.mark_non_differentiable(seq)
        return loss, seq

    @staticmethod
    def backward(ctx, grad_loss, _grad_seq):
        dh, dw, db = ctx.saved_tensors
        scale = _unless_one(grad_loss)
        return (_scaled_(dh, scale), _scaled_(dw, scale), _scaled_(db, scale)) + (None,) * 9
