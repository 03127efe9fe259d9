"""Forward kernel: per-row log-sum-exp and target logit over the vocabulary, no [M, V] logits.

Grid = (row tiles, vocabulary splits). Each program walks the vocabulary blocks of its split,
folds every on-chip logit tile into an online log-sum-exp (running max ``m`` and scaled sum
``l``) and picks the target logit when the target falls in the block. Partial results
``[splits, M]`` are merged by a fixed-order reduction on the host side (no atomics), so the
result is bitwise reproducible. Splitting the vocabulary keeps the GPU busy when M is small.

With a statistics buffer (``st_ptr``, asked for with ``stats=True``) the same tiles also give,
per row: ``c`` = Σ e (z − m) with e = exp(z − m) (rescaled with ``l`` as m grows), whence the
entropy log l − c / l (no cancellation: both terms are >= 0); Σ z, whence the mean logit; and
the largest logit before the target, whence whether argmax (its first maximal index, as
torch.argmax) is the target. Without it the kernel is compiled without any of that work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .config import compute_dtype, dot_precision, flags_from_pointers, launch, split_align
from .tiles import live_count, logit_tile, row_positions


@flags_from_pointers(HAS_BIAS="b_ptr", HAS_INDEX="idx_ptr", HAS_STATS="st_ptr")
@triton.jit
def lse_partials_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, idx_ptr, count_ptr, m_ptr, l_ptr, zy_ptr, st_ptr,
    M, V, H, split_size,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_b, stride_st,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_STATS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    # Rows past count (read on device: no host sync) are padding and get no work at all.
    count = tl.load(count_ptr)
    if pid_m * BLOCK_M >= count:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < count
    h_rows_at = row_positions(idx_ptr, rows, row_mask, HAS_INDEX)
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    v_lo = split * split_size
    v_hi = tl.minimum(v_lo + split_size, V)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_M,), dtype=tl.float32)
    c_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # the statistics (HAS_STATS)
    z_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    before = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_hi
        z, _ = logit_tile(h_ptr, w_ptr, b_ptr, h_rows_at, cols, row_mask, col_mask, H,
                          stride_hm, stride_hk, stride_wv, stride_wk, stride_b, inv_temp, softcap,
                          HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        # col_mask matters: a column past v_hi may be a real token that belongs to the next split.
        hit = (cols[None, :] == y[:, None]) & col_mask[None, :]
        zy += tl.sum(tl.where(hit, z, 0.0), axis=1)
        # Every block holds at least one valid column, so m_new is finite from the first block
        # on and exp(m_i - m_new) is exp(-inf) = 0, never nan.
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        rescale = tl.exp(m_i - m_new)
        e = tl.exp(z - m_new[:, None])
        if HAS_STATS:
            # Σ e (z − m_new), the masked columns (z = −inf, e = 0) left out; the running sum moves
            # to the new max as Σ e_old (z − m_old) + (m_old − m_new) Σ e_old, then rescaled (the
            # first block has nothing to move: its shift is 0, not −inf, so that −inf · 0 never
            # occurs). Everything from z: no second logit tile stays live (registers).
            z_real = tl.where(col_mask[None, :], z, 0.0)
            c_tile = tl.sum(e * (z_real - m_new[:, None]), axis=1)
            shift = tl.where(m_i == float("-inf"), 0.0, m_i - m_new)
            c_i = rescale * (c_i + shift * l_i) + c_tile
            z_sum += tl.sum(z_real, axis=1)
            before = tl.maximum(before, tl.max(tl.where(cols[None, :] < y[:, None], z, float("-inf")), axis=1))
        l_i = l_i * rescale + tl.sum(e, axis=1)
        m_i = m_new
    out = split.to(tl.int64) * M + rows
    tl.store(m_ptr + out, m_i, mask=row_mask)
    tl.store(l_ptr + out, l_i, mask=row_mask)
    tl.store(zy_ptr + out, zy, mask=row_mask)
    if HAS_STATS:
        tl.store(st_ptr + out, c_i, mask=row_mask)
        tl.store(st_ptr + stride_st + out, z_sum, mask=row_mask)
        tl.store(st_ptr + 2 * stride_st + out, before, mask=row_mask)


def num_splits(rows: int, vocab: int, device: torch.device, block_m: int = 128) -> int:
    """Vocabulary splits so that row tiles × splits fill the GPU about 4 times over."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = max(1, triton.cdiv(rows, block_m))
    return max(1, min(triton.cdiv(4 * sms, tiles), triton.cdiv(vocab, split_align())))


