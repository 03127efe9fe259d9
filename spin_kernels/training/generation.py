"""Step (1) of a SPIN iteration: the opponent samples one synthetic response per prompt.

Plain, unpacked generation: prompts are left-padded into batches and decoded with the KV cache
(``model.generate``); the packed layout is for training only. Sampling is pure ancestral
sampling at the paper's settings (temperature 1.0, top_p 1.0, and top_k disabled — the
transformers default of top_k=50 would silently truncate the distribution).

Resumability: rows are appended to a JSONL file after every batch. Batches are fixed slices of
the prompt list and each is seeded from (seed, batch number), so regenerating a missing batch
after a crash gives exactly the rows an uninterrupted run would have written. Every row records
its source (prompt/response digest, the opponent's weights digest, the sampling settings, the
prompt length limit: spin_kernels.training.provenance), and a row is reused only when that
source is this run's: a file made from other data, another model or other settings is sampled
again (or refused), never reused.

Several processes (FSDP): the batches still to do are dealt round-robin to the ranks; in each
round every rank samples its own batch (the same seed as in one process, so the same rows), the
rows are gathered by example index and rank 0 appends them. A rank without a batch in the last
round samples a repeat that is discarded: every rank must run the same decode steps.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import torch

from . import provenance
from .config import ConfigError
from .config import GenerationConfig as SamplingOptions
from .data import JsonlAppender, Record, read_jsonl, write_jsonl_atomic
from .parallel import barrier, is_main, progress, rank, world_size


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


class GenerationPlan:
    """What an output file already holds for ``records`` and what is left to sample.

    Rows are reused only when their recorded ``source`` (spin_kernels.training.provenance)
    equals the one this run would write. A batch holding a stale row is sampled again whole
    (its other rows too), so the file ends exactly as an uninterrupted run on these inputs
    would have written it.

    Attributes:
        sources: {index: the source a row for that record must carry}.
        done: {index: row} of the rows kept.
        todo: the batch numbers still to sample.
        dropped: rows of the file that are not kept (stale, a duplicate, an unknown index),
            with the reason for each, in file order: ``[(row index or None, reason)]``.
    """

    def __init__(self, records: list[Record], out_path: str, sources: dict[Any, dict[str, Any]], batch_size: int):
        self.sources = sources
        self.batches = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]
        batch_of = {r["index"]: b for b, batch in enumerate(self.batches) for r in batch}
        rows = list(read_jsonl(out_path, tolerate_torn_tail=True)) if os.path.exists(out_path) else []
        self.dropped: list[tuple[Any, str]] = []
        kept: dict[Any, Record] = {}
        stale_batches: set[int] = set()
        for row in rows:
            idx = row.get("index") if isinstance(row, dict) else None
            if idx not in batch_of:
                self.dropped.append((idx, "its index is not one of the input's rows"))
                continue
            why = provenance.differences(row.get("source"), sources[idx])
            if why is None and idx in kept:
                why = "a second row for the same index" if row != kept[idx] else None
                if why is None:  # an identical copy (an older writer's duplicate): keep one
                    self.dropped.append((idx, "a duplicate of an earlier row"))
                    continue
            if why is not None:
                self.dropped.append((idx, why))
                stale_batches.add(batch_of[idx])
                continue
            kept[idx] = row
        for b in stale_batches:
            for r in self.batches[b]:
                if kept.pop(r["index"], None) is not None:
                    self.dropped.append((r["index"], "sampled in one batch with a stale row"))
        self.done = kept
        self.rows_in_file = rows
        self.todo = [b for b in range(len(self.batches)) if any(r["index"] not in kept for r in self.batches[b])]

    def describe_dropped(self, path: str) -> str:
        stale = [(i, why) for i, why in self.dropped if not why.startswith(("a duplicate", "sampled in one"))]
        shown = "; ".join(f"index {i}: {why}" for i, why in (stale or self.dropped)[:3])
        return f"{path}: {len(self.dropped)} row(s) cannot be reused ({shown})"


def generate_synthetic(
    model,
    tokenizer,
    records: list[Record],
    cfg: SamplingOptions,
    out_path: str,
    *,
    max_prompt_length: int,
    model_path: str,
    model_label: str | None = None,
    seed: int | None = None,
    on_stale: str = "regenerate",
    desc: str = "generate",
) -> list[Record]:
    """Add a ``synthetic`` response to every record, appending to ``out_path`` batch by batch.

    Args:
        model: the opponent (a causal LM or a runner), loaded from ``model_path``; None is
            allowed when the file turns out to be complete (nothing is sampled).
        records: ``[{index, prompt, real, ...}]``; ``index`` must be unique.
        out_path: JSONL; rows already there (an interrupted run) are kept when their recorded
            source matches these inputs, this model and these settings (see GenerationPlan).
        model_path: the model directory the opponent was loaded from (its weights' digest is
            recorded in every row, with ``model_label`` or the path as its name).
        seed: defaults to ``cfg.generation_seed`` (the loop passes one per iteration).
        on_stale: "regenerate" (drop the rows made from other inputs, with a warning) or
            "error" (a ConfigError naming them).
    Returns:
        the records with ``synthetic``, ``synthetic_tokens``, ``finished`` and ``source``, in
        input order; the file holds the same rows in the same order.
    """
    from spin_kernels.distributed import gather_by_index, shard_indices
    from spin_kernels.packing import tokenize_prompt

    seed = cfg.generation_seed if seed is None else seed
    if world_size() > 1 and cfg.backend == "vllm":
        raise ConfigError("generation.backend: 'vllm' runs in one process; use 'hf' with several ranks")
    plan = plan_generation(records, out_path, cfg, max_prompt_length=max_prompt_length, model_path=model_path,
                           model_label=model_label, seed=seed, on_stale=on_stale)
    done, todo, batches = plan.done, plan.todo, plan.batches
    if todo and model is None:
        raise ValueError("generate_synthetic: rows are missing but no model was given")
    # Round j: rank r samples batch todo[j * W + r]; slots past num_real are padding repeats.
    slots, num_real = shard_indices(len(todo), rank(), world_size())
    bar = progress(total=len(records), initial=len(records) - sum(len(batches[b]) for b in todo), desc=desc,
                   unit="prompt")
    sink = JsonlAppender(out_path) if is_main() and todo else contextlib.nullcontext()
    with sink:
        for j, slot in enumerate(slots):
            b = todo[slot]
            batch = batches[b]
            prompt_ids = [tokenize_prompt(tokenizer, r["prompt"], max_prompt_length=max_prompt_length) for r in batch]
            if cfg.backend == "vllm":
                samples = _vllm_sample(model_path, prompt_ids, cfg, batch_seed(seed, b))
            else:
                samples = sample_responses(model, tokenizer, prompt_ids, cfg, batch_seed(seed, b))
            mine = [{**r, **s, "source": plan.sources[r["index"]]} for r, s in zip(batch, samples)
                    if r["index"] not in done] if j < num_real else []
            new = gather_by_index(mine)  # this round's rows of every rank, each once, by index
            if is_main():
                sink.write(new)
            done.update((row["index"], row) for row in new)
            bar.update(sum(len(batches[todo[k]]) for k in range(j * world_size(), (j + 1) * world_size())
                           if k < len(todo)))
    bar.close()
    out = [done[r["index"]] for r in records]
    if is_main() and (plan.dropped or todo) and list(read_jsonl(out_path)) != out:
        write_jsonl_atomic(out_path, out)  # regenerated rows were appended last: back to input order
    barrier()
    return out


def plan_generation(records: list[Record], out_path: str, cfg: SamplingOptions, *, max_prompt_length: int,
                    model_path: str, seed: int, on_stale: str = "regenerate",
                    model_label: str | None = None) -> GenerationPlan:
    """Check what ``out_path`` holds for ``records`` (no model needed): a GenerationPlan whose
    ``todo`` is empty when the file is complete and current. Stale rows are removed from the file
    (``on_stale="regenerate"``, with a warning on stderr) or refused (``"error"``)."""
    opponent = provenance.model_stamp(model_path, model_label)
    sampling = provenance.sampling_settings(cfg, seed)
    sources = {r["index"]: provenance.generation_source(r, opponent, sampling, max_prompt_length) for r in records}
    if len(sources) != len(records):
        raise ValueError("generate_synthetic: record indices must be unique")
    plan = GenerationPlan(records, out_path, sources, cfg.generation_batch_size)
    barrier()  # every rank has read the file before rank 0 rewrites it
    if plan.dropped:
        if on_stale == "error":
            raise ConfigError(f"{plan.describe_dropped(out_path)}; remove the file or rerun with --on-stale regenerate")
        if is_main():
            print(f"spin-kernels: warning: {plan.describe_dropped(out_path)}; they are sampled again",
                  file=sys.stderr)
            kept = [row for row in plan.rows_in_file if isinstance(row, dict) and plan.done.get(row.get("index")) is row]
            write_jsonl_atomic(out_path, kept)
    barrier()
    return plan
