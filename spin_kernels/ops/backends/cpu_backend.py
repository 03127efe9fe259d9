"""impl="cpu": the fused C++ kernels of csrc/ (ATen + OpenMP threads through at::parallel_for).

The kernels (``torch.ops.spin_kernels_cpu.rows_forward`` / ``rows_backward``) never hold more
than a fixed workspace of logits: per thread one [row_tile, vocab_tile] fp32 tile and a
[row_tile, H] share of dhidden (plus, for bf16/fp16 inputs, an fp32 copy of one weight tile),
independent of N and V. Matrix products run in oneDNN or in BLAS (``gemm``).

The SPIN path computes the gradients in the forward pass: a forward over the counted rows, the
SPIN epilogue, then the gradient pass. It either keeps the logits of groups of whole pairs from
the forward to the gradient pass (6·N·H·V flops; ``store_bytes`` bounds the memory) or
recomputes them (8·N·H·V, no memory beyond the workspace; ``store_bytes=0``).

By default both choices (the engine and keep vs recompute) come from this machine's measured
rule (``cpu_rule.py``: measured once, cached on disk, ``SPIN_KERNELS_CPU_RULE`` overrides);
``CpuFused(gemm=..., store_bytes=...)`` given explicitly overrides the rule.

Importing this module raises ImportError when the extension was not built, which the registry
records as the reason impl="cpu" is unavailable.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..layout import CountedRows, pair_groups, row_grads, seq_logps
from ..objective import spin_terms
from .base import Backend, Grads, RowLogprobs, SpinResult, Upstream, acc_dtype
from .torch_chunked import TorchChunked

if TYPE_CHECKING:
    from ..options import HeadOptions, SpinOptions

try:  # loading the library registers torch.ops.spin_kernels_cpu
    importlib.import_module("spin_kernels._C")
except ImportError as exc:
    raise ImportError(f"spin_kernels._C is not importable ({exc}); reinstall spin_kernels with a C++ compiler "
                      f"available (pip install --no-build-isolation -e .)") from exc

_OPS = torch.ops.spin_kernels_cpu

DEFAULT_VOCAB_TILE = 512
DEFAULT_MAX_ROW_TILE = 512
GEMMS = ("auto", "onednn", "blas")


def default_row_tile(hidden_size: int) -> int:
    """Rows per block: large enough that the weight is streamed rarely (it is read once per
    block) and the products stay efficient, small enough that the per-thread [rows, H] dhidden
    share stays ~2 MiB."""
    return max(64, min(DEFAULT_MAX_ROW_TILE, (1 << 19) // max(hidden_size, 1)))


def default_gemm() -> str:
    """The engine the C++ kernels use for gemm="auto" (oneDNN when this torch exports it, else
    "blas"); the Python backend's "auto" means the measured rule's engine (``cpu_rule``)."""
    return _OPS.default_gemm()


def store_rows_for(pair_rows: list[int], store_bytes: int, vocab: int, row_tile: int) -> int:
    """Rows of logits the SPIN path keeps at once (0: recompute every pair).

    Enough for the largest pair that fits ``store_bytes`` alone, and for groups of at least two
    row blocks (small pairs are grouped so that each block of the kernel still has ``row_tile``
    rows: the weight is read once per block), never more than ``store_bytes``. The store
    actually allocated is the largest group formed (``pair_groups``), so keeping costs about the
    largest pair's logits, not the whole budget.
    """
    budget_rows = store_bytes // (4 * vocab)
    fitting = [n for n in pair_rows if n <= budget_rows]
    if not fitting:
        return 0
    return min(budget_rows, max(max(fitting), 2 * row_tile))


class CpuFused(Backend):
    """The C++ kernels.

    Args:
        store_bytes: bytes of logits the SPIN path may keep (0: recompute them; None: the
            measured rule's choice, ``cpu_rule``).
        parts: threads sharing the vocabulary (default torch.get_num_threads()).
        row_tile, vocab_tile: the tiling (tests use tiny tiles to exercise every boundary on
            small shapes).
        gemm: the matrix-product engine: "onednn", "blas" or "auto" (the measured rule's).
    """

    name = "cpu"

    def __init__(self, store_bytes: int | None = None, parts: int | None = None,
                 row_tile: int | None = None, vocab_tile: int = DEFAULT_VOCAB_TILE, gemm: str = "auto"):
        if (store_bytes is not None and store_bytes < 0) or (parts is not None and parts < 1) \
                or (row_tile is not None and row_tile < 1) or vocab_tile < 1:
            raise ValueError("store_bytes must be >= 0; parts, row_tile and vocab_tile >= 1")
        if gemm not in GEMMS:
            raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
        self._store_bytes = None if store_bytes is None else int(store_bytes)
        self.parts, self.row_tile, self.vocab_tile, self._gemm = parts, row_tile, int(vocab_tile), gemm
        self._reference = TorchChunked()  # float64 (gradcheck precision) is the torch path's job

    def __repr__(self) -> str:
        return (f"cpu(store_bytes={self._store_bytes}, parts={self.parts}, row_tile={self.row_tile}, "
                f"vocab_tile={self.vocab_tile}, gemm={self._gemm!r})")

    def unavailable_on(self, device: torch.device) -> str | None:
        return None if device.type == "cpu" else "it needs CPU tensors"

    @property
    def gemm(self) -> str:
        """The engine passed to the kernels: the one asked for, or the rule's for "auto"."""
        return self._gemm if self._gemm != "auto" else self.rule().gemm

    @property
    def store_bytes(self) -> int:
        """The SPIN path's logits budget: the one asked for, or the rule's (0 if it recomputes)."""
        return self._store_bytes if self._store_bytes is not None else self.rule().store_bytes

    def rule(self):
        """This machine's rule for the current thread count (``cpu_rule.cpu_rule``)."""
        from .cpu_rule import cpu_rule

        return cpu_rule()

    # -- plumbing ---------------------------------------------------------------------------

    def _tiling(self, hidden_size: int) -> tuple[int, int, int]:
        parts = self.parts or torch.get_num_threads()
        return parts, self.row_tile or default_row_tile(hidden_size), self.vocab_tile

    @staticmethod
    def _kernel_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor):
        return hidden.contiguous(), weight.contiguous(), bias, targets.long().contiguous()

    @staticmethod
    def _softcap(opts: HeadOptions) -> float:
        return 0.0 if opts.softcap is None else opts.softcap

    def _forward(self, h, w, b, y, opts, store=None, index=None) -> RowLogprobs:
        logp, lse, stats = _OPS.rows_forward(h, w, b, y, opts.temperature, self._softcap(opts), store,
                                             *self._tiling(h.shape[1]), index, self.gemm, opts.row_stats)
        return RowLogprobs(logp, lse, stats if opts.row_stats else None)

    def _backward(self, h, w, b, y, up: Upstream, opts, dh, dw, db, store=None, index=None):
        lse, grad, entropy, grad_entropy = (None if t is None else t.float().contiguous() for t in up)
        _OPS.rows_backward(h, w, b, y, lse, grad, opts.temperature, self._softcap(opts), store,
                           *self._tiling(h.shape[1]), dh, dw, db, index, self.gemm, entropy, grad_entropy)

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

    def rows_forward(self, hidden, weight, bias, targets, opts: HeadOptions, index=None, count=None):
        if acc_dtype(hidden, weight, bias) == torch.float64:
            return self._reference.rows_forward(hidden, weight, bias, targets, opts, index)
        h, w, b, y = self._kernel_inputs(hidden, weight, bias, targets)
        return self._forward(h, w, b, y, opts, index=index)

    def rows_backward(self, hidden, weight, bias, targets, upstream: Upstream, opts: HeadOptions, needs, index=None,
                      count=None):
        if acc_dtype(hidden, weight, bias) == torch.float64:
            return self._reference.rows_backward(hidden, weight, bias, targets, upstream, opts, needs, index)
        h, w, b, y = self._kernel_inputs(hidden, weight, bias, targets)
        dh, dw, db = self._alloc_grads(h, w, bias, needs)
        self._backward(h, w, b, y, upstream, opts, dh, dw, db, index=index)
        return Grads(dh, dw, db)

    def spin_forward_backward(self, hidden, weight, bias, rows: CountedRows, ref_logps, opts: SpinOptions, needs):
        """Forward, the SPIN epilogue, then the gradients, per group of whole pairs: one group of
        all pairs without a store; with one, groups whose logits fit it (a pair alone too large
        for it is recomputed). The kernels read the counted rows of hidden [N, H] through
        rows.index and write dhidden [N, H] through it.
        """
        if acc_dtype(hidden, weight, bias) == torch.float64:
            return self._reference.spin_forward_backward(hidden, weight, bias, rows, ref_logps, opts, needs)
        h, w, b, y = self._kernel_inputs(hidden, weight, bias, rows.targets)
        vocab = w.shape[0]
        dh, dw, db = self._alloc_grads(h, w, bias, needs)
        f32 = torch.float32
        seq_out = h.new_zeros(rows.num_seqs, dtype=f32)
        row_stats = h.new_zeros(3, rows.num_rows, dtype=f32) if opts.row_stats else None
        loss = h.new_zeros((), dtype=f32)
        ref = ref_logps.to(f32)
        num_pairs = max(rows.num_seqs // 2, 1)
        pair_offsets = rows.offsets[::2].tolist()  # host copy: the tiling is decided on the host
        pair_rows = [b - a for a, b in zip(pair_offsets, pair_offsets[1:])]
        store_rows = store_rows_for(pair_rows, self.store_bytes, vocab, self._tiling(h.shape[1])[1])
        groups = pair_groups(pair_offsets, store_rows) if store_rows else [(0, len(pair_offsets) - 1)]
        kept = [n for n in (pair_offsets[q] - pair_offsets[p] for p, q in groups) if n <= store_rows]
        store = h.new_empty(max(kept) * vocab, dtype=f32) if kept else None
        for p, q in groups:
            lo, hi = pair_offsets[p], pair_offsets[q]
            group_store = store if hi - lo <= store_rows else None
            offsets = rows.offsets[2 * p:2 * q + 1]
            index = rows.index[lo:hi]
            logp, lse, stats = self._forward(h, w, b, y[lo:hi], opts, group_store, index)
            if row_stats is not None:
                row_stats[:, lo:hi] = stats
            seq = seq_logps(logp, offsets, opts.average)
            group_loss, seq_grad = spin_terms(seq, ref[2 * p:2 * q], opts.beta, opts.loss_type, num_pairs)
            seq_out[2 * p:2 * q] = seq
            loss += group_loss
            g = row_grads(seq_grad, offsets, rows.seq[lo:hi] - 2 * p, opts.average)
            if hi > lo and bool(g.ne(0).any()):  # hinge pairs past the margin have no gradient
                self._backward(h, w, b, y[lo:hi], Upstream(lse, g), opts, dh, dw, db, group_store, index)
        return SpinResult(loss, seq_out, dh, dw, db, row_stats)


def make_backend() -> Backend:
    return CpuFused()


__all__ = ["CpuFused", "make_backend", "default_row_tile", "default_gemm", "store_rows_for"]
