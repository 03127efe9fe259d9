"""impl="cpu": the fused C++ kernels of csrc/ (ATen + OpenMP threads through at::parallel_for).

The kernels (``torch.ops.spin_kernels_cpu.rows_forward`` / ``rows_backward``) never hold more
than a fixed workspace of logits: per thread one [row_tile, vocab_tile] fp32 tile and a
[row_tile, H] share of dhidden (plus, for bf16/fp16 inputs, an fp32 copy of one weight tile),
independent of N and V. Matrix products run in oneDNN when this torch exports it (on AMD
EPYC ~2.2x faster than the wheels' MKL), else in BLAS (``gemm``).

The SPIN path computes the gradients in the forward pass: a forward over the counted rows, the
SPIN epilogue, then the gradient pass, which recomputes the logits (8·N·H·V flops, no memory
beyond the workspace). ``store_bytes`` > 0 trades memory for the 6·N·H·V path: groups of whole
pairs whose logits fit the store keep them from the forward to the gradient pass.

Importing this module raises ImportError when the extension was not built, which the registry
records as the reason impl="cpu" is unavailable.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from ..layout import CountedRows, pair_groups, row_grads, seq_logps
from ..objective import spin_terms
from .base import Backend, HeadSpec, acc_dtype
from .torch_chunked import TorchChunked

try:  # loading the library registers torch.ops.spin_kernels_cpu
    importlib.import_module("spin_kernels._C")
except ImportError as exc:
    raise ImportError(f"spin_kernels._C is not importable ({exc}); reinstall spin_kernels with a C++ compiler "
                      f"available (pip install --no-build-isolation -e .)") from exc

_OPS = torch.ops.spin_kernels_cpu

DEFAULT_VOCAB_TILE = 512
DEFAULT_MAX_ROW_TILE = 512
DEFAULT_STORE_BYTES = 0
GEMMS = ("auto", "onednn", "blas")


def default_row_tile(hidden_size: int) -> int:
    """Rows per block: large enough that the weight is streamed rarely (it is read once per
    block) and the products stay efficient, small enough that the per-thread [rows, H] dhidden
    share stays ~2 MiB."""
    return max(64, min(DEFAULT_MAX_ROW_TILE, (1 << 19) // max(hidden_size, 1)))


def default_gemm() -> str:
    """The engine gemm="auto" uses on this installation: "onednn" or "blas"."""
    return _OPS.default_gemm()


class CpuFused(Backend):
    """The C++ kernels. ``store_bytes`` bounds the SPIN path's kept logits (0: recompute them);
    ``parts`` (threads sharing the vocabulary; default torch.get_num_threads()), ``row_tile``
    and ``vocab_tile`` shape the tiling (tests use tiny tiles to exercise every boundary on small
    shapes); ``gemm`` picks the matrix-product engine: "auto", "onednn" or "blas"."""

    name = "cpu"

    def __init__(self, store_bytes: int = DEFAULT_STORE_BYTES, parts: int | None = None,
                 row_tile: int | None = None, vocab_tile: int = DEFAULT_VOCAB_TILE, gemm: str = "auto"):
        if store_bytes < 0 or (parts is not None and parts < 1) or (row_tile is not None and row_tile < 1) \
                or vocab_tile < 1:
            raise ValueError("store_bytes must be >= 0; parts, row_tile and vocab_tile >= 1")
        if gemm not in GEMMS:
            raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
        self.store_bytes = int(store_bytes)
        self.parts, self.row_tile, self.vocab_tile, self.gemm = parts, row_tile, int(vocab_tile), gemm
        self._reference = TorchChunked()  # float64 (gradcheck precision) is the torch path's job

    # -- plumbing ---------------------------------------------------------------------------

    def _tiling(self, hidden_size: int) -> tuple[int, int, int]:
        parts = self.parts or torch.get_num_threads()
        return parts, self.row_tile or default_row_tile(hidden_size), self.vocab_tile

    @staticmethod
    def _kernel_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor):
        return hidden.contiguous(), weight.contiguous(), bias, targets.long().contiguous()

    @staticmethod
    def _softcap(spec: HeadSpec) -> float:
        return 0.0 if spec.softcap is None else spec.softcap

    def _forward(self, h, w, b, y, spec, store=None, index=None):
        return _OPS.rows_forward(h, w, b, y, spec.temperature, self._softcap(spec), store, *self._tiling(h.shape[1]),
                                 index, self.gemm)

    def _backward(self, h, w, b, y, lse, grad, spec, dh, dw, db, store=None, index=None):
        _OPS.rows_backward(h, w, b, y, lse.float().contiguous(), grad.float().contiguous(), spec.temperature,
                           self._softcap(spec), store, *self._tiling(h.shape[1]), dh, dw, db, index, self.gemm)

    @staticmethod
    def _alloc_grads(hidden, weight, bias, needs):
        """dhidden shaped like ``hidden`` (zeros: the kernels write the counted rows only),
        dweight and dbias zeroed for accumulation; fp32."""
        f32 = torch.float32
        dh = hidden.new_zeros(hidden.shape, dtype=f32) if needs.hidden else None
        dw = weight.new_zeros(weight.shape, dtype=f32) if needs.weight else None
        db = weight.new_zeros(weight.shape[0], dtype=f32) if (bias is not None and needs.bias) else None
        return dh, dw, db

    # -- Backend API ------------------------------------------------------------------------

    def rows_forward(self, hidden, weight, bias, targets, spec, index=None, count=None):
        if acc_dtype(hidden, weight, bias) == torch.float64:
            return self._reference.rows_forward(hidden, weight, bias, targets, spec, index)
        h, w, b, y = self._kernel_inputs(hidden, weight, bias, targets)
        return self._forward(h, w, b, y, spec, index=index)

    def rows_backward(self, hidden, weight, bias, targets, lse, grad, spec, needs, index=None, count=None):
        if acc_dtype(hidden, weight, bias) == torch.float64:
            return self._reference.rows_backward(hidden, weight, bias, targets, lse, grad, spec, needs, index)
        h, w, b, y = self._kernel_inputs(hidden, weight, bias, targets)
        dh, dw, db = self._alloc_grads(h, w, bias, needs)
        self._backward(h, w, b, y, lse, grad, spec, dh, dw, db, index=index)
        return dh, dw, db

    def spin_forward_backward(self, hidden, weight, bias, rows: CountedRows, ref_logps, beta, loss_type,
                              average, spec, needs):
        """Forward, the SPIN epilogue, then the gradients, per group of whole pairs: one group of
        all pairs without a store; with one, groups whose logits fit it (a pair alone too large
        for it is recomputed). The kernels read the counted rows of hidden [N, H] through
        rows.index and write dhidden [N, H] through it.
        """
        if acc_dtype(hidden, weight, bias) == torch.float64:
            return self._reference.spin_forward_backward(hidden, weight, bias, rows, ref_logps, beta, loss_type,
                                                         average, spec, needs)
        h, w, b, y = self._kernel_inputs(hidden, weight, bias, rows.targets)
        vocab = w.shape[0]
        dh, dw, db = self._alloc_grads(h, w, bias, needs)
        f32 = torch.float32
        seq_out = h.new_zeros(rows.num_seqs, dtype=f32)
        loss = h.new_zeros((), dtype=f32)
        ref = ref_logps.to(f32)
        num_pairs = max(rows.num_seqs // 2, 1)
        pair_offsets = rows.offsets[::2].tolist()  # host copy: the tiling is decided on the host
        store_rows = self.store_bytes // (4 * vocab)
        groups = pair_groups(pair_offsets, store_rows) if store_rows else [(0, len(pair_offsets) - 1)]
        kept = [n for n in (pair_offsets[q] - pair_offsets[p] for p, q in groups) if n <= store_rows]
        store = h.new_empty(max(kept) * vocab, dtype=f32) if kept else None
        for p, q in groups:
            lo, hi = pair_offsets[p], pair_offsets[q]
            group_store = store if hi - lo <= store_rows else None
            offsets = rows.offsets[2 * p:2 * q + 1]
            index = rows.index[lo:hi]
            logp, lse = self._forward(h, w, b, y[lo:hi], spec, group_store, index)
            seq = seq_logps(logp, offsets, average)
            group_loss, seq_grad = spin_terms(seq, ref[2 * p:2 * q], beta, loss_type, num_pairs)
            seq_out[2 * p:2 * q] = seq
            loss += group_loss
            g = row_grads(seq_grad, offsets, rows.seq[lo:hi] - 2 * p, average)
            if hi > lo and bool(g.ne(0).any()):  # hinge pairs past the margin have no gradient
                self._backward(h, w, b, y[lo:hi], lse, g, spec, dh, dw, db, group_store, index)
        return seq_out, loss, dh, dw, db


def make_backend() -> Backend:
    return CpuFused()


__all__ = ["CpuFused", "make_backend", "default_row_tile", "default_gemm"]
