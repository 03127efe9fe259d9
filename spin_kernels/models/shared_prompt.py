"""Attention for the shared-prompt layout (``pack_batch(..., share_prompt=True)``).

Pair p is one segment ``[prefix | real branch | synthetic branch]`` (spin_kernels.packing.batch:
the prefix is ``prompt[:-1]``, each branch is ``prompt[-1]`` + its response, positions of both
branches continue from the prefix). The rule: a query attends to a key of its own segment iff

    the key is in the prefix or in the query's own branch,  and  pos(key) <= pos(query)
    (and pos(query) - pos(key) < W under a sliding window W).

The prefix with one branch is then exactly the sequence ``prompt + response`` of the default
layout, with the same position ids, so every branch token gets exactly the attention it gets
there; the prefix runs through the projections, MLPs and norms once instead of twice.

Backends (``shared_prompt_backend``):

* ``"flex"``: FlexAttention with a block mask from the rule, nothing gathered (CUDA: compiled, blocks
  the rule masks entirely are skipped; softcap as a score_mod). On CPU, torch runs FlexAttention
  eagerly and forward only (no backward); the tests use that to check the mask.
* ``"sdpa_gather"``: each branch, preceded by its prefix, is gathered into one ordinary causal
  sequence (the synthetic one re-reads the prefix rows) and the sequences go through the
  "sdpa_loop" buckets of spin_kernels.models.attention; the synthetic sequence writes back only
  its branch rows. Its attention work is that of the default layout (the prefix's queries are
  computed again for the synthetic sequence: prefix² / 2 scores); what sharing saves is the
  prefix's projections, MLPs and norms. CPU, attention dropout, and CUDA without FlexAttention.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .attention import SHARED_PROMPT_KWARG, bucketed_causal_attention

SHARED_BACKENDS = ("flex", "sdpa_gather")

__all__ = ["SHARED_BACKENDS", "SHARED_PROMPT_KWARG", "SharedPromptLayout", "shared_prompt_backend"]


@functools.cache
def _flex():
    """(flex_attention, create_block_mask), or None when this torch has no FlexAttention."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return flex_attention, create_block_mask


@functools.cache
def _compiled_flex_attention():
    # FlexAttention is only fused (and block-sparse) when compiled; dynamic shapes, because every
    # packed batch has its own token count.
    return torch.compile(_flex()[0], dynamic=True)


def shared_prompt_backend(device: torch.device, dtype: torch.dtype, *, dropout: float = 0.0) -> str:
    """The backend ``SharedPromptLayout.attention`` uses for these inputs: one of ``SHARED_BACKENDS``."""
    if device.type == "cuda" and dropout == 0.0 and _flex() is not None:
        return "flex"
    return "sdpa_gather"


