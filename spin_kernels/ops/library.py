"""The fused ops as ``torch.library`` custom ops: the one forward (and backward) of each op.

The autograd Functions of ``autograd.py`` call these ops in eager and compiled modes alike.
Each op is opaque to the compiler: its real implementation may synchronise with the host (row
compaction is data-dependent, value validation reads flags) without breaking the graph, and
its fake implementation gives the output shapes, which depend only on input shapes and options.

* ``spin_kernels::linear_logprobs`` -> (logps, lse [N], entropy, entropy_rows [N]): logps
  [S] per sequence, or [N] per row with reduction="none"; lse per row (0 on ignored rows) so
  that its shape is static; with return_entropy the entropy reduced as logps and per row
  (what the backward needs), else empty tensors.
* ``spin_kernels::linear_logprobs_backward`` -> (dhidden, dweight, dbias), recomputing the
  logits from lse, from the upstream gradients of logps and (or an empty tensor) the entropy.
* ``spin_kernels::linear_spin_loss`` -> (loss [], seq_logps [S], dhidden, dweight, dbias,
  seq_stats): the gradients for d loss = 1, computed in the forward (the loss is known there;
  the backward only scales them); with token_metrics seq_stats [4, S] per sequence (counted
  rows, then the sums of STAT_ROWS), else empty. seq_logps and seq_stats are in the
  interleaved pair order (real, synthetic of each pair) whatever ``pairs``.

Gradients come in the inputs' dtypes, as empty tensors where not wanted (a schema has no
optional outputs). The scalar arguments are the fields of ``options.LogprobsOptions`` /
``SpinOptions`` in order; ``impl`` names the backend, resolved inside the op (a configured
backend is a registered name too: ``backends.register_backend`` / ``as_impl``). Each op's
implementation is a plain function of the tensors, the options and a Backend
(``logprobs_forward``, ``logprobs_backward``, ``spin_forward``), run with autocast off.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .backends import STAT_ROWS, Backend, Needs, SpinResult, Upstream, resolve_backend
from .backends.base import acc_dtype
from .layout import CountedRows, pair_order
from .objective import spin_terms
from .options import HeadOptions, LogprobsOptions, SpinOptions
from .validation import check_linear_values


def _rows(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, cu_seqlens: Tensor,
          opts: HeadOptions, backend: Backend, order: Tensor | None = None) -> CountedRows:
    return CountedRows.build(targets, cu_seqlens, opts.ignore_index, backend.pads_rows(hidden, weight, bias), order)


def _grads_out(dh: Tensor | None, dw: Tensor | None, db: Tensor | None, hidden: Tensor, weight: Tensor,
               bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients in the inputs' dtypes (the same tensor when already so); empty where None."""
    def cast(g: Tensor | None, like: Tensor | None) -> Tensor:
        return weight.new_empty(0) if g is None or like is None else g.to(like.dtype)

    return cast(dh, hidden), cast(dw, weight), cast(db, bias)


