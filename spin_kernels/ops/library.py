"""The fused ops as ``torch.library`` custom ops, for ``torch.compile(fullgraph=True)``.

Each op is opaque to the compiler: its real implementation may synchronise with the host
(row compaction is data-dependent, value validation reads flags) without breaking the graph,
and its fake implementation gives the output shapes, which depend only on input shapes.

* ``spin_kernels::linear_logprobs`` -> (seq_logps [S], lse [N]); lse is per token (0 on
  ignored rows) so that its shape is static. Backward: ``spin_kernels::linear_logprobs_backward``.
* ``spin_kernels::linear_spin_loss`` -> (loss [], seq_logps [S], dhidden, dweight, dbias): the
  gradients (for d loss = 1, an empty tensor where not wanted) are computed in the forward,
  as the eager path does, and the registered backward only scales them.

The public functions in ``api.py`` route here while ``torch.compiler.is_compiling()``; in
eager mode they use the autograd.Functions of ``autograd.py`` directly (one validation, no
extra copies). Both paths call the same backends on the same CountedRows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .autograd import _cast
from .backends import HeadSpec, Needs, resolve_backend
from .backends.base import acc_dtype
from .layout import CountedRows
from .objective import check_loss_options, spin_terms
from .validation import check_head_options, check_linear_inputs


def _spec(temperature: float, softcap: float | None) -> HeadSpec:
    return HeadSpec(float(temperature), None if softcap is None else float(softcap))


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


@torch.library.custom_op("spin_kernels::linear_logprobs", mutates_args=())
def linear_logprobs_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, cu_seqlens: Tensor,
                       ignore_index: int, temperature: float, softcap: float | None, average: bool,
                       impl: str, check_values: bool) -> tuple[Tensor, Tensor]:
    check_head_options(ignore_index, temperature, softcap, average, impl)
    check_linear_inputs(hidden, weight, targets, cu_seqlens, bias, ignore_index, check_values)
    backend = resolve_backend(impl, hidden.device)
    rows = CountedRows.build(targets, cu_seqlens, ignore_index, backend.pads_rows(hidden, weight, bias))
    logp, lse = backend.rows_forward(hidden, weight, bias, rows.targets, _spec(temperature, softcap), rows.index,
                                     rows.count)
    lse_tokens = lse.new_zeros(hidden.shape[0]).index_copy_(0, rows.index, lse)
    return rows.seq_logps(logp, average), lse_tokens


@linear_logprobs_op.register_fake
def _(hidden, weight, bias, targets, cu_seqlens, ignore_index, temperature, softcap, average, impl, check_values):
    acc = acc_dtype(hidden, weight)
    return hidden.new_empty(cu_seqlens.shape[0] - 1, dtype=acc), hidden.new_empty(hidden.shape[0], dtype=acc)


@torch.library.custom_op("spin_kernels::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward_op(grad_seq: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                                targets: Tensor, cu_seqlens: Tensor, lse_tokens: Tensor, ignore_index: int,
                                temperature: float, softcap: float | None, average: bool, impl: str,
                                need_hidden: bool, need_weight: bool, need_bias: bool
                                ) -> tuple[Tensor, Tensor, Tensor]:
    backend = resolve_backend(impl, hidden.device)
    rows = CountedRows.build(targets, cu_seqlens, ignore_index, backend.pads_rows(hidden, weight, bias))
    lse = lse_tokens[rows.index]
    grad = rows.row_grads(grad_seq.to(lse.dtype), average)
    needs = Needs(need_hidden, need_weight, need_bias and bias is not None)
    dh, dw, db = backend.rows_backward(hidden, weight, bias, rows.targets, lse, grad, _spec(temperature, softcap),
                                       needs, rows.index, rows.count)
    dh = _cast(dh, hidden) if dh is not None else _empty(hidden)
    dw = _cast(dw, weight) if dw is not None else _empty(weight)
    db = _cast(db, bias) if db is not None else _empty(weight)
    return dh, dw, db


@linear_logprobs_backward_op.register_fake
def _(grad_seq, hidden, weight, bias, targets, cu_seqlens, lse_tokens, ignore_index, temperature, softcap,
      average, impl, need_hidden, need_weight, need_bias):
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else _empty(hidden)
    dw = weight.new_empty(weight.shape) if need_weight else _empty(weight)
    db = bias.new_empty(bias.shape) if (need_bias and bias is not None) else _empty(weight)
    return dh, dw, db


def _logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, targets, cu_seqlens, ignore_index, temperature, softcap, average, impl, _ = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, cu_seqlens, output[1])
    ctx.options = (ignore_index, temperature, softcap, average, impl)
    ctx.mark_non_differentiable(output[1])


def _logprobs_backward(ctx, grad_seq, _grad_lse):
    hidden, weight, bias, targets, cu_seqlens, lse_tokens = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    dh, dw, db = linear_logprobs_backward_op(grad_seq, hidden, weight, bias, targets, cu_seqlens, lse_tokens,
                                             *ctx.options, need_h, need_w, need_b)
    return (dh if need_h else None, dw if need_w else None, db if need_b else None) + (None,) * 8


torch.library.register_autograd("spin_kernels::linear_logprobs", _logprobs_backward, setup_context=_logprobs_setup)


@torch.library.custom_op("spin_kernels::linear_spin_loss", mutates_args=())
def linear_spin_loss_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                        cu_seqlens: Tensor, ref_logps: Tensor, ignore_index: int, temperature: float,
                        softcap: float | None, average: bool, beta: float, loss_type: str, impl: str,
                        check_values: bool, need_hidden: bool, need_weight: bool, need_bias: bool
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_loss_options(beta, loss_type)
    check_head_options(ignore_index, temperature, softcap, average, impl)
    check_linear_inputs(hidden, weight, targets, cu_seqlens, bias, ignore_index, check_values, ref_logps, spin=True)
    backend = resolve_backend(impl, hidden.device)
    rows = CountedRows.build(targets, cu_seqlens, ignore_index, backend.pads_rows(hidden, weight, bias))
    spec = _spec(temperature, softcap)
    needs = Needs(need_hidden, need_weight, need_bias and bias is not None)
    if needs.hidden or needs.weight or needs.bias:
        seq, loss, dh, dw, db = backend.spin_forward_backward(
            hidden, weight, bias, rows, ref_logps, beta, loss_type, average, spec, needs)
    else:
        logp, _ = backend.rows_forward(hidden, weight, bias, rows.targets, spec, rows.index, rows.count)
        seq = rows.seq_logps(logp, average)
        loss, _ = spin_terms(seq, ref_logps, beta, loss_type, max(rows.num_seqs // 2, 1))
        dh = dw = db = None
    dh = _cast(dh, hidden) if dh is not None else _empty(hidden)
    dw = _cast(dw, weight) if dw is not None else _empty(weight)
    db = _cast(db, bias) if db is not None else _empty(weight)
    return loss, seq, dh, dw, db


@linear_spin_loss_op.register_fake
def _(hidden, weight, bias, targets, cu_seqlens, ref_logps, ignore_index, temperature, softcap, average, beta,
      loss_type, impl, check_values, need_hidden, need_weight, need_bias):
    acc = acc_dtype(hidden, weight)
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else _empty(hidden)
    dw = weight.new_empty(weight.shape) if need_weight else _empty(weight)
    db = bias.new_empty(bias.shape) if (need_bias and bias is not None) else _empty(weight)
    return hidden.new_empty((), dtype=acc), hidden.new_empty(cu_seqlens.shape[0] - 1, dtype=acc), dh, dw, db


def _spin_setup(ctx, inputs, output):
    _, seq, dh, dw, db = output
    ctx.save_for_backward(dh, dw, db)
    ctx.mark_non_differentiable(seq, dh, dw, db)


def _spin_backward(ctx, grad_loss, *_unused):
    dh, dw, db = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    scale = grad_loss

    def scaled(g: Tensor, needed: bool) -> Tensor | None:
        return (g * scale.to(g.dtype)).to(g.dtype) if needed and g.numel() else None

    return (scaled(dh, need_h), scaled(dw, need_w), scaled(db, need_b)) + (None,) * 14


torch.library.register_autograd("spin_kernels::linear_spin_loss", _spin_backward, setup_context=_spin_setup)


def _wants_grad(t: Tensor | None) -> bool:
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def linear_logprobs_via_library(hidden, weight, targets, cu_seqlens, bias, ignore_index, temperature, softcap,
                                average, impl, check_values=True) -> Tensor:
    """``linear_logprobs`` through the custom op (same arguments and result)."""
    seq, _ = linear_logprobs_op(hidden, weight, bias, targets, cu_seqlens, ignore_index, float(temperature),
                                None if softcap is None else float(softcap), average, impl, check_values)
    return seq


def linear_spin_loss_via_library(hidden, weight, targets, cu_seqlens, ref_logps, bias, ignore_index, temperature,
                                 softcap, average, beta, loss_type, impl, check_values=True) -> tuple[Tensor, Tensor]:
    """``linear_spin_loss`` through the custom op: (loss, seq_logps [S]); the caller builds metrics."""
    loss, seq, _, _, _ = linear_spin_loss_op(
        hidden, weight, bias, targets, cu_seqlens, ref_logps.detach(), ignore_index, float(temperature),
        None if softcap is None else float(softcap), average, float(beta), loss_type, impl, check_values,
        _wants_grad(hidden), _wants_grad(weight), _wants_grad(bias))
    return loss, seq