class SharedPromptLayout:
    """What the attention needs of one shared-prompt batch. Built once per forward
    (``packed_hidden_states``) and handed to every attention call, so that what is derived from it
    (gather rows, block masks per sliding window) is derived once, not once per layer.

    Args:
        segment_cu_seqlens: [3P+1] int, ``PackedBatch.segment_cu_seqlens``.
        position_ids: [T] int64, ``PackedBatch.position_ids``, on the same device.
        backend: None (``shared_prompt_backend`` decides per call) or one of ``SHARED_BACKENDS``.
    """

    def __init__(self, segment_cu_seqlens: Tensor, position_ids: Tensor, *, backend: str | None = None):
        if not isinstance(segment_cu_seqlens, Tensor) or segment_cu_seqlens.dim() != 1 \
                or segment_cu_seqlens.shape[0] % 3 != 1 or segment_cu_seqlens.dtype.is_floating_point:
            raise ValueError("segment_cu_seqlens must be a 1-D integer tensor of 3P+1 offsets (PackedBatch."
                             f"segment_cu_seqlens), got {getattr(segment_cu_seqlens, 'shape', segment_cu_seqlens)}")
        if not isinstance(position_ids, Tensor) or position_ids.dim() != 1:
            raise ValueError(f"position_ids must be a 1-D tensor [T], got {getattr(position_ids, 'shape', None)}")
        if backend is not None and backend not in SHARED_BACKENDS:
            raise ValueError(f"backend must be None or one of {SHARED_BACKENDS}, got {backend!r}")
        self.segment_cu_seqlens = segment_cu_seqlens
        self.position_ids = position_ids
        self.backend = backend
        self._gather: tuple[list[int], Tensor, Tensor] | None = None
        self._tokens: tuple[Tensor, Tensor] | None = None
        self._block_masks: dict[int | None, object] = {}

    @classmethod
    def from_batch(cls, batch, *, backend: str | None = None) -> SharedPromptLayout:
        """The layout of a ``PackedBatch`` packed with ``share_prompt=True``."""
        if batch.segment_cu_seqlens is None:
            raise ValueError("batch is not a shared-prompt batch (pack_batch(..., share_prompt=True))")
        return cls(batch.segment_cu_seqlens, batch.position_ids, backend=backend)

    @property
    def num_tokens(self) -> int:
        return self.position_ids.shape[0]

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, window: int | None = None,
                  softcap: float | None = None, dropout: float = 0.0) -> Tensor:
        """Attention under the shared-prompt rule (module docstring).

        Args:
            q: [T, Hq, D]; k, v: [T, Hkv, D] (Hq a multiple of Hkv), T = the batch's tokens.
            scale, window, softcap, dropout: as in ``spin_kernels.models.varlen_attention``.

        Returns:
            [T, Hq, D] in q's dtype.
        """
        if q.shape[0] != self.num_tokens or k.shape[0] != self.num_tokens or v.shape[0] != self.num_tokens:
            raise ValueError(f"q, k, v must have the batch's {self.num_tokens} tokens, got {q.shape[0]}, "
                             f"{k.shape[0]}, {v.shape[0]}")
        backend = self.backend or shared_prompt_backend(q.device, q.dtype, dropout=dropout)
        if backend == "flex":
            if dropout:
                raise ValueError("the flex backend has no attention dropout; use backend='sdpa_gather'")
            return self._flex_attention(q, k, v, scale=scale, window=window, softcap=softcap)
        bounds, rows, owned = self._gather_rows(q.device)
        return bucketed_causal_attention(q, k, v, bounds, rows=rows, owned=owned, scale=scale, window=window,
                                         softcap=softcap, dropout=dropout)

    # -- "sdpa_gather" ---------------------------------------------------------------------------

    def _gather_rows(self, device: torch.device) -> tuple[list[int], Tensor, Tensor]:
        """(bounds, rows, owned) of the 2P gathered causal sequences, interleaved real, synthetic:

        * real p:      rows seg[3p] : seg[3p+2]                    (prefix + real branch, contiguous)
        * synthetic p: rows seg[3p] : seg[3p+1], seg[3p+2] : seg[3p+3]  (prefix again + synthetic branch)

        ``owned`` is False on the synthetic sequences' prefix rows (the real sequence writes them).
        Built on the host once per layout: one device-to-host copy of 3P+1 offsets.
        """
        if self._gather is None:
            seg = self.segment_cu_seqlens.to("cpu", torch.int64)
            start, prefix_end, real_end, end = seg[0:-1:3], seg[1::3], seg[2::3], seg[3::3]
            # Three runs of consecutive rows per pair: the real sequence, the prefix again, the synthetic branch.
            run_start = torch.stack([start, start, real_end], 1).flatten()
            run_len = torch.stack([real_end - start, prefix_end - start, end - real_end], 1).flatten()
            run_owned = torch.tensor([True, False, True]).repeat(start.shape[0])
            first = torch.cumsum(run_len, 0) - run_len
            total = int(run_len.sum())
            rows = run_start.repeat_interleave(run_len) + torch.arange(total) - first.repeat_interleave(run_len)
            owned = run_owned.repeat_interleave(run_len)
            seq_len = torch.stack([real_end - start, (prefix_end - start) + (end - real_end)], 1).flatten()
            bounds = [0] + torch.cumsum(seq_len, 0).tolist()
            self._gather = (bounds, rows.to(device), owned.to(device))
        return self._gather

    # -- "flex" ----------------------------------------------------------------------------------

    def _pair_and_branch(self) -> tuple[Tensor, Tensor]:
        """[T] pair index and [T] piece (0 prefix, 1 real branch, 2 synthetic branch) of each token,
        on the batch's device without a host synchronisation."""
        if self._tokens is None:
            seg = self.segment_cu_seqlens.to(torch.int64)
            token = torch.arange(self.num_tokens, device=seg.device)
            piece = torch.searchsorted(seg[1:], token, right=True)  # empty pieces are skipped
            self._tokens = (piece // 3, piece % 3)
        return self._tokens

    def block_mask(self, window: int | None = None):
        """The FlexAttention BlockMask of the rule (module docstring), cached per ``window``."""
        if window not in self._block_masks:
            pair, branch = self._pair_and_branch()
            pos = self.position_ids

            def mask_mod(b, h, q_idx, kv_idx):
                allowed = ((pair[q_idx] == pair[kv_idx])
                           & ((branch[kv_idx] == 0) | (branch[kv_idx] == branch[q_idx]))
                           & (pos[kv_idx] <= pos[q_idx]))
                if window is not None:
                    allowed = allowed & (pos[q_idx] - pos[kv_idx] < window)
                return allowed

            t = self.num_tokens
            self._block_masks[window] = _flex()[1](mask_mod, None, None, t, t, device=pos.device)
        return self._block_masks[window]

    def _flex_attention(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, window: int | None,
                        softcap: float | None) -> Tensor:
        if _flex() is None:
            raise RuntimeError("this torch has no FlexAttention (torch.nn.attention.flex_attention)")
        score_mod = None
        if softcap is not None:
            def score_mod(score, b, h, q_idx, kv_idx):  # the scaled score, as transformers caps it
                return softcap * torch.tanh(score / softcap)
        # Fused only when compiled (CUDA); on CPU torch runs it eagerly, forward only.
        attend = _compiled_flex_attention() if q.device.type == "cuda" else _flex()[0]
        out = attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                     score_mod=score_mod, block_mask=self.block_mask(window), scale=scale,
                     enable_gqa=q.shape[1] != k.shape[1])
        return out[0].transpose(0, 1)
