"""Step (1) of a SPIN iteration: the opponent samples one synthetic response per prompt.

Plain, unpacked generation; the packed layout is for training only. Sampling is pure ancestral
sampling at the paper's settings (temperature 1.0, top_p 1.0, and top_k disabled -- the
transformers default of top_k=50 would silently truncate the distribution). Three backends
(``generation.backend``):

* ``hf`` (the default): prompts left-padded into batches and decoded with the KV cache
  (``model.generate``); a batch runs until its longest response ends.
* ``continuous``: continuous batching (``spin_kernels.models.decoding``): a slot whose response
  ended takes the next prompt in the same step, so no step is spent on finished rows.
* ``vllm``: one vLLM engine for the whole stage, released before the stage returns (import-
  guarded; untested here: vLLM does not install on these CPU machines).

Batches (the unit sampled together, appended to the file and resumed): prompts in file order or
sorted by prompt length (``generation_order``), cut by a prompt count
(``generation_batch_size``) and optionally a token budget (``generation_token_budget``); for the
continuous backend and vLLM a batch is a chunk of ``generation_chunk_size`` prompts. Rows are
always written back in input order.

Seeds (``generation_seeding``): ``batch`` (hf's default, the original scheme) seeds the global
RNG from (seed, batch number) before each batch; ``example`` gives every prompt its own random
stream from (seed, example index) (Gumbel-max sampling, ``decoding.ExampleSampler``), so its
sample does not depend on its batch-mates: sorted, budgeted and continuous batching sample
what a plain run does, up to the rounding of the logits by the batch shape.

Resumability: rows are appended to a JSONL file after every batch; the batches are a function of
the prompts and the settings, and each is sampled from its own seeds, so regenerating a missing
batch after a crash gives exactly the rows an uninterrupted run would have written. Every row
records its source (prompt/response digest, the opponent's weights digest, the sampling
settings including how prompts were batched and seeded, the prompt length limit:
spin_kernels.training.provenance), and a row is reused only when that source is this run's: a
file made from other data, another model or other settings is sampled again (or refused),
never reused.

Several processes (FSDP): the batches still to do are dealt round-robin to the ranks; in each
round every rank samples its own batch (the same seeds as in one process, so the same rows), the
rows are gathered by example index and rank 0 appends them. A rank without a batch in the last
round samples a repeat that is discarded: every rank must run the same decode steps (hf:
``synced_gpus``; continuous: a shared "anyone still working?" each step).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import torch

from . import provenance
from .config import ConfigError
from .config import SamplingOptions
from .data import JsonlAppender, Record, read_jsonl, write_jsonl_atomic
from .parallel import as_runner, barrier, is_main, progress, rank, world_size


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


def example_seeds(seed: int, records: list[Record]) -> list[int]:
    """One seed per record, from (seed, its index): the ``example`` seeding."""
    from spin_kernels.models.decoding import example_seed

    return [example_seed(seed, r["index"]) for r in records]


def _response_rows(tokenizer, samples: list[tuple[list[int], bool]]) -> list[dict]:
    return [{"synthetic": tokenizer.decode(tokens, skip_special_tokens=True), "synthetic_tokens": len(tokens),
             "finished": finished} for tokens, finished in samples]


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
    return _response_rows(tokenizer, samples)


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
    """One sampled response per prompt by continuous batching (``spin_kernels.models.decoding``)
    with ``generation_batch_size`` slots (fewer when the token budget asks for it), one random
    stream per prompt from ``seeds``; rows as ``sample_responses``'s."""
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
    return _response_rows(tokenizer, samples)


class VllmEngine:
    """One vLLM engine for a whole generation stage (building one is the expensive part), with
    ``SamplingParams`` matching the hf path: temperature, top_p, no top_k, max_new_tokens, one
    seed per prompt (``example`` seeding). ``close()`` releases it (and its GPU memory) before
    the stage returns, so that training does not start next to it.

    Untested: vLLM does not install on the CPU machines this project is tested on.
    """

    def __init__(self, model_path: str, cfg: SamplingOptions):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise ConfigError("generation.backend: 'vllm' needs the vllm package (pip install spin_kernels[vllm])") \
                from exc
        self._params = SamplingParams
        self.cfg = cfg
        self.llm = LLM(model=model_path, seed=cfg.generation_seed)

    def sample(self, prompt_ids: list[list[int]], seeds: list[int]) -> list[dict]:
        c = self.cfg
        params = [self._params(n=1, temperature=c.temperature, top_p=c.top_p, top_k=-1, max_tokens=c.max_new_tokens,
                               seed=s % (2**31)) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params)
        return [{"synthetic": o.outputs[0].text, "synthetic_tokens": len(o.outputs[0].token_ids),
                 "finished": o.outputs[0].finish_reason == "stop"} for o in outs]

    def close(self) -> None:
        import gc

        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def prompt_batches(records: list[Record], prompt_lengths: dict[Any, int] | None,
                   cfg: SamplingOptions) -> list[list[Record]]:
    """The batches of ``records`` (the unit sampled together, written and resumed), in sampling
    order; see the module docstring. ``prompt_lengths`` ({index: prompt tokens}) is needed for
    ``generation_order="length"`` and a token budget."""
    n = len(records)
    by_length = cfg.generation_order == "length"
    budget = cfg.generation_token_budget if cfg.backend == "hf" else 0  # continuous: it bounds slots
    if (by_length or budget) and prompt_lengths is None:
        raise ValueError("prompt_batches: generation_order='length' and a token budget need the prompt lengths")
    order = list(range(n))
    if by_length:  # longest first (a batch too large for memory shows at once); ties in input order
        order.sort(key=lambda i: -prompt_lengths[records[i]["index"]])
    if cfg.backend != "hf":
        size = cfg.chunk_size()
        return [[records[i] for i in order[k:k + size]] for k in range(0, n, size)]
    batches: list[list[Record]] = []
    longest = 0
    for i in order:
        length = prompt_lengths[records[i]["index"]] if prompt_lengths is not None else 0
        if batches and len(batches[-1]) < cfg.generation_batch_size and (
                not budget or (len(batches[-1]) + 1) * (max(longest, length) + cfg.max_new_tokens) <= budget):
            batches[-1].append(records[i])
            longest = max(longest, length)
        else:
            batches.append([records[i]])
            longest = length
    return batches