def _grads_fake(hidden: Tensor, weight: Tensor, bias: Tensor | None, need_hidden: bool, need_weight: bool,
                need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    empty = weight.new_empty(0)
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else empty
    dw = weight.new_empty(weight.shape) if need_weight else empty
    db = bias.new_empty(bias.shape) if need_bias and bias is not None else empty
    return dh, dw, db


# -- the implementations: plain functions of the options and a backend -----------------------


def _outside_autocast(impl):
    """Run ``impl`` with autocast off on its tensors' device. A custom op is opaque to autocast,
    which would otherwise reach the matrix products inside it and round the logits to bf16/fp16;
    the kernels compute in the inputs' dtypes with fp32 accumulation, under autocast or not."""
    @functools.wraps(impl)
    def run(first: Tensor, *args, **kwargs):
        device = first.device.type
        if not torch.is_autocast_enabled(device):
            return impl(first, *args, **kwargs)
        with torch.autocast(device, enabled=False):
            return impl(first, *args, **kwargs)

    return run


def _to_tokens(rows: CountedRows, values: Tensor, num_rows: int) -> Tensor:
    """Per counted row [M] (padded layout: [N], 0 past count) -> per row of the batch [N], 0 on
    the rows that are not counted."""
    return values.new_zeros(num_rows).index_copy_(0, rows.index, values)


def _reduced(rows: CountedRows, values: Tensor, opts: LogprobsOptions, num_rows: int) -> Tensor:
    """Per counted row -> the op's output: per sequence [S] (sums or means), or per row [N]."""
    if opts.reduction == "none":
        return _to_tokens(rows, values, num_rows)
    return rows.seq_logps(values, opts.average)


def _row_grads(rows: CountedRows, grad_out: Tensor, opts: LogprobsOptions, dtype: torch.dtype) -> Tensor:
    """The upstream gradient of the op's output -> per counted row (the inverse of ``_reduced``)."""
    grad_out = grad_out.to(dtype)
    if opts.reduction == "none":
        return grad_out[rows.index]
    return rows.row_grads(grad_out, opts.average)


@_outside_autocast
def logprobs_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, cu_seqlens: Tensor,
                     opts: LogprobsOptions, backend: Backend) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (logps, lse [N], entropy, entropy per row [N]) as the op returns them, in the
    accumulation dtype (the entropies empty without ``opts.return_entropy``)."""
    if opts.check_values:
        check_linear_values(hidden, weight, targets, cu_seqlens, opts.ignore_index)
    n = hidden.shape[0]
    rows = _rows(hidden, weight, bias, targets, cu_seqlens, opts, backend)
    fwd = backend.rows_forward(hidden, weight, bias, rows.targets, opts, rows.index, rows.count)
    out = (_reduced(rows, fwd.logp, opts, n), _to_tokens(rows, fwd.lse, n))
    if not opts.return_entropy:  # two tensors: a custom op's outputs may not alias each other
        return out + (fwd.lse.new_empty(0), fwd.lse.new_empty(0))
    entropy = fwd.stats[STAT_ROWS.index("entropy")]
    return out + (_reduced(rows, entropy, opts, n), _to_tokens(rows, entropy, n))


@_outside_autocast
def logprobs_backward(grad_out: Tensor, grad_entropy: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                      targets: Tensor, cu_seqlens: Tensor, lse_tokens: Tensor, entropy_tokens: Tensor,
                      opts: LogprobsOptions, needs: Needs, backend: Backend) -> tuple[Tensor, Tensor, Tensor]:
    """The upstream gradients of logps and of the entropy (an empty tensor: none) ->
    (dhidden [N, H], dweight [V, H], dbias [V]) as ``_grads_out`` gives them."""
    rows = _rows(hidden, weight, bias, targets, cu_seqlens, opts, backend)
    lse = lse_tokens[rows.index]
    up = Upstream(lse, _row_grads(rows, grad_out, opts, lse.dtype))
    if grad_entropy.numel():
        up = up._replace(entropy=entropy_tokens[rows.index], grad_entropy=_row_grads(rows, grad_entropy, opts,
                                                                                     lse.dtype))
    grads = backend.rows_backward(hidden, weight, bias, rows.targets, up, opts, needs, rows.index, rows.count)
    return _grads_out(*grads, hidden, weight, bias)


@_outside_autocast
def spin_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, cu_seqlens: Tensor,
                 ref_logps: Tensor, opts: SpinOptions, needs: Needs,
                 backend: Backend) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss [], seq_logps [S], dhidden, dweight, dbias, seq_stats): the gradients for
    d loss = 1 where ``needs`` asks (as ``_grads_out`` gives them). seq_logps and seq_stats are
    in the interleaved order (real, synthetic of each pair), whatever ``opts.pairs``: the rows of
    a "halves" batch are read through a row index in that order, and ref_logps taken in it."""
    if opts.check_values:
        check_linear_values(hidden, weight, targets, cu_seqlens, opts.ignore_index, ref_logps)
    order = pair_order(cu_seqlens.shape[0] - 1, opts.pairs, cu_seqlens.device)
    if order is not None:
        ref_logps = ref_logps[order]
    rows = _rows(hidden, weight, bias, targets, cu_seqlens, opts, backend, order)
    if needs.hidden or needs.weight or (needs.bias and bias is not None):
        out = backend.spin_forward_backward(hidden, weight, bias, rows, ref_logps, opts, needs)
    else:
        fwd = backend.rows_forward(hidden, weight, bias, rows.targets, opts, rows.index, rows.count)
        seq = rows.seq_logps(fwd.logp, opts.average)
        loss, _ = spin_terms(seq, ref_logps, opts.beta, opts.loss_type, max(rows.num_seqs // 2, 1))
        out = SpinResult(loss, seq, None, None, None, fwd.stats)
    if out.row_stats is None:
        seq_stats = out.seq_logps.new_empty(0)
    else:  # [4, S]: counted rows, then each statistic summed per sequence
        seq_stats = torch.stack([rows.counts.to(out.seq_logps.dtype), *(rows.segment_sum(r) for r in out.row_stats)])
    return (out.loss, out.seq_logps) + _grads_out(out.dhidden, out.dweight, out.dbias, hidden, weight,
                                                  bias) + (seq_stats,)


# -- the custom ops: the implementations above, the backend named by impl ---------------------


@torch.library.custom_op("spin_kernels::linear_logprobs", mutates_args=())
def linear_logprobs_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, cu_seqlens: Tensor,
                       ignore_index: int, temperature: float, softcap: float | None, average: bool, impl: str,
                       check_values: bool, reduction: str, return_entropy: bool
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    opts = LogprobsOptions(ignore_index, temperature, softcap, average, impl, check_values, reduction, return_entropy)
    return logprobs_forward(hidden, weight, bias, targets, cu_seqlens, opts, resolve_backend(impl, hidden.device))


@linear_logprobs_op.register_fake
def _(hidden, weight, bias, targets, cu_seqlens, *options):
    opts = LogprobsOptions(*options)
    acc = acc_dtype(hidden, weight)
    n = hidden.shape[0]
    out = hidden.new_empty(n if opts.reduction == "none" else cu_seqlens.shape[0] - 1, dtype=acc)
    if not opts.return_entropy:
        return out, hidden.new_empty(n, dtype=acc), hidden.new_empty(0, dtype=acc), hidden.new_empty(0, dtype=acc)
    return out, hidden.new_empty(n, dtype=acc), torch.empty_like(out), hidden.new_empty(n, dtype=acc)


@torch.library.custom_op("spin_kernels::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward_op(grad_out: Tensor, grad_entropy: Tensor, hidden: Tensor, weight: Tensor,
                                bias: Tensor | None, targets: Tensor, cu_seqlens: Tensor, lse_tokens: Tensor,
                                entropy_tokens: Tensor, ignore_index: int, temperature: float, softcap: float | None,
                                average: bool, impl: str, check_values: bool, reduction: str, return_entropy: bool,
                                need_hidden: bool, need_weight: bool, need_bias: bool
                                ) -> tuple[Tensor, Tensor, Tensor]:
    opts = LogprobsOptions(ignore_index, temperature, softcap, average, impl, check_values, reduction, return_entropy)
    return logprobs_backward(grad_out, grad_entropy, hidden, weight, bias, targets, cu_seqlens, lse_tokens,
                             entropy_tokens, opts, Needs(need_hidden, need_weight, need_bias),
                             resolve_backend(impl, hidden.device))


@linear_logprobs_backward_op.register_fake
def _(grad_out, grad_entropy, hidden, weight, bias, *tensors_options_and_needs):
    return _grads_fake(hidden, weight, bias, *tensors_options_and_needs[-3:])


@torch.library.custom_op("spin_kernels::linear_spin_loss", mutates_args=())
def linear_spin_loss_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, cu_seqlens: Tensor,
                        ref_logps: Tensor, ignore_index: int, temperature: float, softcap: float | None,
                        average: bool, impl: str, check_values: bool, beta: float, loss_type: str, pairs: str,
                        token_metrics: bool, need_hidden: bool, need_weight: bool, need_bias: bool
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    opts = SpinOptions(ignore_index, temperature, softcap, average, impl, check_values, beta, loss_type, pairs,
                       token_metrics)
    return spin_forward(hidden, weight, bias, targets, cu_seqlens, ref_logps, opts,
                        Needs(need_hidden, need_weight, need_bias), resolve_backend(impl, hidden.device))


@linear_spin_loss_op.register_fake
def _(hidden, weight, bias, targets, cu_seqlens, ref_logps, *options_and_needs):
    opts = SpinOptions(*options_and_needs[:-3])
    acc = acc_dtype(hidden, weight)
    s = cu_seqlens.shape[0] - 1
    seq_stats = hidden.new_empty((1 + len(STAT_ROWS), s) if opts.token_metrics else (0,), dtype=acc)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(s, dtype=acc),
            *_grads_fake(hidden, weight, bias, *options_and_needs[-3:]), seq_stats)
