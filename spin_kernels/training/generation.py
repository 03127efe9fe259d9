"""Step (1) of a SPIN iteration: the opponent samples one synthetic response per prompt.

Plain, unpacked generation; the packed layout is for training only. Sampling is pure ancestral
sampling at the paper's settings (temperature 1.0, top_p 1.0, and top_k disabled -- the
transformers default of top_k=50 would silently truncate the distribution). Who samples a batch
is a ``Sampler`` chosen once per stage (spin_kernels.training.samplers) from
``generation.backend`` and the seeding: ``continuous`` (the default: continuous batching, a
slot whose response ended takes the next prompt in the same step), ``hf`` (prompts left-padded
into batches and decoded with the KV cache by ``model.generate``) or ``vllm`` (one vLLM engine
for the stage; import-guarded). Options left unset are set once when the stage is planned
(``samplers.in_force``: a slot count chosen for the device).

Batches (the unit sampled together, appended to the file and resumed): prompts in file order or
sorted by prompt length (``generation_order``; sorted by default), cut by a prompt count
(``generation_batch_size``) and optionally a token budget (``generation_token_budget``) for a
sampler that decodes a batch together (hf); for the others a batch is a chunk of
``generation_chunk_size`` prompts. Rows are always written back in input order.

Seeds (``generation_seeding``): ``example`` (the default) gives every prompt its own random
stream from (seed, example index) (Gumbel-max sampling, ``decoding.ExampleSampler``), so its
sample does not depend on its batch-mates: every backend, order and batch size samples the same
rows, up to the rounding of the logits by the batch shape; ``batch`` (the original sampler, hf
only) seeds the global RNG from (seed, batch number) before each batch.

Resumability: rows are appended to a JSONL file after every batch; the batches are a function of
the prompts and the settings, and each is sampled from its own seeds, so regenerating a missing
batch after a crash gives exactly the rows an uninterrupted run would have written. Every row
records its source (prompt/response digest, the opponent's weights digest, the sampling
settings including how prompts were batched and seeded, the prompt length limit:
spin_kernels.training.provenance), and a row is reused only when that source is this run's: a
file made from other data, another model or other settings is sampled again (or refused),
never reused. ``plan_generation`` says what a file holds and what is left (no model needed);
``sample_plan`` samples what is left; ``generate_synthetic`` does both.

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

from . import provenance
from .config import ConfigError
from .data import JsonlAppender, Record, read_jsonl, write_jsonl_atomic
from .parallel import barrier, is_main, progress, rank, world_size
from .samplers import Sampler, SamplingOptions, check_processes, choose, in_force


def prompt_batches(records: list[Record], prompt_lengths: dict[Any, int] | None,
                   cfg: SamplingOptions) -> list[list[Record]]:
    """The batches of ``records`` (the unit sampled together, written and resumed), in sampling
    order; see the module docstring. ``prompt_lengths`` ({index: prompt tokens}) is needed for
    ``generation_order="length"`` and a token budget; ``cfg`` with its batch size set
    (``samplers.in_force``)."""
    cfg = cfg.in_force()
    if cfg.generation_batch_size is None:
        raise ValueError("prompt_batches: the batch size is unset; set it with samplers.in_force(cfg, device=...)")
    n = len(records)
    by_length = cfg.generation_order == "length"
    static = choose(cfg).static_batches
    budget = cfg.generation_token_budget if static else 0  # continuous: it bounds slots
    if (by_length or budget) and prompt_lengths is None:
        raise ValueError("prompt_batches: generation_order='length' and a token budget need the prompt lengths")
    order = list(range(n))
    if by_length:  # longest first (a batch too large for memory shows at once); ties in input order
        order.sort(key=lambda i: -prompt_lengths[records[i]["index"]])
    if not static:
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
    """What an output file already holds for ``records`` and what is left to sample: the plan of
    the ``generate`` stage (spin_kernels.training.stages).

    Rows are reused only when their recorded ``source`` (spin_kernels.training.provenance)
    equals the one this run would write. A batch holding a stale row is sampled again whole
    (its other rows too), so the file ends exactly as an uninterrupted run on these inputs
    would have written it.

    Attributes:
        records, out_path, cfg, seed, model_path, max_prompt_length, tokenizer: what it was
            planned from (and ``sample_plan`` samples with).
        sources: {index: the source a row for that record must carry}.
        batches: the records of each batch (``prompt_batches``), in sampling order.
        prompt_ids: {index: prompt token ids} when the batching needed them, else None.
        done: {index: row} of the rows kept.
        todo: the batch numbers still to sample.
        dropped: rows of the file that are not kept (stale, a duplicate, an unknown index),
            with the reason for each, in file order: ``[(row index or None, reason)]``.
        desc: what progress bars and messages call the stage.
    """

    stage = "generate"

    def __init__(self, records: list[Record], out_path: str, cfg: SamplingOptions, sources: dict[Any, dict[str, Any]],
                 batches: list[list[Record]], prompt_ids: dict[Any, list[int]] | None = None, *, seed: int,
                 model_path: str, max_prompt_length: int, tokenizer=None, desc: str = "generate"):
        self.records, self.out_path, self.cfg, self.seed = records, out_path, cfg, seed
        self.model_path, self.max_prompt_length, self.tokenizer, self.desc = model_path, max_prompt_length, tokenizer, desc
        self.sources = sources
        self.batches = batches
        self.prompt_ids = prompt_ids
        batch_of = {r["index"]: b for b, batch in enumerate(self.batches) for r in batch}
        bad: list[tuple[int, str]] = []
        rows = list(read_jsonl(out_path, tolerate_torn_tail=True, bad_lines=bad)) if os.path.exists(out_path) else []
        self.dropped: list[tuple[Any, str]] = [(None, why) for _, why in bad]
        kept: dict[Any, Record] = {}
        stale_batches: set[int] = set()
        for row in rows:
            idx = row.get("index") if isinstance(row, dict) else None
            if idx not in batch_of:
                self.dropped.append((idx, "its index is not one of the input's rows"))
                continue
            why = provenance.row_damage(row) or provenance.differences(row.get("source"), sources[idx])
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

    @property
    def current(self) -> bool:
        """The file holds a current row for every record."""
        return not self.todo

    @property
    def key(self) -> str:
        """What the rows are made from: every record's source (models by their weights' digest)."""
        return provenance.text_digest([{**s, "opponent": s["opponent"]["digest"]} for s in self.sources.values()])

    @property
    def reads(self) -> list[str]:
        return [self.model_path, self.out_path]

    @property
    def left(self) -> str:
        if not self.todo:
            return ""
        prompts = sum(len(self.batches[b]) for b in self.todo)
        return f"sample {prompts} of {len(self.records)} prompt(s) in {len(self.todo)} batch(es)"

    @property
    def output(self) -> list[Record] | None:
        """The rows in input order, when the file is complete."""
        return None if self.todo else [self.done[r["index"]] for r in self.records]

    def prompts_of(self, batch: list[Record]) -> list[list[int]]:
        """The prompt token ids of a batch's records (cut to ``max_prompt_length``)."""
        from spin_kernels.packing import tokenize_prompt

        if self.prompt_ids is not None:
            return [self.prompt_ids[r["index"]] for r in batch]
        return [tokenize_prompt(self.tokenizer, r["prompt"], max_prompt_length=self.max_prompt_length) for r in batch]

    def describe_dropped(self, path: str) -> str:
        stale = [(i, why) for i, why in self.dropped if not why.startswith(("a duplicate", "sampled in one"))]
        shown = "; ".join(f"index {i}: {why}" for i, why in (stale or self.dropped)[:3])
        return f"{path}: {len(self.dropped)} row(s) cannot be reused ({shown})"


