"""Backward kernels: ∂hidden, ∂weight, ∂bias from per-row upstream scales, recomputing logits.

For a counted row n with upstream scale g_n (= ∂L/∂logp_n) and saved log-sum-exp lse_n,
∂L/∂z = g_n (onehot − softmax); chained through softcap and temperature into ∂u, then
∂h = ∂u W, ∂W = ∂uᵀ h, ∂b = Σ_n ∂u (docs/spin-math.md).

Everything runs inside one workspace of ``workspace_bytes`` (``workspace_shape``): the rows in
blocks (all of them in one block when their fp32 ∂h fits half the budget) and, per block, the
vocabulary in chunks. Per (block, chunk), three kernels, each the single owner of what it writes
(no atomics: repeated runs are bitwise identical):

* ``logit_grads_kernel`` recomputes the chunk's logit tiles on chip (one program per
  row tile × vocabulary tile), forms ∂u and writes it, in the products' dtype (the inputs', or
  fp32 when hidden and weight differ: ``config.compute_dtype``), into a
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

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .config import backward_tiles, compute_dtype, dot_precision, flags_from_pointers, launch
from .tiles import live_count, logit_grad_tile, logit_tile, matching, row_positions

# The backward's scratch memory: G and the fp32 ∂h accumulator of a row block. Under 64 MiB with
# room for the small per-row buffers (lse, row indices, bias partial sums).
DEFAULT_WORKSPACE_BYTES = 56 * 2**20


@flags_from_pointers(HAS_BIAS="b_ptr", HAS_INDEX="idx_ptr", FILTER="keep_ptr", COMPUTE_DB="dbp_ptr",
                     HAS_ENTROPY="ent_ptr")
@triton.jit
def logit_grads_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, idx_ptr, count_ptr, lse_ptr, g_ptr, ent_ptr, du_ptr, dbp_ptr, keep_ptr,
    M, V, H, v_lo, v_hi,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_b, stride_ent, stride_du, stride_dbp, stride_keep,
    inv_temp, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_INDEX: tl.constexpr, FILTER: tl.constexpr,
    COMPUTE_DB: tl.constexpr, HAS_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
    mean_logit = g  # E_p[z] = lse − H, unused without HAS_ENTROPY
    g_entropy = g
    if HAS_ENTROPY:  # ent_ptr: [2, M], the rows' entropies and their upstream gradients
        entropy = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        g_entropy = tl.load(ent_ptr + stride_ent + rows, mask=row_mask, other=0.0)
        mean_logit = tl.where(row_mask, lse - entropy, 0.0)  # not inf − 0 on padding rows
    z, t = logit_tile(h_ptr, w_ptr, b_ptr, row_positions(idx_ptr, rows, row_mask, HAS_INDEX), cols, row_mask,
                      col_mask, H, stride_hm, stride_hk, stride_wv, stride_wk, stride_b, inv_temp, softcap,
                      HAS_BIAS, HAS_SOFTCAP, TILE_M, TILE_V, BLOCK_K, DOT_PRECISION)
    du, dz_unscaled = logit_grad_tile(z, t, y, cols, col_mask, lse, g, inv_temp, mean_logit, g_entropy, HAS_SOFTCAP,
                                      HAS_ENTROPY)
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
            du, w = matching(du, w)
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
            du, h = matching(du, h)
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


@dataclass
class _Call:
    """What every launch of one ``rows_grads`` call shares: the inputs as the kernels read them,
    the outputs they write, and the per-row vectors (``rows`` slices them per row block)."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    targets: Tensor
    lse: Tensor
    grad: Tensor
    entropy: Tensor | None  # [2, M]: the rows' entropies and ∂L/∂entropy, or None
    idx: Tensor  # where counted row i sits in hidden and dh
    count: Tensor | None
    inv_temp: float
    softcap: float | None
    filter_eps: float
    dh: Tensor | None
    dw: Tensor | None
    db: Tensor | None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the products and of G (``config.compute_dtype``)."""
        return compute_dtype(self.hidden.dtype, self.weight.dtype)

    @property
    def precision(self) -> str:
        return dot_precision(self.dtype)


@dataclass
class _Workspace:
    """The backward's scratch memory (``workspace_shape``): G [block, chunk] in the products'
    dtype, the fp32 ∂h accumulator of a row block, ∂b's partial sums per row tile and, with the
    gradient filter, whether each (row tile, vocabulary tile) of G is live."""

    block: int
    chunk: int
    tile_m: int
    tile_v: int
    du: Tensor
    acc: Tensor | None
    dbp: Tensor | None
    keep: Tensor | None

    @staticmethod
    def allocate(call: _Call, rows: int, budget: int) -> _Workspace:
        weight, (v, h) = call.weight, call.weight.shape
        tile_m, tile_v = backward_tiles(weight.device)
        block, chunk = workspace_shape(rows, v, h, call.dtype.itemsize, tile_m, tile_v, budget, call.dh is not None)
        m_tiles = triton.cdiv(block, tile_m)
        return _Workspace(
            block, chunk, tile_m, tile_v,
            du=weight.new_empty(block, chunk, dtype=call.dtype),
            acc=weight.new_empty(block, h, dtype=torch.float32) if call.dh is not None else None,
            dbp=weight.new_empty(m_tiles, chunk, dtype=torch.float32) if call.db is not None else None,
            keep=weight.new_empty(m_tiles, chunk // tile_v, dtype=torch.int32) if call.filter_eps > 0 else None)

    @property
    def m_tiles(self) -> int:
        return triton.cdiv(self.block, self.tile_m)

    @property
    def tiles(self) -> dict:
        return {"TILE_M": self.tile_m, "TILE_V": self.tile_v}

    @property
    def stride_keep(self) -> int:
        return self.keep.stride(0) if self.keep is not None else 0


def rows_grads(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor, grad: Tensor,
               temperature: float, softcap: float | None, need_hidden: bool, need_weight: bool, need_bias: bool,
               filter_eps: float = 0.0, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
               index: Tensor | None = None, count: Tensor | None = None, entropy: Tensor | None = None,
               grad_entropy: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of Σ_n grad[n]·logp[n] (+ grad_entropy[n]·entropy[n]) over the counted rows.

    Args:
        hidden [M, H] (or every row [N, H] with ``index`` [M]), weight [V, H], bias [V] | None,
            targets [M] int64: as in ``rows_logprobs``.
        lse: [M] float32 from the forward. grad: [M] float32, ∂L/∂logp per row.
        need_*: which gradients to compute (the others are returned as None).
        filter_eps: 0 = exact; > 0 skips the products of tiles with |onehot − softmax| < filter_eps.
        workspace_bytes: budget of the backward's scratch memory (``workspace_shape``).
        count: int32 [1] on the device, or None (= M): rows i >= count are padding, skipped
            (see ``rows_logprobs``); no host synchronisation either way.
        entropy, grad_entropy: [M] float32 (both or neither): the rows' entropies from the
            forward and ∂L/∂entropy per row, when the entropies are differentiated.

    Returns:
        (dhidden shaped like hidden in hidden's dtype (zero on rows not in ``index``), dweight
        [V, H] in weight's dtype, dbias [V] float32), or None where not needed. dhidden is
        accumulated in fp32 and rounded once; dweight in fp32 within a row block, rounded once
        per block (once in all when the batch fits one block).
    """
    m, v = targets.shape[0], weight.shape[0]
    dh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else None  # all written
    db = weight.new_zeros(v, dtype=torch.float32) if need_bias and bias is not None else None
    if m == 0 or (dh is None and dw is None and db is None):
        return dh, None if dw is None else dw.zero_(), db
    # Always an index, unlike the forward's: the kernels see one row block at a time, and
    # idx[rows] says where its rows sit in hidden and dh.
    ent = None if grad_entropy is None else torch.stack([entropy.float(), grad_entropy.float()])
    call = _Call(hidden, weight, bias, targets.contiguous(), lse.float().contiguous(), grad.float().contiguous(), ent,
                 index if index is not None else torch.arange(m, device=hidden.device), count, 1.0 / temperature,
                 softcap, float(filter_eps), dh, dw, db)
    ws = _Workspace.allocate(call, m, workspace_bytes)
    for r_lo in range(0, m, ws.block):
        rows = slice(r_lo, min(r_lo + ws.block, m))
        live = block_count(count, rows.start, rows.stop, hidden.device)
        if db is not None:
            ws.dbp.zero_()  # tiles past the live rows are skipped, and must add nothing
        for v_lo in range(0, v, ws.chunk):
            v_hi = min(v_lo + ws.chunk, v)
            _logit_grads(call, ws, rows, live, v_lo, v_hi)
            if db is not None:
                db[v_lo:v_hi] += ws.dbp[:, :v_hi - v_lo].sum(0)  # fixed-order reduction over row tiles
            if dh is not None:
                _grad_hidden(call, ws, rows, live, v_lo, v_hi)
            if dw is not None:
                _grad_weight(call, ws, rows, live, v_lo, v_hi)
    return dh, dw, db


