"""Device functions shared by the forward and backward kernels: one logit tile, its gradient.

A logit tile is ``z[rows, cols]`` for a block of counted rows and a block of the vocabulary,
computed on chip with fp32 accumulation and never written to memory. Everything here avoids
libdevice (tanh, log1p) so that the Triton interpreter can run it on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def live_count(rows: int, device: torch.device) -> torch.Tensor:
    """The kernels' ``count_ptr`` when every one of ``rows`` rows is live: int32 [1], filled on
    the device (no host-to-device copy to wait for)."""
    return torch.full((1,), rows, dtype=torch.int32, device=device)


@triton.jit
def tanh_via_exp(x):
    """tanh(x) = sign(x)·(1 − e^{−2|x|}) / (1 + e^{−2|x|}): e^{−2|x|} ≤ 1 never overflows."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def row_positions(idx_ptr, rows, row_mask, HAS_INDEX: tl.constexpr):
    """Where counted rows ``rows`` sit in hidden (and in a dhidden shaped like it): idx[rows]
    when hidden holds every row of the batch, else the rows themselves."""
    at = rows.to(tl.int64)
    if HAS_INDEX:
        at = tl.load(idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    return at


@triton.jit
def matching(a, b):
    """The operands of a tile product as ``tl.dot`` takes them: unchanged when their dtypes agree
    (the launcher picks that case at compile time), else both in fp32, so that a fp32 operand is
    never rounded to its half-precision partner's dtype (``config.compute_dtype``)."""
    if a.dtype != b.dtype:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


@triton.jit
def logit_tile(h_ptr, w_ptr, b_ptr, h_rows_at, cols, row_mask, col_mask, H,
               stride_hm, stride_hk, stride_wv, stride_wk, stride_b, inv_temp, softcap,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(z, t) for the tile rows × cols: z the logits (fp32, [BLOCK_M, BLOCK_V]); t = tanh(u/c),
    needed by the softcap chain rule (equal to z when there is no softcap). ``h_rows_at`` are
    the tile's rows' positions in hidden (see ``row_positions``).

    Row and column offsets are widened to int64 before they meet a stride: N·V and V·H can
    exceed 2³¹.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    h_rows = h_ptr + h_rows_at.to(tl.int64)[:, None] * stride_hm
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        a = tl.load(h_rows + ks[None, :] * stride_hk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_cols + ks[:, None] * stride_wk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        a, b = matching(a, b)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols.to(tl.int64) * stride_b, mask=col_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    u = acc * inv_temp
    if HAS_SOFTCAP:
        t = tanh_via_exp(u / softcap)
        z = softcap * t
    else:
        t = u
        z = u
    return z, t


@triton.jit
def logit_grad_tile(z, t, y, cols, col_mask, lse, g, inv_temp, mean_logit, g_entropy,
                    HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr):
    """(du, dz_unscaled): du = ∂L/∂u for the tile (chained through softcap and temperature) of
    L = Σ g logp (+ Σ g_entropy H with HAS_ENTROPY: ∂H/∂z = p (μ − z), μ = E_p[z] = lse − H the
    rows' ``mean_logit``);
    dz_unscaled = |onehot − softmax| (and |p (μ − z)|), the quantity the gradient filter compares
    with its threshold (it does not depend on the upstream scales)."""
    p = tl.where(col_mask[None, :], tl.exp(z - lse[:, None]), 0.0)
    onehot = (cols[None, :] == y[:, None]).to(tl.float32)
    dz_unscaled = onehot - p
    du = g[:, None] * dz_unscaled
    if HAS_ENTROPY:
        entropy_grad = p * (mean_logit[:, None] - z)
        du += g_entropy[:, None] * entropy_grad
        dz_unscaled = tl.maximum(tl.abs(dz_unscaled), tl.abs(entropy_grad))
    if HAS_SOFTCAP:
        du = du * (1.0 - t * t)
    return du * inv_temp, dz_unscaled
