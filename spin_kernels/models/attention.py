"""Varlen causal attention for packed batches, registered with transformers as "spin_varlen".

Sequence boundaries come from ``cu_seq_lens_q`` (passed by ``packed_hidden_states``) or, when a
caller runs the model directly on packed input, from restarts of ``position_ids``. Attention
never crosses a boundary, whether or not transformers created a KV cache: the boundaries are
applied here, not by transformers' mask code (which stops detecting packed sequences as soon as
a cache exists -- the known leak).

Kernels, by preference (``varlen_backend``):
    * "flash_attn":   flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16; softcap, sliding window);
    * "torch_varlen": PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16; no softcap,
                      no dropout);
    * "sdpa_loop":    a loop over buckets of sequences of similar length, each a right-padded batch
                      through ``scaled_dot_product_attention(is_causal=True)`` (or an explicit masked
                      softmax when softcap / a sliding window is needed); causal attention makes the
                      right padding invisible to real rows (CPU, float32/float64, and anything the
                      kernels above cannot do).

Outside packed training (``generate`` with padding, decoding with a cache), transformers' own
SDPA mask is used and the same maths runs on it, so a prepared model still generates correctly.
"""

from __future__ import annotations

import functools
import itertools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

ATTN_IMPLEMENTATION = "spin_varlen"
#: The keyword through which ``packed_hidden_states`` hands a shared-prompt batch's
#: ``SharedPromptLayout`` to every attention call (transformers passes it down untouched).
SHARED_PROMPT_KWARG = "spin_shared_prompt"
BACKENDS = ("flash_attn", "torch_varlen", "sdpa_loop")


@functools.cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except (ImportError, OSError, RuntimeError):  # not installed, or built for another torch/CUDA
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_backend(device: torch.device, dtype: torch.dtype, *, softcap: float | None = None,
                   dropout: float = 0.0) -> str:
    """The kernel ``varlen_attention`` uses for these inputs: one of ``BACKENDS``."""
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda" and half:
        if _flash_attn_varlen() is not None:
            return "flash_attn"
        if _torch_varlen() is not None and softcap is None and dropout == 0.0:
            return "torch_varlen"
        if softcap is not None and "softcap" not in _warned:
            _warned.add("softcap")
            warnings.warn("spin_varlen: attention softcap without flash-attn runs a per-sequence loop; install "
                          "flash-attn for speed", RuntimeWarning, stacklevel=3)
    return "sdpa_loop"


_warned: set[str] = set()


def _window_ok(window: int | None, length: int) -> bool:
    return window is None or window >= length


def _attend(q: Tensor, k: Tensor, v: Tensor, *, scale: float, window: int | None, softcap: float | None,
            dropout: float, mask: Tensor | None = None) -> Tensor:
    """Causal attention of [B, Hq, Lq, D] queries on [B, Hkv, Lk, D] keys/values -> [B, Hq, Lq, D].

    Without ``mask``, query i sits at key position Lk - Lq + i (bottom-right alignment, as after
    a cache) and sees keys in (pos - window, pos]. A boolean ``mask`` [B or 1, 1, Lq, Lk] (True =
    attend, from transformers' SDPA mask) replaces both rules.
    """
    lq, lk = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    if mask is None and softcap is None and lq == lk and _window_ok(window, lk):
        # In q's dtype as documented: under autocast SDPA computes (and returns) the autocast dtype.
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale,
                                              enable_gqa=groups > 1).to(q.dtype)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    work = torch.promote_types(q.dtype, torch.float32)  # softmax at least in fp32, in fp64 for fp64 models
    scores = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        qpos = torch.arange(lk - lq, lk, device=q.device)[:, None]
        kpos = torch.arange(lk, device=q.device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask = mask & (kpos > qpos - window)
    # finfo.min rather than -inf: a fully masked row (left padding) gives a finite, unused output.
    scores = scores.masked_fill(~mask, torch.finfo(work).min)
    probs = torch.softmax(scores, dim=-1)
    if dropout > 0:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, v.to(work)).to(q.dtype)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, scale: float,
                     window: int | None = None, softcap: float | None = None, dropout: float = 0.0) -> Tensor:
    """Causal attention inside each packed sequence.

    Args:
        q: [T, Hq, D]; k, v: [T, Hkv, D] (Hq a multiple of Hkv: grouped-query attention).
        cu_seqlens: [S+1] int, sequence i owns rows cu[i]:cu[i+1]; max_seqlen its longest length.
        scale: the score scale; window: sliding window W (a token sees itself and the W-1 before
            it, transformers' convention) or None; softcap: c * tanh(score / c) or None;
        dropout: attention dropout probability (training only).

    Returns:
        [T, Hq, D] in q's dtype.
    """
    backend = varlen_backend(q.device, q.dtype, softcap=softcap, dropout=dropout)
    if backend == "flash_attn":
        cu = cu_seqlens.to(torch.int32)
        return _flash_attn_varlen()(
            q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=dropout, softmax_scale=scale, causal=True,
            window_size=(window - 1, 0) if window is not None else (-1, -1), softcap=softcap or 0.0)
    if backend == "torch_varlen":
        cu = cu_seqlens.to(torch.int32)
        return _torch_varlen()(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale,
                               window_size=(window - 1, 0) if window is not None else (-1, 0),
                               enable_gqa=q.shape[1] != k.shape[1])
    return bucketed_causal_attention(q, k, v, cu_seqlens.tolist(), scale=scale, window=window, softcap=softcap,
                                     dropout=dropout)


