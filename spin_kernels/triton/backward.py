"""Backward kernels: ∂hidden, ∂weight, ∂bias from per-row upstream scales, recomputing logits.

For a counted row n with upstream scale g_n (= ∂L/∂logp_n) and saved log-sum-exp lse_n,
∂L/∂z = g_n (onehot − softmax); chained through softcap and temperature into ∂u, then
∂h = ∂u W, ∂W = ∂uᵀ h, ∂b = Σ_n ∂u (docs/spin-math.md).

Everything runs inside one workspace of ``workspace_bytes`` (``workspace_shape``): the rows in
blocks (all of them in one block when their fp32 ∂h fits half the budget) and, per block, the
vocabulary in chunks. Per (block, chunk), three kernels, each the single owner of what it writes
(no atomics: repeated runs are bitwise identical):

* ``logit_grads_kernel`` recomputes the chunk's logit tiles on chip (one program per
  row tile × vocabulary tile), forms ∂u and writes it, in the weight's dtype, into a
  [block, chunk] buffer G; with it, the tile's column sums of ∂u (for ∂b, fp32) and, when the
  gradient filter is on, whether the tile matters at all;
* ``grad_hidden_kernel``: acc[rows, cols] += G[rows, chunk] · W[chunk, cols] into the block's
  fp32 accumulator (read and written once per chunk); the last chunk writes the sum, rounded
  once, into ∂h in hidden's dtype, at the rows' positions;
* ``grad_weight_kernel``: ∂W[chunk, cols] += G[:, chunk]ᵀ · h[block, cols], the block's whole
  reduction in one fp32 accumulator, added to ∂W in the weight's dtype: no [V, H] fp32 buffer,
  one rounding per block.

So the backward costs 6·M·H·V flops (the forward 2), two of its three products are plain GEMMs
that read G, and its extra memory is the workspace (G + the block's fp32 ∂h), whatever M and V.
The trade: with several blocks ∂W is rounded to its dtype once per block instead of once.

Gradient filtering (``filter_eps > 0``): a tile whose |onehot − softmax| is below
``filter_eps`` everywhere contributes less than the input dtype can represent next to the
target's own gradient; both products skip it (its logits are still recomputed; ∂b is never
filtered).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .config import backward_tiles, dot_precision, flags_from_pointers, launch
from .tiles import live_count, logit_grad_tile, logit_tile, row_positions

# The backward's scratch memory: G and the fp32 ∂h accumulator of a row block. Under 64 MiB with
# room for the small per-row buffers (lse, row indices, bias partial sums).
DEFAULT_WORKSPACE_BYTES = 56 * 2**20


@flags_from_pointers(HAS_BIAS="b_ptr", HAS_INDEX="idx_ptr", FILTER="keep_ptr", COMPUTE_DB="dbp_ptr")
@triton.jit
def logit_grads_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, idx_ptr, count_ptr, lse_ptr, g_ptr, du_ptr, dbp_ptr, keep_ptr,
    M, V, H, v_lo, v_hi,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_b, stride_du, stride_dbp, stride_keep,
    inv_temp, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_INDEX: tl.constexpr, FILTER: tl.constexpr,
    COMPUTE_DB: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TILE_M: tl.constexpr, TILE_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    count = tl.load(count_ptr)
    if pid_m * TILE_M >= count:  # padding rows only: ∂b's partial sums stay the zeros they start as
        return
    rows = pid_m * TILE_M + tl.arange(0, TILE_M)
    row_mask = rows < count
    local = pid_v * TILE_V + tl.arange(0, TILE_V)  # columns within the chunk
    cols = v_lo + local
    # Chunks start at multiples of TILE_V and only the last one is ragged, so a column past
    # v_hi is past V too: no target can name it.
    col_mask = cols < v_hi
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    # Padding rows: softmax exp(z − inf) = 0 and g = 0, so they add nothing and never keep a
    # tile alive in the filter.
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=float("inf"))
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    z, t = logit_tile(h_ptr, w_ptr, b_ptr, row_positions(idx_ptr, rows, row_mask, HAS_INDEX), cols, row_mask,
                      col_mask, H, stride_hm, stride_hk, stride_wv, stride_wk, stride_b, inv_temp, softcap,
                      HAS_BIAS, HAS_SOFTCAP, TILE_M, TILE_V, BLOCK_K, DOT_PRECISION)
    du, dz_unscaled = logit_grad_tile(z, t, y, cols, col_mask, lse, g, inv_temp, HAS_SOFTCAP)
    du = tl.where(row_mask[:, None] & col_mask[None, :], du, 0.0)
    out = du_ptr + rows.to(tl.int64)[:, None] * stride_du + local[None, :]
    tl.store(out, du.to(du_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
    if COMPUTE_DB:
        tl.store(dbp_ptr + pid_m.to(tl.int64) * stride_dbp + local, tl.sum(du, axis=0), mask=col_mask)
    if FILTER:
        live = tl.max(tl.max(tl.abs(dz_unscaled), axis=1), axis=0) >= filter_eps
        tl.store(keep_ptr + pid_m * stride_keep + pid_v, live.to(tl.int32))


@triton.jit
def tile_is_live(keep_ptr, at, FILTER: tl.constexpr):
    """Whether a (row tile, vocabulary tile) of G enters the products: always, unless the
    gradient filter marked it negligible."""
    live = True
    if FILTER:
        live = tl.load(keep_ptr + at) != 0
    return live


@flags_from_pointers(HAS_INDEX="idx_ptr", FILTER="keep_ptr")
@triton.jit
def grad_hidden_kernel(
    du_ptr, w_ptr, idx_ptr, count_ptr, keep_ptr, acc_ptr, dh_ptr,
    M, V, H, v_lo, v_hi, n_vtiles, first, last,
    stride_du, stride_wv, stride_wk, stride_keep, stride_acc, stride_dm,
    HAS_INDEX: tl.constexpr, FILTER: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TILE_M: tl.constexpr, TILE_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """acc[rows, ks] (+)= Σ over the chunk's vocabulary tiles of G[rows, tile] · W[tile, ks];
    on the last chunk the sum goes, rounded once, to dh at the rows' positions instead.

    ``first``/``last`` are runtime flags (not constexprs) so that every chunk shares one
    autotuned configuration, tuned on the first launch, which writes without reading and so can
    be re-run by the autotuner."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    count = tl.load(count_ptr)
    if pid_m * TILE_M >= count:
        return
    rows = pid_m * TILE_M + tl.arange(0, TILE_M)
    row_mask = rows < count
    ks = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    k_mask = ks < H
    tile_mask = row_mask[:, None] & k_mask[None, :]
    acc_tile = acc_ptr + rows.to(tl.int64)[:, None] * stride_acc + ks[None, :]
    acc = tl.zeros((TILE_M, BLOCK_H), dtype=tl.float32)
    if first == 0:
        acc = tl.load(acc_tile, mask=tile_mask, other=0.0)
    du_rows = du_ptr + rows.to(tl.int64)[:, None] * stride_du
    for vt in range(0, n_vtiles):
        if tile_is_live(keep_ptr, pid_m * stride_keep + vt, FILTER):
            local = vt * TILE_V + tl.arange(0, TILE_V)
            cols = v_lo + local
            col_mask = cols < v_hi
            du = tl.load(du_rows + local[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_wv + ks[None, :] * stride_wk,
                        mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(du, w, acc, input_precision=DOT_PRECISION)
    if last != 0:
        at = row_positions(idx_ptr, rows, row_mask, HAS_INDEX)
        dh_tile = dh_ptr + at.to(tl.int64)[:, None] * stride_dm + ks[None, :]
        tl.store(dh_tile, acc.to(dh_ptr.dtype.element_ty), mask=tile_mask)
    else:
        tl.store(acc_tile, acc, mask=tile_mask)


@flags_from_pointers(HAS_INDEX="idx_ptr", FILTER="keep_ptr")
@triton.jit
def grad_weight_kernel(
    du_ptr, h_ptr, idx_ptr, count_ptr, keep_ptr, dw_ptr,
    M, V, H, v_lo, v_hi, accumulate,
    stride_du, stride_hm, stride_hk, stride_keep, stride_dv,
    HAS_INDEX: tl.constexpr, FILTER: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TILE_M: tl.constexpr, TILE_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dW[tile, ks] (+)= Σ over the row tiles of G[rows, tile]ᵀ · h[rows, ks]: the block's
    whole reduction in one fp32 accumulator, added to dW (``accumulate``, a runtime flag as in
    ``grad_hidden_kernel``) and rounded to its dtype once per row block."""
    pid_v = tl.program_id(0)
    pid_h = tl.program_id(1)
    local = pid_v * TILE_V + tl.arange(0, TILE_V)
    cols = v_lo + local
    col_mask = cols < v_hi
    ks = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    k_mask = ks < H
    acc = tl.zeros((TILE_V, BLOCK_H), dtype=tl.float32)
    count = tl.load(count_ptr)
    for mt in range(0, tl.cdiv(count, TILE_M)):
        if tile_is_live(keep_ptr, mt * stride_keep + pid_v, FILTER):
            rows = mt * TILE_M + tl.arange(0, TILE_M)
            row_mask = rows < count
            du = tl.load(du_ptr + rows.to(tl.int64)[:, None] * stride_du + local[None, :],
                         mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            at = row_positions(idx_ptr, rows, row_mask, HAS_INDEX)
            h = tl.load(h_ptr + at.to(tl.int64)[:, None] * stride_hm + ks[None, :] * stride_hk,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(tl.trans(du), h, acc, input_precision=DOT_PRECISION)
    out = dw_ptr + cols.to(tl.int64)[:, None] * stride_dv + ks[None, :]
    out_mask = col_mask[:, None] & k_mask[None, :]
    if accumulate != 0:
        acc += tl.load(out, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=out_mask)


def workspace_shape(rows: int, vocab: int, hidden: int, elem_bytes: int, tile_m: int, tile_v: int,
                    budget_bytes: int, need_hidden: bool = True) -> tuple[int, int]:
    """(rows per block, vocabulary columns per chunk) of the backward's workspace.

    The workspace is the fp32 ∂h accumulator of a row block (4·hidden bytes a row, when ∂h is
    needed) plus G, [block rows, chunk] of ``elem_bytes``. The whole batch is one block when its
    accumulator fits half the budget; else blocks of whole ``tile_m`` tiles take half. The chunk
    is a multiple of ``tile_v`` filling the rest (at least one tile, at most the vocabulary).
    """
    dh_row = 4 * hidden if need_hidden else 0
    block = rows
    if rows * dh_row > budget_bytes // 2:
        block = max(tile_m, budget_bytes // 2 // dh_row // tile_m * tile_m)
    block = max(1, min(block, rows))
    fit = (budget_bytes - block * dh_row) // max(1, block * elem_bytes) // tile_v * tile_v
    return block, max(tile_v, min(fit, triton.cdiv(vocab, tile_v) * tile_v))


def block_count(count: Tensor | None, lo: int, hi: int, device: torch.device) -> Tensor:
    """The live rows of the block [lo, hi) as the kernels read them: int32 [1] on the device."""
    if count is None:
        return live_count(hi - lo, device)
    return (count - lo).clamp_(0, hi - lo)


def rows_grads(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor, grad: Tensor,
               temperature: float, softcap: float | None, need_hidden: bool, need_weight: bool, need_bias: bool,
               filter_eps: float = 0.0, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
               index: Tensor | None = None, count: Tensor | None = None
               ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of Σ_n grad[n]·logp[n] over the counted rows.

    Args:
        hidden [M, H] (or every row [N, H] with ``index`` [M]), weight [V, H], bias [V] | None,
            targets [M] int64: as in ``rows_logprobs``.
        lse: [M] float32 from the forward. grad: [M] float32, ∂L/∂logp per row.
        need_*: which gradients to compute (the others are returned as None).
        filter_eps: 0 = exact; > 0 skips the products of tiles with |onehot − softmax| < filter_eps.
        workspace_bytes: budget of the backward's scratch memory (``workspace_shape``).
        count: int32 [1] on the device, or None (= M): rows i >= count are padding, skipped
            (see ``rows_logprobs``); no host synchronisation either way.

    Returns:
        (dhidden shaped like hidden in hidden's dtype (zero on rows not in ``index``), dweight
        [V, H] in weight's dtype, dbias [V] float32), or None where not needed. dhidden is
        accumulated in fp32 and rounded once; dweight in fp32 within a row block, rounded once
        per block (once in all when the batch fits one block).
    """
    m, h = targets.shape[0], hidden.shape[1]
    v = weight.shape[0]
    dh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    need_bias = need_bias and bias is not None
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else None  # all written
    db = weight.new_zeros(v, dtype=torch.float32) if need_bias else None
    if m == 0 or not (need_hidden or need_weight or need_bias):
        return dh, None if dw is None else dw.zero_(), db
    device = hidden.device
    tile_m, tile_v = backward_tiles(device)
    block, chunk = workspace_shape(m, v, h, weight.element_size(), tile_m, tile_v, workspace_bytes, need_hidden)
    m_tiles, v_tiles = triton.cdiv(block, tile_m), chunk // tile_v
    targets, lse, grad = targets.contiguous(), lse.float().contiguous(), grad.float().contiguous()
    du = weight.new_empty(block, chunk)
    acc = weight.new_empty(block, h, dtype=torch.float32) if need_hidden else None
    dbp = weight.new_empty(m_tiles, chunk, dtype=torch.float32) if need_bias else None
    filtering = filter_eps > 0
    keep = torch.empty(m_tiles, v_tiles, dtype=torch.int32, device=device) if filtering else None
    stride_keep = keep.stride(0) if filtering else 0
    tiles = {"TILE_M": tile_m, "TILE_V": tile_v}
    # Always an index, unlike the forward's: the kernels see one row block at a time, and
    # idx[rows] says where its rows sit in hidden and dh.
    idx = index if index is not None else torch.arange(m, device=device)
    precision = dot_precision(weight.dtype)
    for r_lo in range(0, m, block):
        r_hi = min(r_lo + block, m)
        rows = slice(r_lo, r_hi)
        live = block_count(count, r_lo, r_hi, device)
        if need_bias:
            dbp.zero_()  # tiles past the live rows are skipped, and must add nothing
        for v_lo in range(0, v, chunk):
            v_hi = min(v_lo + chunk, v)
            used_tiles = triton.cdiv(v_hi - v_lo, tile_v)
            launch(logit_grads_kernel, lambda meta, n=used_tiles: (m_tiles, n),
                   h_ptr=hidden, w_ptr=weight, b_ptr=bias, y_ptr=targets[rows], idx_ptr=idx[rows], count_ptr=live,
                   lse_ptr=lse[rows], g_ptr=grad[rows], du_ptr=du, dbp_ptr=dbp, keep_ptr=keep,
                   M=r_hi - r_lo, V=v, H=h, v_lo=v_lo, v_hi=v_hi,
                   stride_hm=hidden.stride(0), stride_hk=hidden.stride(1), stride_wv=weight.stride(0),
                   stride_wk=weight.stride(1), stride_b=bias.stride(0) if bias is not None else 0,
                   stride_du=du.stride(0), stride_dbp=dbp.stride(0) if need_bias else 0, stride_keep=stride_keep,
                   inv_temp=1.0 / temperature, softcap=1.0 if softcap is None else softcap,
                   filter_eps=float(filter_eps), HAS_SOFTCAP=softcap is not None, DOT_PRECISION=precision,
                   **tiles, device=device, family="producer")
            if need_bias:
                db[v_lo:v_hi] += dbp[:, :v_hi - v_lo].sum(0)  # fixed-order reduction over row tiles
            if need_hidden:
                launch(grad_hidden_kernel, lambda meta: (m_tiles, triton.cdiv(h, meta["BLOCK_H"])),
                       du_ptr=du, w_ptr=weight, idx_ptr=idx[rows], count_ptr=live, keep_ptr=keep, acc_ptr=acc,
                       dh_ptr=dh, M=r_hi - r_lo, V=v, H=h, v_lo=v_lo, v_hi=v_hi, n_vtiles=used_tiles,
                       first=int(v_lo == 0), last=int(v_hi == v),
                       stride_du=du.stride(0), stride_wv=weight.stride(0), stride_wk=weight.stride(1),
                       stride_keep=stride_keep, stride_acc=acc.stride(0), stride_dm=dh.stride(0),
                       DOT_PRECISION=precision, **tiles, device=device, family="gemm")
            if need_weight:
                launch(grad_weight_kernel, lambda meta, n=used_tiles: (n, triton.cdiv(h, meta["BLOCK_H"])),
                       du_ptr=du, h_ptr=hidden, idx_ptr=idx[rows], count_ptr=live, keep_ptr=keep, dw_ptr=dw,
                       M=r_hi - r_lo, V=v, H=h, v_lo=v_lo, v_hi=v_hi, accumulate=int(r_lo > 0),
                       stride_du=du.stride(0), stride_hm=hidden.stride(0), stride_hk=hidden.stride(1),
                       stride_keep=stride_keep, stride_dv=dw.stride(0),
                       DOT_PRECISION=precision, **tiles, device=device, family="gemm")
    return dh, dw, db