def _logit_grads(call: _Call, ws: _Workspace, rows: slice, live: Tensor, v_lo: int, v_hi: int) -> None:
    """G = ∂u of the block's rows × the chunk's columns (and ∂b's partial sums, the filter's flags)."""
    h, w, b, ent = call.hidden, call.weight, call.bias, call.entropy
    launch(logit_grads_kernel, lambda meta: (ws.m_tiles, triton.cdiv(v_hi - v_lo, ws.tile_v)),
           h_ptr=h, w_ptr=w, b_ptr=b, y_ptr=call.targets[rows], idx_ptr=call.idx[rows], count_ptr=live,
           lse_ptr=call.lse[rows], g_ptr=call.grad[rows], ent_ptr=None if ent is None else ent[:, rows],
           du_ptr=ws.du, dbp_ptr=ws.dbp, keep_ptr=ws.keep,
           M=rows.stop - rows.start, V=w.shape[0], H=w.shape[1], v_lo=v_lo, v_hi=v_hi,
           stride_hm=h.stride(0), stride_hk=h.stride(1), stride_wv=w.stride(0), stride_wk=w.stride(1),
           stride_b=b.stride(0) if b is not None else 0, stride_ent=0 if ent is None else ent.stride(0),
           stride_du=ws.du.stride(0),
           stride_dbp=ws.dbp.stride(0) if ws.dbp is not None else 0, stride_keep=ws.stride_keep,
           inv_temp=call.inv_temp, softcap=1.0 if call.softcap is None else call.softcap,
           filter_eps=call.filter_eps, HAS_SOFTCAP=call.softcap is not None, DOT_PRECISION=call.precision,
           **ws.tiles, device=h.device, family="producer")