def bucketed_causal_attention(q: Tensor, k: Tensor, v: Tensor, bounds: list[int], *, scale: float,
                              window: int | None = None, softcap: float | None = None, dropout: float = 0.0,
                              rows: Tensor | None = None, owned: Tensor | None = None) -> Tensor:
    """The "sdpa_loop" backend: causal attention inside each sequence of ``bounds``, sequences of
    similar length run as one right-padded batch (``_length_buckets``).

    Args:
        q: [T, Hq, D]; k, v: [T, Hkv, D].
        bounds: host list of S+1 offsets; sequence i is rows bounds[i]:bounds[i+1] (of q, or of ``rows``).
        rows: optional [bounds[-1]] int64 on q's device: sequence rows are q/k/v rows ``rows[n]``, so a
            sequence may reuse rows of another (the shared-prompt layout's synthetic branch reuses the
            prefix). owned: [bounds[-1]] bool with ``rows``: which sequence rows write their output;
            every row of q must be owned exactly once.

    Returns:
        [T, Hq, D] in q's dtype.
    """
    out = torch.empty_like(q)
    for starts, lengths in _length_buckets(bounds):
        # Sequences of similar length run as one right-padded batch: causal attention never lets a
        # real query see a key past its own position, so the padding is invisible to real rows.
        longest = lengths[0]
        offsets = torch.arange(longest, device=q.device)
        start_t = torch.tensor(starts, device=q.device)[:, None]
        length_t = torch.tensor(lengths, device=q.device)[:, None]
        index = start_t + torch.minimum(offsets[None, :], length_t - 1)  # [B, L], padding repeats the last row
        valid = offsets[None, :] < length_t
        if rows is not None:
            valid = valid & owned[index]
            index = rows[index]
        piece = [t[index].transpose(1, 2) for t in (q, k, v)]  # [B, H, L, D]
        result = _attend(*piece, scale=scale, window=window, softcap=softcap, dropout=dropout).transpose(1, 2)
        out[index[valid]] = result[valid]
    return out


def _length_buckets(bounds: list[int], max_waste: float = 0.25) -> list[tuple[list[int], list[int]]]:
    """Group the non-empty sequences of ``cu_seqlens`` (host list) by length, longest first, so that
    padding each group to its longest member wastes at most ``max_waste`` of its tokens.

    Returns [(starts, lengths)] with lengths descending inside each group.
    """
    seqs = sorted(((end - start, start) for start, end in itertools.pairwise(bounds) if end > start), reverse=True)
    buckets: list[tuple[list[int], list[int]]] = []
    for length, start in seqs:
        if buckets:
            starts, lengths = buckets[-1]
            if (len(lengths) + 1) * lengths[0] <= (1 + max_waste) * (sum(lengths) + length):
                starts.append(start)
                lengths.append(length)
                continue
        buckets.append(([start], [length]))
    return buckets


