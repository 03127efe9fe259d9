"""Counted-row compaction and segment reductions shared by every backend.

Only rows whose target is not ``ignore_index`` need vocabulary work. ``CountedRows`` names
them once (order preserved, so the counted rows of sequence i stay contiguous) and carries the
per-sequence bookkeeping every backend needs.

Two layouts. *Exact*: the M counted rows and nothing else; M is data, so finding them reads it
back to the host (one synchronisation on a GPU). *Padded*: a permutation of all N rows with the
counted ones first, in order, and ``count`` = M kept on the device; every shape is known from
the input shapes, so nothing waits for the GPU. Backends whose kernels read ``count`` on the
device (``Backend.pads_rows``) get the padded layout and skip the rows past it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class CountedRows:
    """The counted rows of a packed batch.

    Attributes:
        index: int64 [M], positions in [0, N) of the rows with a real target, ascending.
        targets: int64 [M], their targets.
        seq: int64 [M], the sequence each counted row belongs to.
        offsets: int64 [S+1], counted rows of sequence i are ``offsets[i]:offsets[i+1]``.
        counts: int64 [S], counted rows per sequence.
        count: None for the exact layout; for the padded one int32 [1] on the device, the number
            of counted rows: index, targets and seq are then [N], their entries past count
            are the ignored rows (padding).
    """

    index: Tensor
    targets: Tensor
    seq: Tensor
    offsets: Tensor
    counts: Tensor
    count: Tensor | None = None

    @property
    def num_rows(self) -> int:
        """M for the exact layout; N, an upper bound of M, for the padded one."""
        return self.index.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.counts.shape[0]

    @staticmethod
    def build(targets: Tensor, cu_seqlens: Tensor, ignore_index: int, padded: bool = False,
              order: Tensor | None = None) -> "CountedRows":
        """targets [N] int, cu_seqlens [S+1] int -> CountedRows (``padded``: that layout).

        ``order`` [S] (int64, a permutation): the sequences in the order the rows are to be laid
        out, op sequence k being the caller's sequence ``order[k]`` (``pair_order``: the SPIN
        ops' pairs read from a chosen-half/rejected-half batch); ``seq``, ``offsets`` and
        ``counts`` then number sequences in that order. None: the caller's order. Only the row
        index changes, so hidden is read in place, never copied.

        Values are clamped into range, so unvalidated input (``check_values=False``) can give
        wrong results but never an out-of-bounds index.
        """
        n, s = targets.shape[0], cu_seqlens.shape[0] - 1
        device = targets.device
        cu = cu_seqlens.long().clamp(0, n)
        mask = targets != ignore_index
        seq_of_token = torch.bucketize(torch.arange(n, device=device), cu[1:], right=True)
        seq_of_token.clamp_(max=max(s - 1, 0))
        cum = torch.cat([cu.new_zeros(1), mask.long().cumsum(0)])
        offsets = cum[cu]
        # Each counted row's place among the counted rows: its sequence's first place plus the
        # counted rows before it in that sequence (running counts: no sort, no host sync).
        place = cum[1:] - 1
        if order is not None:
            rank = torch.empty_like(order).scatter_(0, order, torch.arange(s, device=device))
            counts = offsets[1:] - offsets[:-1]
            offsets = torch.cat([offsets[:1], counts[order].cumsum(0)])
            place = place - cum[cu[:-1]][seq_of_token] + offsets[rank][seq_of_token]
            seq_of_token = rank[seq_of_token]
        if padded:
            # Counted rows first, then the ignored ones, each in order: every row's place comes
            # from running counts (no sort, no data-dependent shape).
            ignored = torch.arange(n, device=device) - cum[1:]
            place = torch.where(mask, place, cum[-1] + ignored)
            index = torch.empty_like(place).scatter_(0, place, torch.arange(n, device=device))
            count = cum[-1:].to(torch.int32)
        else:
            counted = mask.nonzero().squeeze(1)  # one host sync: M is data-dependent
            index = counted if order is None else torch.empty_like(counted).scatter_(0, place[counted], counted)
            count = None
        return CountedRows(
            index=index,
            targets=targets[index].long(),
            seq=seq_of_token[index],
            offsets=offsets,
            counts=offsets[1:] - offsets[:-1],
            count=count,
        )

    def segment_sum(self, row_values: Tensor) -> Tensor:
        """[M] -> [S]: deterministic per-sequence sums."""
        return segment_sum(row_values, self.offsets)

    def seq_logps(self, row_logps: Tensor, average: bool) -> Tensor:
        """Per-sequence log-probs [S] from per-row ones [M]; averaged by count if asked (0 if empty)."""
        return seq_logps(row_logps, self.offsets, average)

    def row_grads(self, seq_grads: Tensor, average: bool) -> Tensor:
        """Per-row gradient scales [M] from per-sequence ones [S] (the inverse of seq_logps)."""
        return row_grads(seq_grads, self.offsets, self.seq, average)


PAIR_LAYOUTS = ("interleaved", "halves")


def pair_order(num_seqs: int, pairs: str, device: torch.device) -> Tensor | None:
    """The sequence order (``CountedRows.build``'s ``order``) that interleaves the pairs of a
    batch laid out as ``pairs`` says: None for "interleaved" (sequence 2p real, 2p+1 synthetic:
    the ops' own order); for "halves" (real responses 0..P-1, then synthetic P..2P-1, TRL's and
    Liger's chosen/rejected concatenation) [0, P, 1, P+1, ...]."""
    if pairs == "interleaved":
        return None
    half = num_seqs // 2
    return torch.arange(2 * half, device=device).view(2, half).t().reshape(-1)


def segment_sum(values: Tensor, offsets: Tensor) -> Tensor:
    """values [M], offsets [K+1] (ascending, offsets[0] may be > 0) -> [K] sums of
    values[offsets[k]:offsets[k+1]]; deterministic float64 prefix sums, no atomics, no sync."""
    prefix = torch.cat([values.new_zeros(1, dtype=torch.float64), values.double().cumsum(0)])
    base = offsets[:1]
    return (prefix[offsets[1:] - base] - prefix[offsets[:-1] - base]).to(values.dtype)


def seq_logps(row_logps: Tensor, offsets: Tensor, average: bool) -> Tensor:
    """Per-sequence sums (or means, 0 for an empty sequence) of per-row log-probs."""
    sums = segment_sum(row_logps, offsets)
    if average:
        sums = sums / (offsets[1:] - offsets[:-1]).clamp(min=1).to(sums.dtype)
    return sums


def row_grads(seq_grads: Tensor, offsets: Tensor, row_seq: Tensor, average: bool) -> Tensor:
    """Per-row upstream gradients [M] from per-sequence ones [K]; row_seq indexes [0, K)."""
    g = seq_grads
    if average:
        g = g / (offsets[1:] - offsets[:-1]).clamp(min=1).to(g.dtype)
    return g[row_seq]


def pair_groups(pair_offsets: list[int], max_rows: int) -> list[tuple[int, int]]:
    """Consecutive whole pairs [p, q) whose counted rows fit ``max_rows`` together.

    ``pair_offsets`` (host list, [P+1]) are the counted-row offsets of the pairs; a pair that
    alone exceeds ``max_rows`` forms a group of its own (the backend then handles it in parts).
    """
    groups, p, num_pairs = [], 0, len(pair_offsets) - 1
    while p < num_pairs:
        q = p + 1
        while q < num_pairs and pair_offsets[q + 1] - pair_offsets[p] <= max_rows:
            q += 1
        groups.append((p, q))
        p = q
    return groups
