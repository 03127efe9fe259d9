"""The packer: which pairs go into which micro-batch on which data-parallel rank.

A pair costs ``SpinExample.packed_tokens(share_prompt)``: both sequences, the prompt counted twice,
or with ``share_prompt=True`` the prompt once (plus its last token; spin_kernels.packing.batch). Micro-batches
are filled up to a token budget, never split a pair, and are dealt to ranks so that

* every rank gets the same number of micro-batches (their gradient steps line up), and
* micro-batch k of every rank has about the same size (ranks wait for each other at every
  micro-batch under FSDP), which also balances each rank's total.

Algorithm
    1. Best-fit decreasing: pairs sorted by cost (largest first; ties in a seeded random
       order), each put into the open micro-batch with the least room that still fits it, or a
       new one. Same worst-case bound as first-fit decreasing (<= 11/9 OPT + 6/9 bins), and
       O(n log n) with a sorted list of remaining capacities.
    2. While the micro-batch count is not a multiple of ``num_ranks``, the fullest micro-batch
       holding two or more pairs is split in two (best-fit decreasing halves).
    3. Micro-batches sorted by tokens are cut into rounds of ``num_ranks``; inside a round the
       largest goes to the rank with the fewest tokens so far. Rounds are then shuffled
       (seeded) so that training does not see the largest batches first.

A pair larger than the budget on its own goes alone into its own micro-batch (it cannot be
split); ``PackStats.num_oversized`` counts them. If fewer micro-batches with >= 1 pair exist
than the ranks need (e.g. fewer pairs than ranks), the plan is padded with EMPTY micro-batches
(``[]``), counted in ``PackStats.num_empty``: a trainer must still run its collectives for them.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .batch import PackedBatch, pack_batch
from .example import SpinExample


@dataclass
class PackStats:
    """How well a plan packs. Token counts are those of the packed layout (prompts counted once per
    sequence, or once per pair with ``share_prompt``); the padded comparisons are always the
    conventional padded layout of two sequences per pair.

    Attributes:
        num_pairs, num_micro_batches (over all ranks), token_budget.
        num_tokens: tokens of all micro-batches (in the planned layout).
        fill_ratio: num_tokens / (num_micro_batches * token_budget).
        padded_tokens: what the same micro-batches would hold padded to their longest sequence
            ([2 * pairs, max_len] each).
        padding_waste: 1 - num_tokens / padded_tokens (fraction of a padded batch that packing saves).
        random_padded_tokens / random_padding_waste: the same for a conventional padded loader:
            pairs in a seeded random order, batches of the same mean pair count, each padded to its
            longest sequence.
        rank_tokens: tokens per rank; rank_imbalance: max / mean of rank_tokens (1 = perfect).
        step_imbalance: mean over micro-batch steps of (max / mean tokens across ranks).
        num_oversized: pairs larger than the budget (each alone in a micro-batch).
        num_empty: empty micro-batches added so that ranks have the same count.
    """

    num_pairs: int
    num_micro_batches: int
    token_budget: int
    num_tokens: int
    fill_ratio: float
    padded_tokens: int
    padding_waste: float
    random_padded_tokens: int
    random_padding_waste: float
    rank_tokens: list[int] = field(default_factory=list)
    rank_imbalance: float = 1.0
    step_imbalance: float = 1.0
    num_oversized: int = 0
    num_empty: int = 0

    def summary(self) -> str:
        return (f"{self.num_pairs} pairs -> {self.num_micro_batches} micro-batches of <= {self.token_budget} tokens "
                f"over {len(self.rank_tokens)} rank(s): fill {self.fill_ratio:.1%}; padding the same micro-batches "
                f"would waste {self.padding_waste:.1%} of their tokens, random padded batches "
                f"{self.random_padding_waste:.1%}; rank imbalance {self.rank_imbalance:.3f}, "
                f"step imbalance {self.step_imbalance:.3f}; oversized {self.num_oversized}, empty {self.num_empty}")


@dataclass
class PackPlan:
    """``micro_batches[rank][k]`` lists the indices (into the planned examples) of the pairs of
    micro-batch k of that rank; every rank has the same number of micro-batches. ``share_prompt``:
    the layout the plan was costed for, and the one ``batches`` packs."""

    micro_batches: list[list[list[int]]]
    stats: PackStats
    share_prompt: bool = False

    @property
    def num_steps(self) -> int:
        """Micro-batches per rank."""
        return len(self.micro_batches[0]) if self.micro_batches else 0

    def batches(self, examples: Sequence[SpinExample], rank: int = 0) -> Iterator[PackedBatch | None]:
        """The PackedBatch of each micro-batch of ``rank``, in order (None for an empty micro-batch)."""
        if not 0 <= rank < len(self.micro_batches):
            raise ValueError(f"rank must be in [0, {len(self.micro_batches)}), got {rank}")
        for mb in self.micro_batches[rank]:
            yield pack_batch([examples[i] for i in mb], share_prompt=self.share_prompt) if mb else None


def _best_fit_decreasing(order: list[int], costs: Sequence[int], budget: int) -> list[list[int]]:
    """Pack the items of ``order`` (already sorted by decreasing cost) into bins of ``budget``."""
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id) of bins that may still take items
    for i in order:
        c = costs[i]
        if c > budget:  # oversized: alone in its own bin, never reopened
            bins.append([i])
            continue
        k = bisect.bisect_left(room, (c, -1))
        if k < len(room):
            left, b = room.pop(k)
        else:
            left, b = budget, len(bins)
            bins.append([])
        bins[b].append(i)
        if left - c > 0:
            bisect.insort(room, (left - c, b))
    return bins


def _split_until_multiple(bins: list[list[int]], costs: Sequence[int], num_ranks: int) -> list[list[int]]:
    bins = list(bins)
    while len(bins) % num_ranks:
        splittable = [b for b in range(len(bins)) if len(bins[b]) > 1]
        if not splittable:
            bins.extend([] for _ in range(num_ranks - len(bins) % num_ranks))
            break
        b = max(splittable, key=lambda j: (sum(costs[i] for i in bins[j]), -j))
        items = sorted(bins.pop(b), key=lambda i: -costs[i])
        halves: list[list[int]] = [[], []]
        loads = [0, 0]
        for i in items:  # largest first into the lighter half: balanced halves
            h = 0 if loads[0] <= loads[1] else 1
            halves[h].append(i)
            loads[h] += costs[i]
        bins.extend(halves)
    return bins


def _deal_to_ranks(bins: list[list[int]], costs: Sequence[int], num_ranks: int,
                   rng: random.Random, shuffle: bool) -> list[list[list[int]]]:
    load = [sum(costs[i] for i in b) for b in bins]
    by_size = sorted(range(len(bins)), key=lambda b: (-load[b], b))
    rounds = [by_size[r:r + num_ranks] for r in range(0, len(by_size), num_ranks)]
    if shuffle:
        rng.shuffle(rounds)
    totals = [0] * num_ranks
    out: list[list[list[int]]] = [[] for _ in range(num_ranks)]
    for rnd in rounds:
        ranks = sorted(range(num_ranks), key=lambda r: (totals[r], r))
        for b, r in zip(rnd, ranks):  # rnd is largest first, ranks lightest first
            items = list(bins[b])
            if shuffle:
                rng.shuffle(items)
            out[r].append(items)
            totals[r] += load[b]
    return out


def _padded_tokens(groups: Sequence[Sequence[int]], examples: Sequence[SpinExample]) -> int:
    total = 0
    for g in groups:
        if g:
            longest = max(max(examples[i].real_length, examples[i].synthetic_length) for i in g)
            total += 2 * len(g) * longest
    return total


def _stats(plan: list[list[list[int]]], examples: Sequence[SpinExample], costs: Sequence[int],
           budget: int, seed: int) -> PackStats:
    flat = [mb for rank in plan for mb in rank]
    num_tokens = sum(costs)
    padded = _padded_tokens(flat, examples)
    nonempty = sum(1 for mb in flat if mb)
    per_batch = max(1, round(len(examples) / max(1, nonempty)))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    random_padded = _padded_tokens([order[i:i + per_batch] for i in range(0, len(order), per_batch)], examples)
    rank_tokens = [sum(costs[i] for mb in rank for i in mb) for rank in plan]
    mean_rank = sum(rank_tokens) / len(rank_tokens)
    steps = []
    for k in range(len(plan[0])):
        step = [sum(costs[i] for i in rank[k]) for rank in plan]
        mean = sum(step) / len(step)
        steps.append(max(step) / mean if mean else 1.0)
    return PackStats(
        num_pairs=len(examples),
        num_micro_batches=len(flat),
        token_budget=budget,
        num_tokens=num_tokens,
        fill_ratio=num_tokens / (len(flat) * budget) if flat else 0.0,
        padded_tokens=padded,
        padding_waste=1 - num_tokens / padded if padded else 0.0,
        random_padded_tokens=random_padded,
        random_padding_waste=1 - num_tokens / random_padded if random_padded else 0.0,
        rank_tokens=rank_tokens,
        rank_imbalance=max(rank_tokens) / mean_rank if mean_rank else 1.0,
        step_imbalance=sum(steps) / len(steps) if steps else 1.0,
        num_oversized=sum(1 for c in costs if c > budget),
        num_empty=len(flat) - nonempty,
    )


def plan_micro_batches(
    examples: Sequence[SpinExample],
    token_budget: int,
    *,
    num_ranks: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    share_prompt: bool = False,
) -> PackPlan:
    """Plan the micro-batches of one pass over ``examples`` (see the module docstring).

    Args:
        examples: the pairs to pack (their token counts are all that is used).
        token_budget: the most tokens (of the packed layout: ``SpinExample.packed_tokens``) in one
            micro-batch, >= 1. A single pair above it goes alone into its own micro-batch.
        num_ranks: data-parallel ranks (>= 1).
        seed: the plan is a pure function of (pair lengths, token_budget, num_ranks, seed, shuffle).
        shuffle: randomise tie-breaking, the order of micro-batches and of pairs inside them;
            False gives the plain sorted order.
        share_prompt: cost pairs in the shared-prompt layout (``pack_batch(..., share_prompt=True)``,
            which ``PackPlan.batches`` then uses).

    Returns:
        PackPlan: ``micro_batches[rank][k]`` -> indices into ``examples``; ``stats`` a PackStats.
    """
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
        raise ValueError(f"token_budget must be an int >= 1, got {token_budget!r}")
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"num_ranks must be an int >= 1, got {num_ranks!r}")
    if not isinstance(share_prompt, bool):
        raise TypeError(f"share_prompt must be a bool, got {type(share_prompt).__name__}")
    for i, ex in enumerate(examples):
        if not isinstance(ex, SpinExample):
            raise TypeError(f"examples[{i}] must be a SpinExample, got {type(ex).__name__}")
    costs = [ex.packed_tokens(share_prompt) for ex in examples]
    rng = random.Random(seed)
    tiebreak = list(range(len(examples)))
    if shuffle:
        rng.shuffle(tiebreak)
    order = sorted(range(len(examples)), key=lambda i: (-costs[i], tiebreak[i]))
    bins = _best_fit_decreasing(order, costs, token_budget)
    bins = _split_until_multiple(bins, costs, num_ranks)
    plan = _deal_to_ranks(bins, costs, num_ranks, rng, shuffle)
    return PackPlan(plan, _stats(plan, examples, costs, token_budget, seed), share_prompt=share_prompt)
