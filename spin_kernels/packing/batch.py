"""PackedBatch: the padding-free layout of a micro-batch of SPIN pairs.

All sequences are concatenated into one row of T tokens; ``cu_seqlens`` marks where each
starts. Pair p owns sequences 2p (prompt + real) and 2p+1 (prompt + synthetic), the
interleaved order of the fused ops (spin_kernels.ops).

Two layouts (``pack_batch(..., share_prompt=...)``):

* default: each pair is two sequences, ``prompt + real`` and ``prompt + synthetic``; the prompt
  is held, and run through the model, twice.
* shared prompt: each pair is one segment of three pieces,

      [ prompt[:-1] | prompt[-1] + real | prompt[-1] + synthetic ]
        the prefix    the real branch     the synthetic branch

  Every token attends to the prefix (causally, by position) and to its own branch, never to
  the other branch (``spin_kernels.models`` applies this rule in attention); position ids of
  both branches continue from the prefix (``len(prompt) - 1, len(prompt), ...``), so each
  branch sees exactly what its token sees in the default layout.

  The prompt's LAST token is the one exception to "computed once": it starts each branch. Its
  hidden state is needed twice with two targets (the first real token, the first synthetic
  token), and holding it twice as a token -- one extra token per pair, attending to the same
  keys in both branches -- makes each response's loss rows contiguous: sequence 2p (the loss
  sequence of the real response) is the prefix + the real branch, sequence 2p+1 is the
  synthetic branch. ``cu_seqlens`` and ``targets`` are therefore in the same form as in the
  default layout, with the same counted rows in the same order, and the fused ops run on all
  T hidden rows unchanged: no index that gathers rows for the loss, no copy of a hidden row.
  (The prefix rows all have target -100; which sequence owns them does not change any sum.)
  Without a prompt there is no prefix and no extra token. A shared batch must go through
  ``spin_kernels.models.packed_hidden_states`` (or the helpers on it), which hands the layout
  to the attention: a plain model call would let each branch attend to the other.
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
    """A packed micro-batch of S = 2P sequences and T tokens (see the module docstring for the
    default and the shared-prompt layout).

    Attributes:
        input_ids: [T] int64, all sequences (or, shared, all segments) concatenated.
        position_ids: [T] int64, 0, 1, ... restarting at 0 in each sequence (shared: in each
            segment, both branches continuing from the prefix).
        cu_seqlens: [S+1] int32, sequence i owns tokens ``cu_seqlens[i]:cu_seqlens[i+1]``: the
            rows and boundaries the fused ops sum over. Shared: sequence 2p = prefix + real
            branch, 2p+1 = synthetic branch (these are loss sequences, not attention spans).
        max_seqlen: the longest prompt + response (a Python int, so attention kernels need no host
            sync); the same value in both layouts.
        targets: [T] int64, ``targets[n]`` is the token row n predicts (``input_ids[n+1]`` of the
            same sequence) when that token is a response token; ``-100`` (ignore) for rows whose
            next token is still in the prompt and for the last row of each sequence.
        ref_logps: [S] float32 reference log-probs, interleaved like the sequences, or None.
        example_index: [P] int64, ``SpinExample.index`` of each pair.
        segment_cu_seqlens: None in the default layout. Shared: [3P+1] int32 offsets ``seg``; pair p
            is tokens ``seg[3p]:seg[3p+3]``: its prefix ``seg[3p]:seg[3p+1]`` (empty for a prompt of
            0 or 1 tokens), real branch ``seg[3p+1]:seg[3p+2]``, synthetic branch
            ``seg[3p+2]:seg[3p+3]``. What the attention reads (spin_kernels.models.shared_prompt).
    """

    input_ids: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    targets: Tensor
    ref_logps: Tensor | None
    example_index: Tensor
    segment_cu_seqlens: Tensor | None = None

    @property
    def share_prompt(self) -> bool:
        """True for the shared-prompt layout (``pack_batch(..., share_prompt=True)``)."""
        return self.segment_cu_seqlens is not None

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


def _check_ids(ex: SpinExample, i: int, vocab_size: int | None) -> None:
    for name in ("prompt_ids", "real_ids", "synthetic_ids"):
        ids = getattr(ex, name)
        if not ids or (min(ids) >= 0 and (vocab_size is None or max(ids) < vocab_size)):
            continue
        bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            limit = f"[0, {vocab_size})" if vocab_size is not None else "ids >= 0"
            raise ValueError(f"examples[{i}] (index {ex.index}): {name} holds token id {bad[0]} outside the "
                             f"vocabulary ({limit}; {len(bad)} such id(s)): ids from another tokenizer?")


def pack_batch(examples: Sequence[SpinExample], *, share_prompt: bool = False,
               vocab_size: int | None = None) -> PackedBatch:
    """Pack the pairs of ``examples``, in the given order, into one PackedBatch on the CPU.

    Args:
        examples: non-empty sequence of SpinExample. Either all of them carry ``ref_logps`` or
            none does.
        share_prompt: False (default): each pair as two sequences, the prompt held twice. True:
            each pair as one segment ``[prompt[:-1] | prompt[-1] + real | prompt[-1] + synthetic]``
            (module docstring); ``SpinExample.packed_tokens(True)`` tokens per pair.
        vocab_size: the model's vocabulary; a token id >= it (or any negative id, always) is
            refused naming the example, the sequence and the id, instead of failing later in the
            embedding (an index error on CPU, a device-side assert on GPU).

    Returns:
        PackedBatch with S = 2 * len(examples) sequences.
    """
    if not isinstance(share_prompt, bool):
        raise TypeError(f"share_prompt must be a bool, got {type(share_prompt).__name__}")
    if len(examples) == 0:
        raise ValueError("examples must hold at least one SpinExample")
    for i, ex in enumerate(examples):
        if not isinstance(ex, SpinExample):
            raise TypeError(f"examples[{i}] must be a SpinExample, got {type(ex).__name__}")
        if not ex.real_ids or not ex.synthetic_ids:
            raise ValueError(f"examples[{i}] (index {ex.index}) has an empty response; "
                             "a sequence must predict at least one token")
        _check_ids(ex, i, vocab_size)
    with_ref = [ex.ref_logps is not None for ex in examples]
    if any(with_ref) and not all(with_ref):
        raise ValueError("examples mix pairs with and without ref_logps; give all of them ref_logps or none")

    # Both layouts are runs of "pieces" of tokens: (prompt + real, prompt + synthetic) per pair, or
    # (prefix, real branch, synthetic branch). first_pos is the position id of a piece's first token.
    pieces: list[list[int]] = []
    first_pos: list[int] = []
    for ex in examples:
        if share_prompt:
            head, branch_pos = ex.prompt_ids[-1:], max(len(ex.prompt_ids) - 1, 0)
            pieces += [ex.prompt_ids[:-1], head + ex.real_ids, head + ex.synthetic_ids]
            first_pos += [0, branch_pos, branch_pos]
        else:
            pieces += [ex.prompt_ids + ex.real_ids, ex.prompt_ids + ex.synthetic_ids]
            first_pos += [0, 0]
    per_pair = len(pieces) // len(examples)
    lengths = torch.tensor([len(s) for s in pieces], dtype=torch.int64)
    prompt_lens = torch.tensor([len(ex.prompt_ids) for ex in examples], dtype=torch.int64).repeat_interleave(per_pair)
    input_ids = torch.tensor(list(chain.from_iterable(pieces)), dtype=torch.int64)

    cu = torch.zeros(len(pieces) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=cu[1:])
    offset = torch.arange(input_ids.shape[0], dtype=torch.int64) - cu[:-1].repeat_interleave(lengths)
    position_ids = offset + torch.tensor(first_pos, dtype=torch.int64).repeat_interleave(lengths)

    # Row n predicts the next token of its own piece: counted when that token is a response token,
    # i.e. its position >= the prompt length and it lies inside the piece. (A prefix row never
    # qualifies: its next position is <= len(prompt) - 1.)
    counted = ((position_ids + 1 >= prompt_lens.repeat_interleave(lengths))
               & (offset + 1 < lengths.repeat_interleave(lengths)))
    shifted = torch.cat([input_ids[1:], input_ids.new_full((1,), IGNORE_INDEX)])
    targets = torch.where(counted, shifted, torch.full_like(input_ids, IGNORE_INDEX))

    segments = None
    if share_prompt:
        # Loss sequences: prefix + real branch, then the synthetic branch (drop each pair's boundary 3p+1).
        segments = cu
        cu = cu[torch.arange(cu.shape[0]) % 3 != 1]

    ref = None
    if all(with_ref):
        ref = torch.tensor([v for ex in examples for v in ex.ref_logps], dtype=torch.float32)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seqlens=cu.to(torch.int32),
        max_seqlen=max(len(ex.prompt_ids) + max(len(ex.real_ids), len(ex.synthetic_ids)) for ex in examples),
        targets=targets,
        ref_logps=ref,
        example_index=torch.tensor([ex.index for ex in examples], dtype=torch.int64),
        segment_cu_seqlens=None if segments is None else segments.to(torch.int32),
    )
