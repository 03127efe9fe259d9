"""impl="torch": the chunked PyTorch path, the executable specification of the math.

Memory: one chunk of logits at a time. A chunk is [rows, V] in the accumulation dtype, its rows
chosen so that it fits ``logits_budget`` bytes; the softmax, its gradient and the softcap chain
rule run in place on it or on column blocks of it (temporaries of at most 1/COLUMN_BLOCKS of a
chunk), and each chunk is released before the next is formed (the per-chunk work is a function
call, so no loop variable keeps the last chunk alive). Runs on any device PyTorch runs on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..layout import CountedRows, pair_groups, row_grads, seq_logps
from ..objective import spin_terms
from .base import Backend, Grads, RowLogprobs, SpinResult, Upstream, acc_dtype, counted_rows, to_all_rows

if TYPE_CHECKING:
    from ..options import HeadOptions, SpinOptions

DEFAULT_LOGITS_BUDGET = 256 * 2**20  # bytes of one chunk of logits
COLUMN_BLOCKS = 8  # the elementwise temporaries are [rows, V / COLUMN_BLOCKS]


class TorchChunked(Backend):
    """Chunked over counted rows; ``logits_budget`` bytes bound the one [rows, V] logits chunk."""

    name = "torch"

    def __init__(self, logits_budget: int = DEFAULT_LOGITS_BUDGET):
        self.logits_budget = int(logits_budget)

    def __repr__(self) -> str:
        return f"torch(logits_budget={self.logits_budget})"

    def chunk_rows(self, vocab: int, dtype: torch.dtype) -> int:
        """Rows per chunk so that one [rows, vocab] buffer of ``dtype`` fits the budget (>= 1)."""
        return max(1, self.logits_budget // (vocab * torch.finfo(dtype).bits // 8))

    # -- the math of one chunk ----------------------------------------------------------------

    @staticmethod
    def _logits(h: Tensor, w: Tensor, b: Tensor | None, opts: HeadOptions) -> Tensor:
        """z [m, V] in w's dtype (the accumulation dtype): the chunk's one [m, V] buffer."""
        z = h.to(w.dtype) @ w.t()
        if b is not None:
            z.add_(b)
        if opts.temperature != 1.0:
            z.div_(opts.temperature)
        if opts.softcap is not None:
            z.div_(opts.softcap).tanh_().mul_(opts.softcap)
        return z

    @staticmethod
    def _column_blocks(vocab: int) -> list[slice]:
        width = -(-vocab // COLUMN_BLOCKS)
        return [slice(c, min(c + width, vocab)) for c in range(0, vocab, width)]

    @classmethod
    def _reduce(cls, z: Tensor, y: Tensor, stats: bool) -> RowLogprobs:
        """Per-row log-prob and log-sum-exp of the logits z [m, V] (left intact) for targets y;
        with ``stats`` the rows' statistics (``RowLogprobs.stats``): the entropy as
        log Σe − Σ e log e / Σe with e = exp(z − max) (no cancellation: both terms >= 0)."""
        m = z.shape[0]
        if m == 0:
            empty = z.new_zeros(0)
            return RowLogprobs(empty, empty, z.new_zeros(3, 0) if stats else None)
        z_target = z.gather(1, y[:, None]).squeeze(1)
        row_max = z.amax(1)
        sumexp = z.new_zeros(m)
        centered = z.new_zeros(m) if stats else None  # Σ e (z − max)
        for cols in cls._column_blocks(z.shape[1]):
            e = (z[:, cols] - row_max[:, None]).exp_()
            sumexp += e.sum(1)
            if stats:
                centered += torch.special.xlogy(e, e).sum(1)
        lse = row_max + sumexp.log()
        if not stats:
            return RowLogprobs(z_target - lse, lse)
        entropy = sumexp.log() - centered / sumexp
        top1 = (z.argmax(1) == y).to(z.dtype)  # the first maximal index, as TRL counts it
        return RowLogprobs(z_target - lse, lse, torch.stack([entropy, z.mean(1), top1]))

    @classmethod
    def _logit_grads_(cls, z: Tensor, y: Tensor, up: Upstream, opts: HeadOptions) -> Tensor:
        """z [m, V] overwritten with du = ∂L/∂u for L = Σ_n g_n logp_n (+ g^H_n H_n) (u = W h + b):
        dz = g (onehot − p) + g^H p (μ − z) with μ = Σ p z = lse − H, times 1 − (z / softcap)²
        (the softcap's tanh'), / temperature."""
        g, lse = up.grad, up.lse
        inv_c = None if opts.softcap is None else 1.0 / opts.softcap
        if up.grad_entropy is not None:  # dz = p (a + b z) + g onehot
            a = (up.grad_entropy * (lse - up.entropy) - g)[:, None]
            b = -up.grad_entropy[:, None]

        def chain(dz: Tensor, logits: Tensor) -> Tensor:  # dz -> du, from the logits of the same entries
            if inv_c is not None:
                dz.mul_(logits.mul(inv_c).square_().neg_().add_(1.0))
            return dz.div_(opts.temperature) if opts.temperature != 1.0 else dz

        target = chain(g[:, None].clone(), z.gather(1, y[:, None]))  # the onehot term, before z is overwritten
        for cols in cls._column_blocks(z.shape[1]):
            block = z[:, cols]
            tanh_grad = None if inv_c is None else block.mul(inv_c).square_().neg_().add_(1.0)
            if up.grad_entropy is None:
                block.sub_(lse[:, None]).exp_().mul_(-g[:, None])
            else:
                coef = block * b + a
                block.sub_(lse[:, None]).exp_().mul_(coef)
            if tanh_grad is not None:
                block.mul_(tanh_grad)
            if opts.temperature != 1.0:
                block.div_(opts.temperature)
        return z.scatter_add_(1, y[:, None], target)

    @staticmethod
    def _accumulate(du: Tensor, h: Tensor, w: Tensor, dh: Tensor | None, dw: Tensor | None,
                    db: Tensor | None) -> None:
        """dh (this chunk's [m, H] rows) = du W; dw += duᵀ h; db += Σ du."""
        if dh is not None:
            torch.mm(du, w, out=dh)
        if dw is not None:
            dw.addmm_(du.t(), h.to(du.dtype))
        if db is not None:
            db.add_(du.sum(0))

    def _forward_chunk(self, h, w, b, y, opts) -> RowLogprobs:
        return self._reduce(self._logits(h, w, b, opts), y, opts.row_stats)

    def _backward_chunk(self, h, w, b, y, up: Upstream, opts, dh, dw, db) -> None:
        du = self._logit_grads_(self._logits(h, w, b, opts), y, up, opts)
        self._accumulate(du, h, w, dh, dw, db)

    # -- Backend API ----------------------------------------------------------------------------

    def rows_forward(self, hidden, weight, bias, targets, opts: HeadOptions, index=None, count=None):
        hidden = counted_rows(hidden, index)
        acc = acc_dtype(hidden, weight)
        w = weight.to(acc)
        b = bias.to(acc) if bias is not None else None
        m = hidden.shape[0]
        logp = hidden.new_empty(m, dtype=acc)
        lse = hidden.new_empty(m, dtype=acc)
        stats = hidden.new_empty(3, m, dtype=acc) if opts.row_stats else None
        step = self.chunk_rows(weight.shape[0], acc)
        for s in range(0, m, step):
            chunk = self._forward_chunk(hidden[s:s + step], w, b, targets[s:s + step], opts)
            logp[s:s + step], lse[s:s + step] = chunk.logp, chunk.lse
            if stats is not None:
                stats[:, s:s + step] = chunk.stats
        return RowLogprobs(logp, lse, stats)

    def _alloc_grads(self, hidden, weight, bias, needs, acc):
        dh = hidden.new_empty(hidden.shape, dtype=acc) if needs.hidden else None
        dw = weight.new_zeros(weight.shape, dtype=acc) if needs.weight else None
        db = weight.new_zeros(weight.shape[0], dtype=acc) if (bias is not None and needs.bias) else None
        return dh, dw, db

    def _backward_rows(self, hidden, w, b, targets, up: Upstream, opts, dh, dw, db, lo=0, hi=None):
        """The gradients of rows [lo, hi) of hidden (targets and ``up`` indexed from lo), chunk by chunk."""
        hi = hidden.shape[0] if hi is None else hi
        step = self.chunk_rows(w.shape[0], w.dtype)
        for s in range(lo, hi, step):
            e = min(s + step, hi)
            part = Upstream(*(None if t is None else t[s - lo:e - lo] for t in up))
            self._backward_chunk(hidden[s:e], w, b, targets[s:e], part, opts, None if dh is None else dh[s:e], dw, db)

    def rows_backward(self, hidden, weight, bias, targets, upstream: Upstream, opts: HeadOptions, needs, index=None,
                      count=None):
        h = counted_rows(hidden, index)
        acc = acc_dtype(h, weight)
        dh, dw, db = self._alloc_grads(h, weight, bias, needs, acc)
        w = weight.to(acc)
        up = Upstream(*(None if t is None else t.to(acc) for t in upstream))
        self._backward_rows(h, w, bias.to(acc) if bias is not None else None, targets, up, opts, dh, dw, db)
        return Grads(to_all_rows(dh, index, hidden.shape[0]), dw, db)

    def _spin_tile(self, h, w, b, y, offsets, local_seq, ref, num_pairs, opts, dh, dw, db):
        """(seq log-probs, loss contribution, row stats) of a tile of whole pairs, its gradients
        accumulated, from one chunk of logits (6·m·H·V flops)."""
        z = self._logits(h, w, b, opts)
        fwd = self._reduce(z, y, opts.row_stats)
        seq = seq_logps(fwd.logp, offsets, opts.average)
        loss, seq_grad = spin_terms(seq, ref, opts.beta, opts.loss_type, num_pairs)
        g = row_grads(seq_grad, offsets, local_seq, opts.average)
        self._accumulate(self._logit_grads_(z, y, Upstream(fwd.lse, g), opts), h, w, dh, dw, db)
        return seq, loss, fwd.stats

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
        row_stats = hidden.new_zeros(3, hidden.shape[0], dtype=acc) if opts.row_stats else None
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
                seq, tile_loss, stats = self._spin_tile(h, w, b, y, offsets, local_seq, ref[2 * p:2 * q], num_pairs,
                                                        opts, None if dh is None else dh[lo:hi], dw, db)
            else:
                fwd = self.rows_forward(h, weight, bias, y, opts)
                seq, stats = seq_logps(fwd.logp, offsets, opts.average), fwd.stats
                tile_loss, seq_grad = spin_terms(seq, ref[2 * p:2 * q], opts.beta, opts.loss_type, num_pairs)
                g = row_grads(seq_grad, offsets, local_seq, opts.average)
                self._backward_rows(hidden, w, b, rows.targets, Upstream(fwd.lse, g), opts, dh, dw, db, lo, hi)
            seq_out[2 * p:2 * q] = seq
            if row_stats is not None:
                row_stats[:, lo:hi] = stats
            loss += tile_loss
        return SpinResult(loss, seq_out, to_all_rows(dh, rows.index, num_rows), dw, db, row_stats)
