"""Sampling from Hugging Face causal LMs: per-example random streams and continuous batching.

**Per-example sampling** (``ExampleSampler``). Ancestral sampling at temperature T and top_p p
draws token ``argmax_v (z_v / T + G_v)`` over the top-p set, with G_v i.i.d. standard Gumbel
noise: exactly the distribution of ``multinomial(softmax(z / T))`` (the Gumbel-max trick). Each
example has its own ``torch.Generator``, seeded from (seed, example key), that draws one
float64 noise vector per generated token. So an example's sample depends on its own seed and
its own logits only, not on which other prompts share its batch or in what order they come: a
sorted, budgeted or continuously batched run samples what a plain one does, up to the rounding
of the logits by the batch shape (a tie between two tokens within ~1e-7 could then break the
other way; the generation stage records the batching settings so such rows are never mixed).

It runs inside ``model.generate`` as a logits processor (greedy decoding over noised scores:
``ExampleSampler.processor``), and in the continuous-batching loop below.

**Continuous batching** (``continuous_generate``): ``slots`` sequences decode together; when one
ends (EOS or max_new_tokens) its slot takes the next waiting prompt in the same step, so no step
is spent on finished rows. Each step is one forward of the model on a packed row: the newest
token of every running sequence and the whole prompt of every admitted one (position ids per
sequence, ``logits_to_keep`` = the last token of each). Keys and values live in a slot cache
([slots, kv heads, capacity, head dim] per layer) written and read by the ``spin_decode``
attention registered with transformers' AttentionInterface: decode queries attend to their slot's
cache under a length mask (scaled_dot_product_attention), admitted prompts run causal varlen
attention within themselves (``attention.varlen_attention``). Softcapped and sliding-window
attention (Gemma-2) are honoured. Everything is scheduled on the host from Python ints, so the
order of work is a function of the prompts alone: the same prompts give the same steps.

Several processes (FSDP): every forward all-gathers the layers, so every rank must run as many
forwards; ``sync`` (a callable: does any rank still have work?) keeps a finished rank stepping on
a one-token dummy until all are done (what ``synced_gpus`` does for ``generate``).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import _attend, varlen_attention

DECODE_ATTENTION = "spin_decode"


def example_seed(seed: int, key: Any) -> int:
    """A 63-bit seed for example ``key`` (any JSON value, e.g. its data index) under ``seed``."""
    blob = json.dumps([seed, key], sort_keys=True, separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


class ExampleSampler:
    """Gumbel-max sampling with one random stream per example (see the module docstring).

    Args:
        seeds: one seed per example (``example_seed``), in the order of the rows it will see.
        temperature: > 0; top_p: in (0, 1] (1: no nucleus cut); no top_k (the paper's sampling).
        device: where the noise is drawn (the logits' device).
    """

    def __init__(self, seeds: Sequence[int], *, temperature: float = 1.0, top_p: float = 1.0,
                 device: torch.device | str = "cpu"):
        if not temperature > 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {temperature}, {top_p}")
        self.temperature, self.top_p, self.device = float(temperature), float(top_p), torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def add(self, seed: int) -> int:
        """A new example's stream; returns its row number."""
        self.generators.append(torch.Generator(device=self.device).manual_seed(int(seed)))
        return len(self.generators) - 1

    def warp(self, scores: Tensor) -> Tensor:
        """[B, V] logits -> float64 scores over the allowed tokens (temperature, then top_p: the
        order of transformers' warpers); tokens outside the top-p set get -inf."""
        z = scores.double()
        if self.temperature != 1.0:
            z = z / self.temperature
        if self.top_p < 1.0:
            sorted_z, order = torch.sort(z, dim=-1, descending=False)
            cumulative = sorted_z.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= 1 - self.top_p
            drop[..., -1] = False  # the most likely token always stays
            z = z.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return z

    def noised(self, scores: Tensor, rows: Sequence[int]) -> Tensor:
        """[B, V] logits of examples ``rows`` -> float64 scores whose argmax is each one's sample;
        draws one noise vector from each example's stream."""
        noise = torch.stack([torch.rand(scores.shape[-1], generator=self.generators[r], device=self.device,
                                        dtype=torch.float64) for r in rows])
        return self.warp(scores) - torch.log(-torch.log(noise))  # u = 0 gives -inf: never chosen

    def sample(self, scores: Tensor, rows: Sequence[int]) -> Tensor:
        """[B, V] logits -> [B] int64 sampled tokens."""
        return self.noised(scores, rows).argmax(dim=-1)

    def processor(self):
        """A transformers LogitsProcessor for ``generate(do_sample=False, ...)`` on a batch whose
        row i is example i: greedy decoding over the noised scores is this sampler."""
        from transformers import LogitsProcessor

        sampler = self

        class _Noise(LogitsProcessor):
            def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
                return sampler.noised(scores, range(scores.shape[0]))

        return _Noise()


# --------------------------------------------------------------------------- the slot cache


@dataclass
class _Step:
    """What one forward holds: ``num_decode`` decode tokens first (slot ``decode_slots[i]`` at
    position ``decode_pos[i]``), then the admitted prompts (slot, length), packed."""

    num_decode: int
    decode_slots: Tensor | None
    decode_pos: Tensor | None
    decode_len: int  # the longest cache a decode token reads: max(decode_pos) + 1
    decode_all: bool  # decode_slots == 0..slots-1 (the cache is read in place, no gather)
    prefill: list[tuple[int, int]]
    prefill_cu: Tensor | None
    prefill_max: int


@dataclass
class SlotCache:
    """Keys and values of ``slots`` sequences of up to ``capacity`` tokens, per layer (allocated
    on the first forward, in the dtype and device of the keys)."""

    slots: int
    capacity: int
    keys: dict[int, Tensor] = field(default_factory=dict)
    values: dict[int, Tensor] = field(default_factory=dict)
    step: _Step | None = None

    def layer(self, idx: int, like: Tensor) -> tuple[Tensor, Tensor]:
        if idx not in self.keys:
            shape = (self.slots, like.shape[1], self.capacity, like.shape[3])
            self.keys[idx] = like.new_zeros(shape)
            self.values[idx] = like.new_zeros(shape)
        return self.keys[idx], self.values[idx]


_ACTIVE: list[SlotCache] = []


def decode_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                             dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
                             softcap: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers AttentionInterface entry of ``spin_decode``: query [1, Hq, T, D], key/value
    [1, Hkv, T, D] of one packed step (see ``_Step``) -> ([1, T, Hq, D], None)."""
    if not _ACTIVE or _ACTIVE[-1].step is None:
        raise RuntimeError("spin_decode attention runs only inside continuous_generate")
    cache = _ACTIVE[-1]
    step = cache.step
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None or query.shape[0] != 1:
        raise RuntimeError("spin_decode attention needs one packed row and modules with a layer_idx")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    k_cache, v_cache = cache.layer(layer_idx, key)
    q, k, v = query[0], key[0], value[0]  # [H, T, D]
    out = q.new_empty(q.shape[1], q.shape[0], q.shape[2])  # [T, Hq, D]
    n = step.num_decode
    if n:
        slots, pos = step.decode_slots, step.decode_pos
        k_cache[slots, :, pos] = k[:, :n].transpose(0, 1)
        v_cache[slots, :, pos] = v[:, :n].transpose(0, 1)
        length = step.decode_len
        kk = k_cache[:, :, :length] if step.decode_all else k_cache[slots, :, :length]
        vv = v_cache[:, :, :length] if step.decode_all else v_cache[slots, :, :length]
        kpos = torch.arange(length, device=q.device)[None, :]
        mask = kpos <= pos[:, None]
        if sliding_window is not None:
            mask = mask & (kpos > pos[:, None] - sliding_window)
        qd = q[:, :n].transpose(0, 1).unsqueeze(2)  # [n, Hq, 1, D]
        mask = mask[:, None, None, :]
        if softcap is None:
            o = F.scaled_dot_product_attention(qd, kk, vv, attn_mask=mask, scale=scale,
                                               enable_gqa=qd.shape[1] != kk.shape[1])
        else:
            o = _attend(qd, kk, vv, scale=scale, window=None, softcap=softcap, dropout=0.0, mask=mask)
        out[:n] = o[:, :, 0]
    if step.prefill:
        start = n
        for slot, length in step.prefill:
            k_cache[slot, :, :length] = k[:, start:start + length]
            v_cache[slot, :, :length] = v[:, start:start + length]
            start += length
        out[n:] = varlen_attention(q[:, n:].transpose(0, 1), k[:, n:].transpose(0, 1), v[:, n:].transpose(0, 1),
                                   step.prefill_cu, step.prefill_max, scale=scale, window=sliding_window,
                                   softcap=softcap)
    return out.unsqueeze(0), None


def _no_mask(**kwargs):
    return None  # positions, boundaries and causality are applied by the attention itself


def register_decode_attention() -> str:
    """Register ``spin_decode`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(DECODE_ATTENTION, decode_attention_forward)
    AttentionMaskInterface.register(DECODE_ATTENTION, _no_mask)
    return DECODE_ATTENTION


@contextlib.contextmanager
def _decode_attention(model):
    """The model (and its sub-models) on ``spin_decode`` attention while inside; restored after."""
    name = register_decode_attention()
    config = model.config
    previous = config._attn_implementation
    model.set_attn_implementation(name)
    if config._attn_implementation != name:
        raise RuntimeError(f"{type(model).__name__} refused attn_implementation={name!r} "
                           "(it does not use transformers' AttentionInterface)")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


# --------------------------------------------------------------------------- the loop


@dataclass
class _Running:
    request: int  # position in the prompts
    row: int  # the sampler's stream
    tokens: list[int]
    length: int  # tokens in the slot's cache


class _Schedule:
    """The host side of continuous batching, in Python ints: prompts waiting, sequences running
    in slots, free slots (lowest first), and the results. A function of the prompts alone."""

    def __init__(self, prompts: Sequence[Sequence[int]], slots: int, max_new_tokens: int, eos: set[int]):
        self.prompts, self.max_new_tokens, self.eos = prompts, max_new_tokens, eos
        self.waiting = collections.deque(range(len(prompts)))
        self.running: dict[int, _Running] = {}
        self.free = list(range(slots))
        self.results: list[tuple[list[int], bool] | None] = [None] * len(prompts)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> tuple[list[int], list[tuple[int, int]]]:
        """This step's work: the running slots that decode a token, and (slot, prompt) of the
        prompts admitted into free slots."""
        decode = sorted(self.running)
        admitted = []
        while self.free and self.waiting:
            admitted.append((self.free.pop(0), self.waiting.popleft()))
        return decode, admitted

    def packed(self, decode: list[int], admitted: list[tuple[int, int]]):
        """The step's packed row: token ids, position ids, and (slot, length) of each prefill."""
        ids = [self.running[s].tokens[-1] for s in decode] + [t for _, r in admitted for t in self.prompts[r]]
        pos = [self.running[s].length for s in decode] + [i for _, r in admitted for i in range(len(self.prompts[r]))]
        return ids, pos, [(s, len(self.prompts[r])) for s, r in admitted]

    def advance(self, decode: list[int], admitted: list[tuple[int, int]], sample: Callable[[list[int]], list[int]]):
        """Take the step's sampled tokens (``sample(streams)``, one per decoding and admitted
        slot, in that order): append them, end what reached EOS or max_new_tokens, free its slot."""
        for s, r in admitted:
            self.running[s] = _Running(r, r, [], len(self.prompts[r]))
        order = decode + [s for s, _ in admitted]
        tokens = sample([self.running[s].row for s in order])
        for s, token in zip(order, tokens):
            run = self.running[s]
            if s in decode:
                run.length += 1  # the token fed this step is now in the cache
            if token in self.eos or len(run.tokens) + 1 >= self.max_new_tokens:
                if token not in self.eos:
                    run.tokens.append(token)
                self.results[run.request] = (run.tokens, token in self.eos)
                del self.running[s]
                self.free.append(s)
            else:
                run.tokens.append(token)
        self.free.sort()


def _check_request(prompts: Sequence[Sequence[int]], sampler: ExampleSampler, slots: int, max_new_tokens: int):
    if slots < 1 or max_new_tokens < 1:
        raise ValueError(f"slots and max_new_tokens must be >= 1, got {slots}, {max_new_tokens}")
    if len(sampler.generators) != len(prompts):
        raise ValueError(f"sampler has {len(sampler.generators)} streams for {len(prompts)} prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")


@torch.no_grad()
def continuous_generate(model, prompts: Sequence[Sequence[int]], sampler: ExampleSampler, *, slots: int,
                        max_new_tokens: int, eos_token_id: int | Sequence[int] | None,
                        sync: Callable[[bool], bool] | None = None) -> list[tuple[list[int], bool]]:
    """Sample one response per prompt with continuous batching.

    Args:
        model: a transformers causal LM using the AttentionInterface (Llama, Mistral, Qwen2,
            Gemma-2, ...), in eval mode.
        prompts: token ids, admitted in this order.
        sampler: ``ExampleSampler`` whose row i is prompt i (``len(sampler.generators) ==
            len(prompts)``).
        slots: sequences decoding at once (>= 1).
        max_new_tokens: the most tokens sampled per prompt.
        eos_token_id: the token (or tokens) that end a response (kept out of the result).
        sync: for several processes: called once per step with whether this one still has work,
            returns whether any has; this one then steps on a dummy until none has.

    Returns:
        ``[(tokens, finished)]`` per prompt: the sampled ids before EOS, and whether EOS came
        before max_new_tokens ran out.
    """
    _check_request(prompts, sampler, slots, max_new_tokens)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    device = next(model.parameters()).device
    schedule = _Schedule(prompts, max(1, min(slots, len(prompts))) if prompts else 1, max_new_tokens, eos)
    cache = SlotCache(len(schedule.free), max((len(p) for p in prompts), default=1) + max_new_tokens)
    was_training = model.training
    model.eval()
    _ACTIVE.append(cache)
    try:
        with _decode_attention(model):
            while True:
                mine = schedule.busy
                if not (sync(mine) if sync is not None else mine):
                    break
                decode, admitted = schedule.admit()
                # a rank without work keeps the others company: one token into slot 0
                ids, pos, prefill = schedule.packed(decode, admitted) if mine else ([0], [0], [(0, 1)])
                logits = _forward(model, cache, decode, pos[:len(decode)], ids, pos, prefill, device)
                if mine:
                    schedule.advance(decode, admitted, lambda rows: sampler.sample(logits, rows).tolist())
    finally:
        _ACTIVE.pop()
        cache.step = None
        model.train(was_training)
    return schedule.results  # type: ignore[return-value]


def _forward(model, cache: SlotCache, decode: list[int], decode_pos: list[int], ids: list[int], pos: list[int],
             prefill: list[tuple[int, int]], device: torch.device) -> Tensor:
    """One packed step through ``model``: [decode tokens + prefilled tokens] -> the logits of each
    decode token and of each prefill's last token, [len(decode) + len(prefill), V]."""
    _set_step(cache, decode, decode_pos, prefill, device)
    keep = list(range(len(decode)))
    end = len(decode)
    for _, length in prefill:
        end += length
        keep.append(end - 1)
    return model(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([pos], device=device),
                 use_cache=False, logits_to_keep=torch.tensor(keep, device=device)).logits[0]


def _set_step(cache: SlotCache, decode: list[int], decode_pos: list[int], prefill: list[tuple[int, int]],
              device: torch.device) -> None:
    n = len(decode)
    cu = None
    if prefill:
        lengths = [length for _, length in prefill]
        cu = torch.tensor([0] + list(_cumsum(lengths)), dtype=torch.int32, device=device)
    cache.step = _Step(
        num_decode=n,
        decode_slots=torch.tensor(decode, device=device) if n else None,
        decode_pos=torch.tensor(decode_pos, device=device) if n else None,
        decode_len=max(decode_pos) + 1 if n else 0,
        decode_all=decode == list(range(cache.slots)),
        prefill=prefill,
        prefill_cu=cu,
        prefill_max=max((length for _, length in prefill), default=0),
    )


def _cumsum(values: list[int]):
    total = 0
    for v in values:
        total += v
        yield total


__all__ = ["DECODE_ATTENTION", "ExampleSampler", "SlotCache", "continuous_generate", "example_seed",
           "register_decode_attention"]