def _grad_hidden(call: _Call, ws: _Workspace, rows: slice, live: Tensor, v_lo: int, v_hi: int) -> None:
    """acc (+)= G · W[chunk]; on the last chunk, dh[rows] = acc rounded once."""
    w, width = call.weight, call.weight.shape[1]
    launch(grad_hidden_kernel, lambda meta: (ws.m_tiles, triton.cdiv(width, meta["BLOCK_H"])),
           du_ptr=ws.du, w_ptr=w, idx_ptr=call.idx[rows], count_ptr=live, keep_ptr=ws.keep, acc_ptr=ws.acc,
           dh_ptr=call.dh, M=rows.stop - rows.start, V=w.shape[0], H=width, v_lo=v_lo, v_hi=v_hi,
           n_vtiles=triton.cdiv(v_hi - v_lo, ws.tile_v), first=int(v_lo == 0), last=int(v_hi == w.shape[0]),
           stride_du=ws.du.stride(0), stride_wv=w.stride(0), stride_wk=w.stride(1), stride_keep=ws.stride_keep,
           stride_acc=ws.acc.stride(0), stride_dm=call.dh.stride(0),
           DOT_PRECISION=call.precision, **ws.tiles, device=w.device, family="gemm")


def _grad_weight(call: _Call, ws: _Workspace, rows: slice, live: Tensor, v_lo: int, v_hi: int) -> None:
    """dW[chunk] (+)= Gᵀ · h[rows], the block's reduction in fp32, rounded once per block."""
    hid, w = call.hidden, call.weight
    v_tiles = triton.cdiv(v_hi - v_lo, ws.tile_v)
    launch(grad_weight_kernel, lambda meta: (v_tiles, triton.cdiv(w.shape[1], meta["BLOCK_H"])),
           du_ptr=ws.du, h_ptr=hid, idx_ptr=call.idx[rows], count_ptr=live, keep_ptr=ws.keep, dw_ptr=call.dw,
           M=rows.stop - rows.start, V=w.shape[0], H=w.shape[1], v_lo=v_lo, v_hi=v_hi, accumulate=int(rows.start > 0),
           stride_du=ws.du.stride(0), stride_hm=hid.stride(0), stride_hk=hid.stride(1), stride_keep=ws.stride_keep,
           stride_dv=call.dw.stride(0), DOT_PRECISION=call.precision, **ws.tiles, device=w.device, family="gemm")
