"""Step (1) of a SPIN iteration: the opponent samples one synthetic response per prompt.

Plain, unpacked generation: prompts are left-padded into batches and decoded with the KV cache
(``model.generate``); the packed layout is for training only. Sampling is pure ancestral
sampling at the paper's settings (temperature 1.0, top_p 1.0, and top_k disabled — the
transformers default of top_k=50 would silently truncate the distribution).

Resumability: rows are appended to a JSONL file after every batch. Batches are fixed slices of
the prompt list and each is seeded from (seed, batch number), so regenerating a missing batch
after a crash gives exactly the rows an uninterrupted run would have written.

Several processes (FSDP): the batches still to do are dealt round-robin to the ranks; in each
round every rank samples its own batch (the same seed as in one process, so the same rows), the
rows are gathered by example index and rank 0 appends them. A rank without a batch in the last
round samples a repeat that is discarded: every rank must run the same decode steps.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from .config import ConfigError
from .config import GenerationConfig as SamplingOptions
from .data import JsonlAppender, Record, read_jsonl
from .parallel import is_main, progress, rank, world_size


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
def sample_responses(model, tokenizer, prompt_ids: list[list[int]], cfg: SamplingOptions, seed: int) -> list[dict]:
    """One sampled response per prompt: ``[{synthetic: str, synthetic_tokens: int, finished: bool}]``.

    ``model``: a causal LM or a runner (spin_kernels.training.parallel). ``finished`` is False
    when max_new_tokens ran out before the EOS token.
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    was_training = model.training
    model.eval()
    try:
        # A fresh GenerationConfig: the model's own defaults (top_k, repetition penalty, ...) would
        # sample from something other than p_theta.
        gen = GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                               max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, use_cache=True)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
    finally:
        model.train(was_training)
    rows = []
    for seq in out[:, ids.shape[1]:].tolist():
        eos_at = seq.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in seq else None
        kept = seq if eos_at is None else seq[:eos_at]
        rows.append({"synthetic": tokenizer.decode(kept, skip_special_tokens=True),
                     "synthetic_tokens": len(kept), "finished": eos_at is not None})
    return rows


def _vllm_sample(model_path: str, prompt_ids: list[list[int]], cfg: SamplingOptions, seed: int) -> list[dict]:
    try:
        from vllm import LLM, SamplingParams
    except ImportError as exc:
        raise ConfigError("generation.backend: 'vllm' needs the vllm package (pip install spin_kernels[vllm])") from exc
    llm = LLM(model=model_path, seed=seed)
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, seed=seed)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params)
    return [{"synthetic": o.outputs[0].text, "synthetic_tokens": len(o.outputs[0].token_ids),
             "finished": o.outputs[0].finish_reason == "stop"} for o in outs]


def generate_synthetic(
    model,
    tokenizer,
    records: list[Record],
    cfg: SamplingOptions,
    out_path: str,
    *,
    max_prompt_length: int,
    seed: int | None = None,
    model_path: str | None = None,
    desc: str = "generate",
) -> list[Record]:
    """Add a ``synthetic`` response to every record, appending to ``out_path`` batch by batch.

    Args:
        records: ``[{index, prompt, real, ...}]``; ``index`` must be unique.
        out_path: JSONL; rows already there (from an interrupted run) are kept, not regenerated.
        seed: defaults to ``cfg.generation_seed`` (the loop passes one per iteration).
    Returns:
        the records with ``synthetic``, ``synthetic_tokens`` and ``finished``, in input order.
    """
    from spin_kernels.distributed import gather_by_index, shard_indices
    from spin_kernels.packing import tokenize_prompt

    seed = cfg.generation_seed if seed is None else seed
    done: dict[Any, Record] = {}
    if os.path.exists(out_path):
        for row in read_jsonl(out_path, tolerate_torn_tail=True):
            done[row["index"]] = row
    bs = cfg.generation_batch_size
    batches = [records[i:i + bs] for i in range(0, len(records), bs)]
    todo = [b for b in range(len(batches)) if any(r["index"] not in done for r in batches[b])]
    if world_size() > 1 and cfg.backend == "vllm":
        raise ConfigError("generation.backend: 'vllm' runs in one process; use 'hf' with several ranks")
    # Round j: rank r samples batch todo[j * W + r]; slots past num_real are padding repeats.
    slots, num_real = shard_indices(len(todo), rank(), world_size())
    bar = progress(total=len(records), initial=len(records) - sum(len(batches[b]) for b in todo), desc=desc,
                   unit="prompt")
    sink = JsonlAppender(out_path) if is_main() else contextlib.nullcontext()
    with sink:
        for j, slot in enumerate(slots):
            b = todo[slot]
            batch = batches[b]
            prompt_ids = [tokenize_prompt(tokenizer, r["prompt"], max_prompt_length=max_prompt_length) for r in batch]
            if cfg.backend == "vllm":
                samples = _vllm_sample(model_path, prompt_ids, cfg, batch_seed(seed, b))
            else:
                samples = sample_responses(model, tokenizer, prompt_ids, cfg, batch_seed(seed, b))
            mine = [{**r, **s} for r, s in zip(batch, samples) if r["index"] not in done] if j < num_real else []
            new = gather_by_index(mine)  # this round's rows of every rank, each once, by index
            if is_main():
                sink.write(new)
            done.update((row["index"], row) for row in new)
            bar.update(sum(len(batches[todo[k]]) for k in range(j * world_size(), (j + 1) * world_size())
                           if k < len(todo)))
    bar.close()
    return [done[r["index"]] for r in records]
