"""Continuous batching (``generation.backend: continuous``): a slot whose response ended takes the
next prompt in the same step (spin_kernels.models.decoding.continuous_generate), one random
stream per prompt. A batch of the stage is a chunk of ``generation_chunk_size`` prompts (the unit
written and resumed); ``generation_batch_size`` slots decode at once, fewer when the token budget
asks for it. Under FSDP a rank that ran out of work keeps stepping until every rank is done.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..data import Record
from ..parallel import as_runner, world_size
from . import ModelSampler, SamplingOptions, example_seeds, response_rows


def _any_rank_busy(device: torch.device):
    """``sync`` for continuous_generate under several processes (None in one)."""
    if world_size() <= 1:
        return None
    import torch.distributed as dist

    def sync(mine: bool) -> bool:
        flag = torch.tensor([int(mine)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    return sync


def continuous_responses(model, tokenizer, prompt_ids: list[list[int]], cfg: SamplingOptions,
                         seeds: list[int]) -> list[dict]:
    """One sampled response per prompt by continuous batching with ``generation_batch_size``
    slots (fewer when the token budget asks for it), one random stream per prompt from
    ``seeds``; rows as ``hf.sample_responses``'s."""
    from spin_kernels.models.decoding import ExampleSampler, continuous_generate

    runner = as_runner(model)
    device = next(runner.parameters()).device
    slots = cfg.generation_batch_size
    if cfg.generation_token_budget and prompt_ids:
        longest = max(len(p) for p in prompt_ids) + cfg.max_new_tokens
        slots = max(1, min(slots, cfg.generation_token_budget // longest))
    sampler = ExampleSampler(seeds, temperature=cfg.temperature, top_p=cfg.top_p, device=device)
    samples = runner.no_grad(lambda m: continuous_generate(
        m, prompt_ids, sampler, slots=slots, max_new_tokens=cfg.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, sync=_any_rank_busy(device)))
    return response_rows(tokenizer, samples)


class ContinuousSampler(ModelSampler):
    """Continuous batching over each chunk of the stage, per-example seeds."""

    static_batches: ClassVar[bool] = False  # slots are refilled: a batch is a chunk (the unit resumed)

    def sample(self, number: int, records: list[Record], prompt_ids: list[list[int]]) -> list[dict[str, Any]]:
        return continuous_responses(self.model, self.tokenizer, prompt_ids, self.cfg,
                                    example_seeds(self.seed, records))