def rows_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                  temperature: float, softcap: float | None, splits: int | None = None,
                  index: Tensor | None = None, count: Tensor | None = None,
                  stats: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-row log-probs and log-sum-exps of the counted rows (and their statistics).

    Args:
        hidden: [M, H] float16/bfloat16/float32, any strides. With ``index`` [M] (int64), hidden is
            every row [N, H] and row i is hidden[index[i]].
        weight: [V, H] float16/bfloat16/float32, any strides (a tied-embedding view is fine). When
            the two dtypes differ, the products run in fp32 (``config.compute_dtype``).
        bias: [V] or None. targets: [M] int64 in [0, V).
        splits: vocabulary splits of the grid (None: sized from the device).
        count: int32 [1] on the device, or None (= M): only rows i < count are live, the rest
            are padding that costs no vocabulary work (the sync-free layout of ``CountedRows``,
            where M is an upper bound known without reading the data).
        stats: also the rows' statistics.

    Returns:
        (logp [M] float32, lse [M] float32, stats [3, M] float32 or None), 0 on padding rows;
        stats rows: the entropy −Σ p log p, the mean logit Σ z / V, 1.0 where argmax z (the
        first maximal index) is the target, else 0.0.
    """
    m, h = targets.shape[0], hidden.shape[1]
    v = weight.shape[0]
    logp = hidden.new_empty(m, dtype=torch.float32)
    lse = hidden.new_empty(m, dtype=torch.float32)
    if m == 0:
        return logp, lse, hidden.new_empty(3, 0, dtype=torch.float32) if stats else None
    align = split_align()
    splits = num_splits(m, v, hidden.device) if splits is None else splits
    split_size = triton.cdiv(triton.cdiv(v, align), splits) * align
    splits = triton.cdiv(v, split_size)
    parts = torch.empty(6 if stats else 3, splits, m, dtype=torch.float32, device=hidden.device)
    targets = targets.contiguous()
    live = count if count is not None else live_count(m, hidden.device)
    launch(
        lse_partials_kernel,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), splits),
        h_ptr=hidden, w_ptr=weight, b_ptr=bias, y_ptr=targets, idx_ptr=index, count_ptr=live,
        m_ptr=parts[0], l_ptr=parts[1], zy_ptr=parts[2], st_ptr=parts[3] if stats else None,
        M=m, V=v, H=h, split_size=split_size,
        stride_hm=hidden.stride(0), stride_hk=hidden.stride(1), stride_wv=weight.stride(0),
        stride_wk=weight.stride(1), stride_b=bias.stride(0) if bias is not None else 0, stride_st=parts.stride(0),
        inv_temp=1.0 / temperature, softcap=1.0 if softcap is None else softcap,
        HAS_SOFTCAP=softcap is not None, DOT_PRECISION=dot_precision(compute_dtype(hidden.dtype, weight.dtype)),
        device=hidden.device,
    )
    row_max, row_sum, target_logit = parts[:3]
    peak = row_max.max(0).values
    scale = torch.exp(row_max - peak)
    total = (row_sum * scale).sum(0)
    lse = peak + torch.log(total)
    z_target = target_logit.sum(0)
    logp = z_target - lse
    out = None
    if stats:  # the splits' statistics merged as their (max, sum) are
        centered, z_sum, before = parts[3:]
        entropy = torch.log(total) - (scale * (centered + (row_max - peak) * row_sum)).sum(0) / total
        top1 = (z_target > before.max(0).values) & (z_target >= peak)
        out = torch.stack([entropy, z_sum.sum(0) / v, top1.float()])
    if count is not None:  # padding rows were never written
        padding = torch.arange(m, device=hidden.device) >= count
        logp, lse = logp.masked_fill(padding, 0.0), lse.masked_fill(padding, 0.0)
        out = None if out is None else out.masked_fill(padding, 0.0)
    return logp, lse, out