def needs_prompt_lengths(cfg: SamplingOptions) -> bool:
    """Whether batching these settings needs the prompts' token lengths (a tokenizer)."""
    return cfg.in_force().generation_order == "length" or (choose(cfg).static_batches and
                                                            cfg.generation_token_budget > 0)


def check_generation_budget(records: list[Record], prompt_lengths: dict[Any, int], cfg: SamplingOptions) -> None:
    """Refuse a ``generation_token_budget`` below one sequence (the longest prompt plus
    ``max_new_tokens``): such a prompt would be sampled alone in a batch over the budget."""
    longest = max(records, key=lambda r: prompt_lengths[r["index"]])
    need = prompt_lengths[longest["index"]] + cfg.max_new_tokens
    if need > cfg.generation_token_budget:
        raise ConfigError(f"generation.generation_token_budget ({cfg.generation_token_budget}) is below one sequence: "
                          f"the longest prompt (data row {longest['index']}, {prompt_lengths[longest['index']]} "
                          f"tokens after --max-prompt-length) plus --max-new-tokens ({cfg.max_new_tokens}) is {need} "
                          f"tokens; raise --generation-token-budget to at least {need} (or 0: no budget)")


def plan_generation(records: list[Record], out_path: str, cfg: SamplingOptions, *, max_prompt_length: int,
                    model_path: str, seed: int, on_stale: str = "regenerate",
                    model_label: str | None = None, tokenizer=None, desc: str = "generate",
                    device=None, dtype_bytes: int = 4) -> GenerationPlan:
    """Check what ``out_path`` holds for ``records`` (no model needed): a GenerationPlan whose
    ``todo`` is empty when the file is complete and current. Stale rows are removed from the file
    (``on_stale="regenerate"``, with a warning on stderr) or refused (``"error"``). ``tokenizer``
    is recorded in every row's source (rows of another tokenizer are stale), is needed when the
    batching depends on prompt lengths (``needs_prompt_lengths``) and to sample the plan. Unset
    options are set for ``device`` (default: cuda if available, else cpu) and the model's shape at
    ``dtype_bytes`` (``samplers.in_force``); the plan's ``cfg`` holds the options in force."""
    from spin_kernels.packing import tokenize_prompt

    from .parallel import resolve_device

    cfg = in_force(cfg, device=device or resolve_device("auto"), model_path=model_path,
                   max_prompt_length=max_prompt_length, dtype_bytes=dtype_bytes)
    opponent = provenance.model_stamp(model_path, model_label)
    sampling = provenance.sampling_settings(cfg, seed)
    tok = provenance.tokenizer_digest(tokenizer)
    sources = {r["index"]: provenance.generation_source(r, opponent, sampling, max_prompt_length, tok)
               for r in records}
    if len(sources) != len(records):
        raise ValueError("generate_synthetic: record indices must be unique")
    prompt_ids = None
    if needs_prompt_lengths(cfg):
        if tokenizer is None:
            raise ValueError("plan_generation: generation_order='length' or a token budget needs the tokenizer")
        prompt_ids = {r["index"]: tokenize_prompt(tokenizer, r["prompt"], max_prompt_length=max_prompt_length)
                      for r in records}
    lengths = None if prompt_ids is None else {i: len(p) for i, p in prompt_ids.items()}
    if cfg.generation_token_budget and lengths:
        check_generation_budget(records, lengths, cfg)
    plan = GenerationPlan(records, out_path, cfg, sources, prompt_batches(records, lengths, cfg), prompt_ids,
                          seed=seed, model_path=model_path, max_prompt_length=max_prompt_length, tokenizer=tokenizer,
                          desc=desc)
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


