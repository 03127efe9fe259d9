"""impl="torch": the chunked PyTorch path, the executable specification of the math.

Never holds more than one chunk of logits ([rows, V] in the accumulation dtype, sized from a
memory budget) plus a few temporaries of the same size. Runs on any device PyTorch runs on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..layout import CountedRows, pair_groups, row_grads, seq_logps
from ..objective import spin_terms
from .base import Backend, Grads, RowLogprobs, SpinResult, acc_dtype, counted_rows, to_all_rows

if TYPE_CHECKING:
    from ..options import HeadOptions, SpinOptions

DEFAULT_LOGITS_BUDGET = 256 * 2**20  # bytes of one chunk of logits


class TorchChunked(Backend):
    """Chunked over counted rows; ``logits_budget`` bytes bound one [rows, V] logits chunk."""

    name = "torch"

    def __init__(self, logits_budget: int = DEFAULT_LOGITS_BUDGET):
        self.logits_budget = int(logits_budget)

    def __repr__(self) -> str:
        return f"torch(logits_budget={self.logits_budget})"

    def chunk_rows(self, vocab: int, dtype: torch.dtype) -> int:
        """Rows per chunk so that one [rows, vocab] buffer of ``dtype`` fits the budget (>= 1)."""
        return max(1, self.logits_budget // (vocab * torch.finfo(dtype).bits // 8))

    # -- the three pieces of math, each on one chunk ------------------------------------------

    @staticmethod
    def _logits(h: Tensor, w: Tensor, b: Tensor | None, opts: HeadOptions) -> tuple[Tensor, Tensor | None]:
        """z [m, V] in w's dtype, and tanh(u / softcap) (needed by the backward) or None."""
        z = h.to(w.dtype) @ w.t()
        if b is not None:
            z.add_(b)
        if opts.temperature != 1.0:
            z.div_(opts.temperature)
        if opts.softcap is None:
            return z, None
        t = z.div_(opts.softcap).tanh_()
        return t * opts.softcap, t

    @staticmethod
    def _exp_shifted_(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """In place z <- exp(z - rowmax) (the unnormalised softmax, so no second [m, V] buffer).

        Returns (logp [m], lse [m], sumexp [m]); softmax = z / sumexp afterwards.
        """
        z_target = z.gather(1, y[:, None]).squeeze(1)
        row_max = z.amax(1) if z.shape[0] else z.new_zeros(0)
        sumexp = z.sub_(row_max[:, None]).exp_().sum(1)
        lse = row_max + sumexp.log()
        return z_target - lse, lse, sumexp

    @staticmethod
    def _backward_from_probs(
        p: Tensor, t: Tensor | None, y: Tensor, g: Tensor, h: Tensor, w: Tensor,
        opts, dh: Tensor | None, dw: Tensor | None, db: Tensor | None,
    ) -> None:
        """dz = g (onehot - p), chained through softcap and temperature, into dh/dw/db.

        p is the softmax of the chunk (overwritten, as is t); dh is this chunk's [m, H] slice
        (written), dw/db are accumulated.
        """
        du = p.mul_(-g[:, None])
        du.scatter_add_(1, y[:, None], g[:, None])
        if t is not None:
            du.mul_(t.square_().neg_().add_(1.0))
        if opts.temperature != 1.0:
            du.div_(opts.temperature)
        if dh is not None:
            torch.mm(du, w, out=dh)
        if dw is not None:
            dw.addmm_(du.t(), h.to(du.dtype))
        if db is not None:
            db.add_(du.sum(0))

    # -- Backend API ----------------------------------------------------------------------------

    def rows_forward(self, hidden, weight, bias, targets, opts: HeadOptions, index=None, count=None):
        hidden = counted_rows(hidden, index)
        acc = acc_dtype(hidden, weight)
        w = weight.to(acc)
        b = bias.to(acc) if bias is not None else None
        m = hidden.shape[0]
        logp = hidden.new_empty(m, dtype=acc)
        lse = hidden.new_empty(m, dtype=acc)
        step = self.chunk_rows(weight.shape[0], acc)
        for s in range(0, m, step):
            z, _ = self._logits(hidden[s:s + step], w, b, opts)
            logp[s:s + step], lse[s:s + step], _ = self._exp_shifted_(z, targets[s:s + step])
        return RowLogprobs(logp, lse)

    def _alloc_grads(self, hidden, weight, bias, needs, acc):
        dh = hidden.new_empty(hidden.shape, dtype=acc) if needs.hidden else None
        dw = weight.new_zeros(weight.shape, dtype=acc) if needs.weight else None
        db = weight.new_zeros(weight.shape[0], dtype=acc) if (bias is not None and needs.bias) else None
        return dh, dw, db

    def _backward_into(self, hidden, w, b, targets, lse, grad, opts, dh, dw, db, lo=0, hi=None):
        hi = hidden.shape[0] if hi is None else hi
        step = self.chunk_rows(w.shape[0], w.dtype)
        for s in range(lo, hi, step):
            e = min(s + step, hi)
            z, t = self._logits(hidden[s:e], w, b, opts)
            probs = z.sub_(lse[s - lo:e - lo, None]).exp_()
            self._backward_from_probs(probs, t, targets[s:e], grad[s - lo:e - lo], hidden[s:e], w, opts,
                                      None if dh is None else dh[s:e], dw, db)

    def rows_backward(self, hidden, weight, bias, targets, lse, grad, opts: HeadOptions, needs, index=None,
                      count=None):
        h = counted_rows(hidden, index)
        acc = acc_dtype(h, weight)
        dh, dw, db = self._alloc_grads(h, weight, bias, needs, acc)
        w = weight.to(acc)
        self._backward_into(h, w, bias.to(acc) if bias is not None else None, targets, lse, grad.to(acc),
                            opts, dh, dw, db)
        return Grads(to_all_rows(dh, index, hidden.shape[0]), dw, db)

    def spin_forward_backward(self, hidden, weight, bias, rows: CountedRows, ref_logps, opts: SpinOptions, needs):
        """6·M·H·V path: tiles of whole pairs, each tile's logits used for loss and gradients.

        A pair larger than one chunk is done in two passes over its own rows (8·M·H·V for it).
        """
        num_rows, hidden = hidden.shape[0], counted_rows(hidden, rows.index)
        acc = acc_dtype(hidden, weight)
        w = weight.to(acc)
        b = bias.to(acc) if bias is not None else None
        num_pairs = max(rows.num_seqs // 2, 1)
        dh, dw, db = self._alloc_grads(hidden, weight, bias, needs, acc)
        seq_out = hidden.new_zeros(rows.num_seqs, dtype=acc)
        loss = hidden.new_zeros((), dtype=acc)
        ref = ref_logps.to(acc)
        step = self.chunk_rows(weight.shape[0], acc)
        pair_offsets = rows.offsets[::2].tolist()  # host copy: tiling is decided on the host
        for p, q in pair_groups(pair_offsets, step):  # tiles of whole pairs that fit one chunk
            lo, hi = pair_offsets[p], pair_offsets[q]
            offsets = rows.offsets[2 * p:2 * q + 1]
            local_seq = rows.seq[lo:hi] - 2 * p
            y, h = rows.targets[lo:hi], hidden[lo:hi]
            if hi - lo <= step:
                z, t = self._logits(h, w, b, opts)
                logp, lse, sumexp = self._exp_shifted_(z, y)
            else:
                logp, lse = self.rows_forward(h, weight, bias, y, opts)
            seq = seq_logps(logp, offsets, opts.average)
            tile_loss, seq_grad = spin_terms(seq, ref[2 * p:2 * q], opts.beta, opts.loss_type, num_pairs)
            g = row_grads(seq_grad, offsets, local_seq, opts.average)
            if hi - lo <= step:
                probs = z.div_(sumexp[:, None])
                self._backward_from_probs(probs, t, y, g, h, w, opts, None if dh is None else dh[lo:hi], dw, db)
            else:
                self._backward_into(hidden, w, b, rows.targets, lse, g, opts, dh, dw, db, lo, hi)
            seq_out[2 * p:2 * q] = seq
            loss += tile_loss
        return SpinResult(loss, seq_out, to_all_rows(dh, rows.index, num_rows), dw, db)
