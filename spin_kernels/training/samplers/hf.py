"""Sampling with transformers' ``model.generate`` on left-padded batches (``generation.backend: hf``).

``HfSampler`` seeds the global RNG from (seed, batch number) before each batch (``batch``
seeding); ``HfExampleSampler`` gives every prompt its own random stream (``example`` seeding:
greedy decoding over Gumbel-noised scores, the same distribution), so a prompt's sample does not
depend on its batch-mates. A batch runs until its longest response ends. Under FSDP every rank
runs the same decode steps (the runner's ``generate`` syncs them).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..data import Record
from . import ModelSampler, SamplingOptions, example_seeds, response_rows


def batch_seed(seed: int, batch_number: int) -> int:
    """A distinct, reproducible seed per batch (independent of what ran before it)."""
    return (seed * 1_000_003 + batch_number * 7_919) % (2**63 - 1)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` input ids and attention mask, padded on the left so every row ends at column L-1."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample_responses(model, tokenizer, prompt_ids: list[list[int]], cfg: SamplingOptions, seed: int | None = None,
                     *, seeds: list[int] | None = None) -> list[dict]:
    """One sampled response per prompt with ``model.generate``, as one left-padded batch:
    ``[{synthetic: str, synthetic_tokens: int, finished: bool}]``.

    ``model``: a causal LM or a runner (spin_kernels.training.parallel). Seeds: ``seed`` seeds
    the global RNG for the whole batch (``batch`` seeding), or ``seeds`` gives one per prompt
    (``example`` seeding: greedy decoding over Gumbel-noised scores, the same distribution).
    ``finished`` is False when max_new_tokens ran out before the EOS token.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    if (seed is None) == (seeds is None):
        raise ValueError("sample_responses: give either seed (one per batch) or seeds (one per prompt)")
    device = next(model.parameters()).device
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)
    extra = {}
    if seeds is None:
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed_all(seed)
        sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
    else:
        from spin_kernels.models.decoding import ExampleSampler

        sampler = ExampleSampler(seeds, temperature=cfg.temperature, top_p=cfg.top_p, device=device)
        sampling = {"do_sample": False}
        extra["logits_processor"] = LogitsProcessorList([sampler.processor()])
    was_training = model.training
    model.eval()
    try:
        # A fresh GenerationConfig: the model's own defaults (top_k, repetition penalty, ...) would
        # sample from something other than p_theta.
        gen = GenerationConfig(**sampling, max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, use_cache=True)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen, **extra)
    finally:
        model.train(was_training)
    samples = []
    for seq in out[:, ids.shape[1]:].tolist():
        eos_at = seq.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in seq else None
        samples.append((seq if eos_at is None else seq[:eos_at], eos_at is not None))
    return response_rows(tokenizer, samples)


class HfSampler(ModelSampler):
    """``model.generate`` per batch, the global RNG seeded from (seed, batch number)."""

    static_batches: ClassVar[bool] = True  # a batch is decoded together: its count and token budget cut it

    def sample(self, number: int, records: list[Record], prompt_ids: list[list[int]]) -> list[dict[str, Any]]:
        return sample_responses(self.model, self.tokenizer, prompt_ids, self.cfg, batch_seed(self.seed, number))


class HfExampleSampler(HfSampler):
    """``model.generate`` per batch, one random stream per prompt from (seed, its index)."""

    def sample(self, number: int, records: list[Record], prompt_ids: list[list[int]]) -> list[dict[str, Any]]:
        return sample_responses(self.model, self.tokenizer, prompt_ids, self.cfg,
                                seeds=example_seeds(self.seed, records))
