"""PackedBatch: the padding-free layout of a micro-batch of SPIN pairs.

All sequences are concatenated into one row of T tokens; ``cu_seqlens`` marks where each
starts. Pair p owns sequences 2p (prompt + real) and 2p+1 (prompt + synthetic), the
interleaved order of the fused ops (spin_kernels.ops).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from itertools import chain

import torch
from torch import Tensor

from .example import SpinExample

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """A packed micro-batch of S = 2P sequences and T tokens.

    Attributes:
        input_ids: [T] int64, all sequences concatenated.
        position_ids: [T] int64, 0, 1, ... restarting at 0 in each sequence.
        cu_seqlens: [S+1] int32, sequence i owns tokens ``cu_seqlens[i]:cu_seqlens[i+1]``.
        max_seqlen: the longest sequence (a Python int, so attention kernels need no host sync).
        targets: [T] int64, ``targets[n]`` is the token row n predicts (``input_ids[n+1]`` of the
            same sequence) when that token is a response token; ``-100`` (ignore) for rows whose
            next token is still in the prompt and for the last row of each sequence.
        ref_logps: [S] float32 reference log-probs, interleaved like the sequences, or None.
        example_index: [P] int64, ``SpinExample.index`` of each pair.
    """

    input_ids: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    targets: Tensor
    ref_logps: Tensor | None
    example_index: Tensor

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def num_pairs(self) -> int:
        return self.num_sequences // 2

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_counted(self) -> int:
        """Rows with a target (response tokens); one host sync on an accelerator."""
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def _map(self, fn) -> PackedBatch:
        changes = {f.name: fn(getattr(self, f.name)) for f in fields(self)
                   if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """A copy on ``device`` (dtypes unchanged). Use ``non_blocking=True`` with ``pin_memory()``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedBatch:
        """A copy in page-locked host memory, for asynchronous host-to-device copies.

        Without an accelerator there is nothing to pin for; the batch is returned unchanged.
        """
        if not torch.cuda.is_available():
            return self
        return self._map(lambda t: t.pin_memory())


def pack_batch(examples: Sequence[SpinExample]) -> PackedBatch:
    """Pack the pairs of ``examples``, in the given order, into one PackedBatch on the CPU.

    Args:
        examples: non-empty sequence of SpinExample. Either all of them carry ``ref_logps`` or
            none does.

    Returns:
        PackedBatch with S = 2 * len(examples) sequences.
    """
    if len(examples) == 0:
        raise ValueError("examples must hold at least one SpinExample")
    for i, ex in enumerate(examples):
        if not isinstance(ex, SpinExample):
            raise TypeError(f"examples[{i}] must be a SpinExample, got {type(ex).__name__}")
        if not ex.real_ids or not ex.synthetic_ids:
            raise ValueError(f"examples[{i}] (index {ex.index}) has an empty response; "
                             "a sequence must predict at least one token")
    with_ref = [ex.ref_logps is not None for ex in examples]
    if any(with_ref) and not all(with_ref):
        raise ValueError("examples mix pairs with and without ref_logps; give all of them ref_logps or none")

    sequences = list(chain.from_iterable(
        (ex.prompt_ids + ex.real_ids, ex.prompt_ids + ex.synthetic_ids) for ex in examples))
    prompt_lens = torch.tensor([len(ex.prompt_ids) for ex in examples], dtype=torch.int64).repeat_interleave(2)
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    input_ids = torch.tensor(list(chain.from_iterable(sequences)), dtype=torch.int64)

    cu = torch.zeros(len(sequences) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=cu[1:])
    starts = cu[:-1].repeat_interleave(lengths)
    position_ids = torch.arange(input_ids.shape[0], dtype=torch.int64) - starts

    # Row n predicts token n+1 of its own sequence: counted when that token is a response
    # token, i.e. position n+1 >= prompt length and n+1 < the sequence length.
    next_pos = position_ids + 1
    counted = (next_pos >= prompt_lens.repeat_interleave(lengths)) & (next_pos < lengths.repeat_interleave(lengths))
    shifted = torch.cat([input_ids[1:], input_ids.new_full((1,), IGNORE_INDEX)])
    targets = torch.where(counted, shifted, torch.full_like(input_ids, IGNORE_INDEX))

    ref = None
    if all(with_ref):
        ref = torch.tensor([v for ex in examples for v in ex.ref_logps], dtype=torch.float32)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seqlens=cu.to(torch.int32),
        max_seqlen=int(lengths.max()),
        targets=targets,
        ref_logps=ref,
        example_index=torch.tensor([ex.index for ex in examples], dtype=torch.int64),
    )