class GenerationPlan:
    """What an output file already holds for ``records`` and what is left to sample.

    Rows are reused only when their recorded ``source`` (spin_kernels.training.provenance)
    equals the one this run would write. A batch holding a stale row is sampled again whole
    (its other rows too), so the file ends exactly as an uninterrupted run on these inputs
    would have written it.

    Attributes:
        sources: {index: the source a row for that record must carry}.
        batches: the records of each batch (``prompt_batches``), in sampling order.
        prompt_ids: {index: prompt token ids} when the batching needed them, else None.
        done: {index: row} of the rows kept.
        todo: the batch numbers still to sample.
        dropped: rows of the file that are not kept (stale, a duplicate, an unknown index),
            with the reason for each, in file order: ``[(row index or None, reason)]``.
    """

    def __init__(self, records: list[Record], out_path: str, sources: dict[Any, dict[str, Any]],
                 batches: list[list[Record]], prompt_ids: dict[Any, list[int]] | None = None):
        self.sources = sources
        self.batches = batches
        self.prompt_ids = prompt_ids
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
                           model_label=model_label, seed=seed, on_stale=on_stale, tokenizer=tokenizer)
    done, todo, batches = plan.done, plan.todo, plan.batches
    if todo and model is None:
        raise ValueError("generate_synthetic: rows are missing but no model was given")
    seeding = cfg.seeding()

    def prompts_of(batch: list[Record]) -> list[list[int]]:
        if plan.prompt_ids is not None:
            return [plan.prompt_ids[r["index"]] for r in batch]
        return [tokenize_prompt(tokenizer, r["prompt"], max_prompt_length=max_prompt_length) for r in batch]

    # Round j: rank r samples batch todo[j * W + r]; slots past num_real are padding repeats.
    slots, num_real = shard_indices(len(todo), rank(), world_size())
    bar = progress(total=len(records), initial=len(records) - sum(len(batches[b]) for b in todo), desc=desc,
                   unit="prompt")
    sink = JsonlAppender(out_path) if is_main() and todo else contextlib.nullcontext()
    engine = VllmEngine(model_path, cfg) if cfg.backend == "vllm" and todo else None
    try:
        with sink:
            for j, slot in enumerate(slots):
                b = todo[slot]
                batch = batches[b]
                prompt_ids = prompts_of(batch)
                if engine is not None:
                    samples = engine.sample(prompt_ids, example_seeds(seed, batch))
                elif cfg.backend == "continuous":
                    samples = continuous_responses(model, tokenizer, prompt_ids, cfg, example_seeds(seed, batch))
                elif seeding == "example":
                    samples = sample_responses(model, tokenizer, prompt_ids, cfg, seeds=example_seeds(seed, batch))
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
    finally:
        if engine is not None:
            engine.close()  # before training needs the memory
    bar.close()
    out = [done[r["index"]] for r in records]
    if is_main() and (plan.dropped or todo) and list(read_jsonl(out_path)) != out:
        write_jsonl_atomic(out_path, out)  # regenerated rows were appended last: back to input order
    barrier()
    return out


def needs_prompt_lengths(cfg: SamplingOptions) -> bool:
    """Whether batching these settings needs the prompts' token lengths (a tokenizer)."""
    return cfg.generation_order == "length" or (cfg.backend == "hf" and cfg.generation_token_budget > 0)


def plan_generation(records: list[Record], out_path: str, cfg: SamplingOptions, *, max_prompt_length: int,
                    model_path: str, seed: int, on_stale: str = "regenerate",
                    model_label: str | None = None, tokenizer=None) -> GenerationPlan:
    """Check what ``out_path`` holds for ``records`` (no model needed): a GenerationPlan whose
    ``todo`` is empty when the file is complete and current. Stale rows are removed from the file
    (``on_stale="regenerate"``, with a warning on stderr) or refused (``"error"``). ``tokenizer``
    is needed when the batching depends on prompt lengths (``needs_prompt_lengths``)."""
    from spin_kernels.packing import tokenize_prompt

    opponent = provenance.model_stamp(model_path, model_label)
    sampling = provenance.sampling_settings(cfg, seed)
    sources = {r["index"]: provenance.generation_source(r, opponent, sampling, max_prompt_length) for r in records}
    if len(sources) != len(records):
        raise ValueError("generate_synthetic: record indices must be unique")
    prompt_ids = None
    if needs_prompt_lengths(cfg):
        if tokenizer is None:
            raise ValueError("plan_generation: generation_order='length' or a token budget needs the tokenizer")
        prompt_ids = {r["index"]: tokenize_prompt(tokenizer, r["prompt"], max_prompt_length=max_prompt_length)
                      for r in records}
    lengths = None if prompt_ids is None else {i: len(p) for i, p in prompt_ids.items()}
    plan = GenerationPlan(records, out_path, sources, prompt_batches(records, lengths, cfg), prompt_ids)
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
