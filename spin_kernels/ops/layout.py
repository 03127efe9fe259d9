"""Counted-row compaction and segment reductions shared by every backend.

Only rows whose target is not ``ignore_index`` need vocabulary work. ``CountedRows`` gathers
them once (order preserved, so the counted rows of sequence i stay contiguous) and carries the
per-sequence bookkeeping every backend needs.
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
    """

    index: Tensor
    targets: Tensor
    seq: Tensor
    offsets: Tensor
    counts: Tensor

    @property
    def num_rows(self) -> int:
        return self.index.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.counts.shape[0]

    @staticmethod
    def build(targets: Tensor, cu_seqlens: Tensor, ignore_index: int) -> "CountedRows":
        """targets [N] int, cu_seqlens [S+1] int (validated) -> CountedRows."""
        cu = cu_seqlens.long()
        mask = targets != ignore_index
        index = mask.nonzero().squeeze(1)  # one host sync: M is data-dependent
        seq_of_token = torch.bucketize(torch.arange(targets.shape[0], device=targets.device), cu[1:], right=True)
        cum = torch.cat([cu.new_zeros(1), mask.long().cumsum(0)])
        offsets = cum[cu]
        return CountedRows(
            index=index,
            targets=targets[index].long(),
            seq=seq_of_token[index],
            offsets=offsets,
            counts=offsets[1:] - offsets[:-1],
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
