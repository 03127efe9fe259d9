"""Backward kernels: ∂hidden, ∂weight, ∂bias from per-row upstream scales, recomputing logits.

For a counted row n with upstream scale g_n (= ∂L/∂logp_n) and saved log-sum-exp lse_n,
∂L/∂z = g_n (onehot − softmax); chained through softcap and temperature into ∂u, then
∂h = ∂u W, ∂W = ∂uᵀ h, ∂b = Σ_n ∂u (../shared/docs/spin-math.md).

Two kernels, each the single owner of the memory it writes, so that no atomics are needed
and repeated runs are bitwise identical:

* ``grad_hidden_kernel``: one program per row tile walks the whole vocabulary and
  accumulates its ∂h rows (fp32, read-modify-write of its own rows only);
* ``grad_weight_kernel``: one program per vocabulary tile walks all counted rows and
  accumulates its ∂W rows and ∂b entries.

Each kernel recomputes the logit tiles, so the backward costs 8·M·H·V flops (the forward 2).

Gradient filtering (``filter_eps > 0``): a tile whose |onehot − softmax| is below
``filter_eps`` everywhere contributes less than the input dtype can represent next to the
target's own gradient; its two matmuls are skipped (its logits are still recomputed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .config import dot_precision, launch
from .tiles import logit_grad_tile, logit_tile


@triton.jit
def grad_hidden_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, dh_ptr,
    M, V, H,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_b, stride_dm,
    inv_temp, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    # Padding rows: softmax exp(z − inf) = 0 and g = 0, so they neither add to the sums nor
    # keep a tile alive in the gradient filter.
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=float("inf"))
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    dh_rows = dh_ptr + rows.to(tl.int64)[:, None] * stride_dm
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z, t = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H,
                          stride_hm, stride_hk, stride_wv, stride_wk, stride_b, inv_temp, softcap,
                          HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
        du, dz_unscaled = logit_grad_tile(z, t, y, cols, col_mask, lse, g, inv_temp, HAS_SOFTCAP)
        keep = True
        if FILTER:
            keep = tl.max(tl.max(tl.abs(dz_unscaled), axis=1), axis=0) >= filter_eps
        if keep:
            du_in = du.to(w_ptr.dtype.element_ty)  # the dot's operand dtype (a new name: scf.if keeps types)
            w_cols = w_ptr + cols.to(tl.int64)[:, None] * stride_wv
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < H
                w = tl.load(w_cols + ks[None, :] * stride_wk, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                mask = row_mask[:, None] & k_mask[None, :]
                acc = tl.load(dh_rows + ks[None, :], mask=mask, other=0.0)
                acc = tl.dot(du_in, w, acc, input_precision=DOT_PRECISION)
                tl.store(dh_rows + ks[None, :], acc, mask=mask)


@triton.jit
def grad_weight_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, dw_ptr, db_ptr,
    M, V, H,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_b, stride_dv,
    inv_temp, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    dw_cols = dw_ptr + cols.to(tl.int64)[:, None] * stride_dv
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=float("inf"))  # padding rows: softmax 0
        g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
        z, t = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H,
                          stride_hm, stride_hk, stride_wv, stride_wk, stride_b, inv_temp, softcap,
                          HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
        du, dz_unscaled = logit_grad_tile(z, t, y, cols, col_mask, lse, g, inv_temp, HAS_SOFTCAP)
        if COMPUTE_DB:
            db += tl.sum(du, axis=0)  # cheap: never filtered
        if COMPUTE_DW:
            keep = True
            if FILTER:
                keep = tl.max(tl.max(tl.abs(dz_unscaled), axis=1), axis=0) >= filter_eps
            if keep:
                du_t = tl.trans(du.to(w_ptr.dtype.element_ty))
                h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hm
                for k0 in range(0, H, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_mask = ks < H
                    h = tl.load(h_rows + ks[None, :] * stride_hk, mask=row_mask[:, None] & k_mask[None, :],
                                other=0.0)
                    mask = col_mask[:, None] & k_mask[None, :]
                    acc = tl.load(dw_cols + ks[None, :], mask=mask, other=0.0)
                    acc = tl.dot(du_t, h, acc, input_precision=DOT_PRECISION)
                    tl.store(dw_cols + ks[None, :], acc, mask=mask)
    if COMPUTE_DB:
        tl.store(db_ptr + cols, db, mask=col_mask)


def rows_grads(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor, grad: Tensor,
               temperature: float, softcap: float | None, need_hidden: bool, need_weight: bool, need_bias: bool,
               filter_eps: float = 0.0) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of Σ_n grad[n]·logp[n] over the counted rows.

    Args:
        hidden [M, H], weight [V, H], bias [V] | None, targets [M] int64: as in ``rows_logprobs``.
        lse: [M] float32 from the forward. grad: [M] float32, ∂L/∂logp per row.
        need_*: which gradients to compute (the others are returned as None).
        filter_eps: 0 = exact; > 0 skips the matmuls of tiles with |onehot − softmax| < filter_eps.

    Returns:
        (dhidden [M, H], dweight [V, H], dbias [V]) in float32, or None where not needed.
    """
    m, h = hidden.shape
    v = weight.shape[0]
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    need_bias = need_bias and bias is not None
    dh = hidden.new_zeros(m, h, dtype=torch.float32) if need_hidden else None
    dw = weight.new_zeros(v, h, dtype=torch.float32) if need_weight else None
    db = weight.new_zeros(v, dtype=torch.float32) if need_bias else None
    if m == 0:
        return dh, dw, db
    targets, lse, grad = targets.contiguous(), lse.float().contiguous(), grad.float().contiguous()
    common = (v, h, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
              bias.stride(0) if bias is not None else 0)
    scalars = (1.0 / temperature, 1.0 if softcap is None else softcap, float(filter_eps))
    flags = {"HAS_BIAS": bias is not None, "HAS_SOFTCAP": softcap is not None, "FILTER": filter_eps > 0,
             "DOT_PRECISION": dot_precision(weight.dtype)}
    b = bias if bias is not None else weight
    if need_hidden:
        launch(grad_hidden_kernel, lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),),
               hidden, weight, b, targets, lse, grad, dh, m, *common, dh.stride(0), *scalars,
               **flags, device=hidden.device, reset_to_zero=("dh_ptr",))
    if need_weight or need_bias:
        dw_arg = dw if dw is not None else hidden  # placeholders: never touched when not computed
        db_arg = db if db is not None else lse
        launch(grad_weight_kernel, lambda meta: (triton.cdiv(v, meta["BLOCK_V"]),),
               hidden, weight, b, targets, lse, grad, dw_arg, db_arg, m, *common,
               dw.stride(0) if dw is not None else 0, *scalars,
               **flags, COMPUTE_DW=need_weight, COMPUTE_DB=need_bias, device=hidden.device,
               # only real outputs: a placeholder (lse, hidden) must survive the autotuner's trials
               reset_to_zero=tuple(name for name, real in (("dw_ptr", need_weight), ("db_ptr", need_bias)) if real))
    return dh, dw, db