def sample_plan(plan: GenerationPlan, model) -> list[Record]:
    """Sample the batches ``plan.todo`` lists into ``plan.out_path`` with the plan's sampler and
    return every record with its row, in input order (the file holds the same rows in the same
    order). ``model``: the opponent (a causal LM or a runner) loaded from ``plan.model_path``;
    None is allowed when nothing is left or the sampler loads its own (vLLM)."""
    cls = choose(plan.cfg)
    check_processes(plan.cfg, sharded=world_size() > 1)
    if plan.todo:
        if model is None and cls.uses_model:
            raise ValueError("generate_synthetic: rows are missing but no model was given")
        if plan.tokenizer is None:
            raise ValueError("generate_synthetic: rows are missing but the plan has no tokenizer")
        sampler = cls(model, plan.tokenizer, plan.cfg, seed=plan.seed, model_path=plan.model_path)
        try:
            _sample_rounds(plan, sampler)
        finally:
            sampler.close()  # before training needs the memory
    out = [plan.done[r["index"]] for r in plan.records]
    if is_main() and (plan.dropped or plan.todo) and list(read_jsonl(plan.out_path)) != out:
        write_jsonl_atomic(plan.out_path, out)  # regenerated rows were appended last: back to input order
    barrier()
    return out


def _sample_rounds(plan: GenerationPlan, sampler: Sampler) -> None:
    """Sample ``plan.todo`` in rounds of one batch per rank, appending each round's rows (rank 0)
    and adding them to ``plan.done``."""
    from spin_kernels.distributed import gather_by_index, shard_indices

    todo, batches, records, ranks = plan.todo, plan.batches, plan.records, world_size()
    # Round j: rank r samples batch todo[j * W + r]; slots past num_real are padding repeats.
    slots, num_real = shard_indices(len(todo), rank(), ranks)
    bar = progress(total=len(records), initial=len(records) - sum(len(batches[b]) for b in todo), desc=plan.desc,
                   unit="prompt")
    with (JsonlAppender(plan.out_path) if is_main() else contextlib.nullcontext()) as sink, bar:
        for j, slot in enumerate(slots):
            b = todo[slot]
            samples = sampler.sample(b, batches[b], plan.prompts_of(batches[b]))
            mine = [provenance.with_row_digest({**r, **s, "source": plan.sources[r["index"]]})
                    for r, s in zip(batches[b], samples) if r["index"] not in plan.done] if j < num_real else []
            new = gather_by_index(mine)  # this round's rows of every rank, each once, by index
            if is_main():
                sink.write(new)
            plan.done.update((row["index"], row) for row in new)
            bar.update(sum(len(batches[todo[k]]) for k in range(j * ranks, (j + 1) * ranks) if k < len(todo)))


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
    """Add a ``synthetic`` response to every record, appending to ``out_path`` batch by batch
    (``plan_generation``, then ``sample_plan``).

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
    seed = cfg.generation_seed if seed is None else seed
    device = next(model.parameters()).device if model is not None else None
    plan = plan_generation(records, out_path, cfg, max_prompt_length=max_prompt_length, model_path=model_path,
                           model_label=model_label, seed=seed, on_stale=on_stale, tokenizer=tokenizer, desc=desc,
                           device=device)
    return sample_plan(plan, model)
