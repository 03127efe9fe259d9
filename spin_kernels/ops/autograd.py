"""The autograd Functions of the fused ops: one per op, calling its custom op (``library.py``)
in eager and compiled modes alike (under ``torch.compile`` the Function is traced, the op stays
opaque).

* ``LinearLogprobsFunction``: returns (logps, entropy: empty unless ``opts.return_entropy``);
  forward saves only the per-token log-sum-exp (and entropy); backward recomputes the logits
  (``spin_kernels::linear_logprobs_backward``) for the upstream gradients it is given.
* ``LinearSPINLossFunction``: returns (loss, seq_logps, seq_stats), the last two without
  gradient; the gradients are computed during the forward (the loss is known there) and only
  scaled by the upstream gradient in backward, in place.

Both take the tensors, the options (``options.py``; ``options.impl`` names the backend, a
configured one included: ``backends.register_backend``) and ``sharding``: None, or how DTensor
arguments are sharded (``sharded.Sharding``): the op then runs on their gathered copies, saves
the sharded weight rather than its copy, and returns DTensor gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import library
from .options import LogprobsOptions, SpinOptions
from .sharded import Sharding


def _unless_one(grad_loss: Tensor) -> Tensor | None:
    """None when the upstream gradient is exactly 1 (``loss.backward()``) on CPU in eager mode,
    where reading it is free; on other devices reading it would synchronise, and under
    ``torch.compile`` it would break the graph, so the scale is applied."""
    if torch.compiler.is_compiling() or grad_loss.device.type != "cpu" or grad_loss.numel() != 1:
        return grad_loss
    return None if grad_loss.item() == 1.0 else grad_loss


def _scaled_(grad: Tensor, needed: bool, scale: Tensor | None) -> Tensor | None:
    """A gradient saved by the forward, handed over scaled in place: one [V, H] dweight at the
    peak, not two. A second backward through the same graph (retain_graph) then stops at torch's
    saved-tensor version check instead of scaling twice. Under ``torch.compile`` the traced
    backward is functional: inductor writes the product into the saved (donated) buffer, and a
    second backward is refused for that buffer; aot_eager allocates a second one."""
    if not needed:
        return None
    return grad if scale is None else grad.mul_(scale.to(grad.dtype))


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, cu_seqlens: Tensor,
                opts: LogprobsOptions, sharding: Sharding | None = None) -> tuple[Tensor, Tensor]:
        # Sharded: the gathered copies for the call; the weight / bias DTensors (this rank's
        # shards) are what is saved, and the backward gathers them again.
        h, w, b = (hidden, weight, bias) if sharding is None else sharding.full(hidden, weight, bias)
        out, lse, entropy, entropy_rows = library.linear_logprobs_op(h, w, b, targets, cu_seqlens, *opts.scalars())
        ctx.save_for_backward(h, weight, bias, targets, cu_seqlens, lse, entropy_rows)
        ctx.opts, ctx.sharding = opts, sharding
        ctx.set_materialize_grads(False)  # an output nobody differentiates costs no backward work
        if not opts.return_entropy:
            ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_entropy: Tensor | None):
        hidden, weight, bias, targets, cu_seqlens, lse, entropy_rows = ctx.saved_tensors
        sharding: Sharding | None = ctx.sharding
        need = ctx.needs_input_grad[:3]
        if grad_out is None and grad_entropy is None:
            return (None,) * 7
        if sharding is not None:
            _, weight, bias = sharding.full(None, weight, bias)
        if grad_out is None:  # only the entropy is differentiated
            grad_out = lse.new_zeros(hidden.shape[0] if ctx.opts.reduction == "none" else cu_seqlens.shape[0] - 1)
        if grad_entropy is None:
            grad_entropy = lse.new_empty(0)
        dh, dw, db = library.linear_logprobs_backward_op(grad_out, grad_entropy, hidden, weight, bias, targets,
                                                         cu_seqlens, lse, entropy_rows, *ctx.opts.scalars(), *need)
        grads = (dh if need[0] else None, dw if need[1] else None, db if need[2] else None)
        if sharding is not None:
            grads = sharding.grads(*grads)
        return (*grads, None, None, None, None)


class LinearSPINLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, cu_seqlens: Tensor,
                ref_logps: Tensor, opts: SpinOptions, sharding: Sharding | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        if sharding is not None:  # the gathered copies, for the call only
            hidden, weight, bias = sharding.full(hidden, weight, bias)
        loss, seq, dh, dw, db, seq_stats = library.linear_spin_loss_op(hidden, weight, bias, targets, cu_seqlens,
                                                                       ref_logps.detach(), *opts.scalars(),
                                                                       *ctx.needs_input_grad[:3])
        # In the parameters' dtypes: they are the gradients, only rescaled in backward. Sharded,
        # dweight stays whole until then: the mesh average must be of the contributions scaled by
        # each rank's upstream gradient, which may differ between ranks.
        ctx.save_for_backward(dh, dw, db)
        ctx.mark_non_differentiable(seq, seq_stats)
        ctx.sharding = sharding
        return loss, seq, seq_stats

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_seq: Tensor, _grad_stats: Tensor):
        dh, dw, db = ctx.saved_tensors
        scale = _unless_one(grad_loss)
        need = ctx.needs_input_grad
        grads = (_scaled_(dh, need[0], scale), _scaled_(dw, need[1], scale), _scaled_(db, need[2], scale))
        if ctx.sharding is not None:
            grads = ctx.sharding.grads(*grads)
        return (*grads, None, None, None, None, None)
