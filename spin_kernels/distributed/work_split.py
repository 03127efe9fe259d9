"""Splitting work (prompts to generate or score) over ranks and gathering the results.

Under FSDP every rank must run the same number of forwards, so a rank's share is padded to
the common length with repeats of its last item; gathering then drops those repeats by
example index, and checks that nothing is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist


def shard_indices(num_items: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """This rank's items: ``rank, rank + W, ...`` padded to ceil(num_items / W) entries.

    Returns:
        (indices, num_real): the first ``num_real`` are this rank's own items, the rest are
        padding repeats whose results are to be discarded.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    own = list(range(rank, num_items, world_size))
    per_rank = -(-num_items // world_size)
    if not own:  # fewer items than ranks: still take part in the collectives
        return ([0] * per_rank if num_items else []), 0
    return own + [own[-1]] * (per_rank - len(own)), len(own)


def gather_by_index(local: Sequence[Any], *, key: Callable[[Any], int] = lambda r: r["index"],
                    expected: int | Sequence[int] | None = None) -> list[Any]:
    """All ranks' results, each example once, sorted by index (on every rank).

    Args:
        local: this rank's results (picklable), e.g. dicts with an "index".
        key: the example index of a result.
        expected: the number of examples (indices 0..n-1) or the exact index set; when given,
            a missing index raises instead of being silently lost.

    A repeated index (a padding repeat, or an item two ranks both produced) keeps the lowest
    rank's result.

    Raises:
        ValueError: indices in ``expected`` that no rank produced.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, list(local))
    else:
        parts = [list(local)]
    merged: dict[int, Any] = {}
    for part in parts:
        for item in part:
            k = int(key(item))
            if k not in merged:
                merged[k] = item
    if expected is not None:
        want = set(range(expected)) if isinstance(expected, int) else {int(i) for i in expected}
        missing = sorted(want - merged.keys())
        if missing:
            raise ValueError(f"{len(missing)} example(s) missing after gathering, e.g. indices {missing[:10]}")
    return [merged[k] for k in sorted(merged)]