def cu_seqlens_from_position_ids(position_ids: Tensor) -> tuple[Tensor, int]:
    """[T] position ids of packed sequences -> (cu_seqlens [S+1] int32, max_seqlen).

    A sequence starts at token 0 and wherever ``position_ids[n] != position_ids[n-1] + 1``
    (the rule transformers uses to detect packing).
    """
    t = position_ids.shape[0]
    starts = torch.ones(t, dtype=torch.bool, device=position_ids.device)
    starts[1:] = position_ids[1:] != position_ids[:-1] + 1
    cu = torch.cat([starts.nonzero().squeeze(1), torch.tensor([t], device=position_ids.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max()) if t else 0


def spin_varlen_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                                  dropout: float = 0.0, scaling: float | None = None,
                                  sliding_window: int | None = None, softcap: float | None = None,
                                  **kwargs) -> tuple[Tensor, None]:
    """transformers AttentionInterface entry: query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D] ->
    ([B, Lq, Hq, D], None).

    * ``spin_shared_prompt`` given (``packed_hidden_states`` on a shared-prompt batch): one packed
      row, the layout's own attention (spin_kernels.models.shared_prompt).
    * ``cu_seq_lens_q`` given (``packed_hidden_states``): one packed row, varlen.
    * no mask, Lq = Lk, ``position_ids`` given: each row is split where its positions restart.
    * otherwise (decoding with a cache, padded prompts): causal attention under transformers' mask.
    """
    if kwargs.get("output_attentions"):
        raise ValueError("spin_varlen attention does not return attention weights (output_attentions=True)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    b, _, lq, _ = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    varlen = functools.partial(varlen_attention, scale=scale, window=sliding_window, softcap=softcap, dropout=dropout)
    shared = kwargs.get(SHARED_PROMPT_KWARG)
    if shared is not None:  # a shared-prompt batch (spin_kernels.models.shared_prompt)
        if b != 1 or lq != key.shape[2] or attention_mask is not None:
            raise ValueError(f"{SHARED_PROMPT_KWARG} needs one packed row without a padding mask and without cached "
                             f"keys; got batch {b}, {lq} queries, {key.shape[2]} keys")
        out = shared.attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                               scale=scale, window=sliding_window, softcap=softcap, dropout=dropout)
        return out.unsqueeze(0), None
    if cu is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and cu_k is not cu and not torch.equal(cu_k, cu):
            raise ValueError("spin_varlen attention is self-attention: cu_seq_lens_k must equal cu_seq_lens_q")
        if b != 1 or lq != key.shape[2] or attention_mask is not None:
            raise ValueError(f"cu_seq_lens_q needs one packed row without a padding mask and without cached keys; "
                             f"got batch {b}, {lq} queries, {key.shape[2]} keys")
        max_len = kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max())
        out = varlen(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu, int(max_len))
        return out.unsqueeze(0), None
    if attention_mask is None and lq == key.shape[2] and position_ids is not None:
        # A direct call on packed rows (possibly with a fresh cache): boundaries from position_ids, row by row.
        rows = position_ids.reshape(-1, lq).expand(b, lq)
        out = torch.stack([varlen(query[i].transpose(0, 1), key[i].transpose(0, 1), value[i].transpose(0, 1),
                                  *cu_seqlens_from_position_ids(rows[i])) for i in range(b)])
        return out, None
    mask = attention_mask if attention_mask is not None and attention_mask.dtype == torch.bool else None
    if attention_mask is not None and mask is None:
        raise TypeError(f"spin_varlen attention expects a boolean mask, got {attention_mask.dtype}")
    out = _attend(query, key, value, scale=scale, window=sliding_window, softcap=softcap, dropout=dropout, mask=mask)
    return out.transpose(1, 2).contiguous(), None


def _spin_varlen_mask(*, attention_mask: Tensor | None = None, **kwargs):
    """Mask interface entry: no mask for unpadded input (boundaries and causality are applied in
    the attention function); transformers' SDPA mask (bool) when there is padding to honour."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(attention_mask=attention_mask, **kwargs)


def register_attention() -> str:
    """Register "spin_varlen" with transformers' AttentionInterface and mask interface (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, spin_varlen_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _spin_varlen_mask)
    return ATTN_IMPLEMENTATION
