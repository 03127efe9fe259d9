"""Step (2) of a SPIN iteration: the opponent's log-probs of the real and synthetic responses.

The opponent that generated the synthetic responses is also the reference model of the
iteration, so its log-probs are computed once, right after generation, on packed batches
(fused head, no [N, V] logits) and stored with the data (``ref_logps: [real, synthetic]``);
training then needs no second model in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch

from .config import DataConfig
from .data import Record
from .parallel import as_runner, progress, rank, world_size


def to_examples(tokenizer, rows: list[Record], data: DataConfig) -> list:
    """``SpinExample`` s (token ids) for rows ``{prompt, real, synthetic[, finished, ref_logps]}``,
    cut to ``data.max_length`` / ``data.max_prompt_length``; example i gets ``index=i`` (its
    position in ``rows``)."""
    from spin_kernels.packing import tokenize_example

    out = []
    for i, row in enumerate(rows):
        ex = tokenize_example(tokenizer, row["prompt"], row["real"], row["synthetic"], max_length=data.max_length,
                              max_prompt_length=data.max_prompt_length, index=i)
        if row.get("finished") is False and ex.synthetic_ids[-1:] == [tokenizer.eos_token_id] \
                and len(ex.synthetic_ids) > 1:
            # Generation hit max_new_tokens: the response was cut, not ended. As for responses cut
            # by max_length (spin_kernels.packing), the opponent is not credited with an EOS here.
            ex = dataclasses.replace(ex, synthetic_ids=ex.synthetic_ids[:-1])
        if row.get("ref_logps") is not None:
            ex = dataclasses.replace(ex, ref_logps=tuple(float(v) for v in row["ref_logps"]))
        out.append(ex)
    return out


def check_token_budget(examples: list, token_budget: int, share_prompt: bool = False,
                       describe: Callable[[list[int]], str] | None = None) -> None:
    """Refuse a ``token_budget`` below one pair: the packer would put such a pair alone in a
    micro-batch over the budget (more memory than the budget promises). ``describe(positions)``
    names examples in the message (default: their positions)."""
    from .config import ConfigError

    if not examples:
        return
    costs = [ex.packed_tokens(share_prompt) for ex in examples]
    i = max(range(len(costs)), key=costs.__getitem__)
    if costs[i] > token_budget:
        ex = examples[i]
        named = describe([i]) if describe is not None else f"example {i}"
        raise ConfigError(f"training.token_budget ({token_budget}) is below one pair: the longest pair, {named}, "
                          f"packs to {costs[i]} tokens (prompt {len(ex.prompt_ids)}, real response "
                          f"{len(ex.real_ids)}, synthetic response {len(ex.synthetic_ids)} tokens"
                          f"{', the prompt once' if share_prompt else ', the prompt twice'}); a micro-batch holds at "
                          f"least one pair: raise --token-budget to at least {costs[i]}")


def check_rows_fit(records: list[Record], tokenizer, cfg) -> None:
    """Before any work: say once how many real responses already end with the tokenizer's EOS
    text (tokenised without it: spin_kernels.packing.tokenize_response), and refuse a token
    budget below a pair whose size is known before sampling (prompt twice, the real response and
    at least the synthetic response's EOS). Only when the budget is below two sequences of
    ``max_length`` can a pair exceed it, so only then are the rows tokenised here."""
    import sys

    from .parallel import is_main

    eos = getattr(tokenizer, "eos_token", None)
    ending = [r["index"] for r in records if eos and isinstance(r.get("real"), str) and r["real"].endswith(eos)]
    if ending and is_main():
        print(f"spin-kernels: note: {len(ending)} real response(s) already end with the tokenizer's EOS text "
              f"{eos!r} (e.g. data rows {ending[:5]}); it is not added twice: each ends with one EOS token, as "
              f"the synthetic responses do", file=sys.stderr)
    t = cfg.training
    if t.token_budget >= 2 * cfg.data.max_length:
        return
    examples = [dataclasses.replace(ex, synthetic_ids=ex.synthetic_ids[-1:])
                for ex in to_examples(tokenizer, [dict(r, synthetic="") for r in records], cfg.data)]
    check_token_budget(examples, t.token_budget, t.share_prompt,
                       lambda pos: f"data row {records[pos[0]]['index']} (before sampling: its synthetic response "
                                   f"counted as one token)")


@torch.no_grad()
def reference_logps_for(
    model,
    examples: list,
    *,
    token_budget: int,
    impl: str = "auto",
    average: bool = False,
    share_prompt: bool = False,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    desc: str = "reference",
) -> list[tuple[float, float]]:
    """``[(log p(real|x), log p(synthetic|x))]`` under ``model`` for each example, in order.

    ``model``: a causal LM that went through ``spin_kernels.models.prepare_model``, or a runner
    (spin_kernels.training.parallel) of one. Micro-batches are planned without shuffling so the
    values do not depend on anything but the data. With several ranks (FSDP) each rank scores
    its own micro-batches of ``plan_micro_batches(..., num_ranks=W)`` (an empty one still runs a
    forward, whose result is dropped: FSDP's collectives) and the values are gathered by example.
    ``share_prompt``: pack each pair's prompt once (``pack_batch(..., share_prompt=True)``); the
    values are the same up to rounding. ``autocast()``: the compute context of the passes
    (``Loader.autocast``).
    """
    from spin_kernels.distributed import gather_by_index
    from spin_kernels.models import sequence_logps
    from spin_kernels.packing import pack_batch, plan_micro_batches

    if not examples:
        return []
    runner = as_runner(model)
    device = next(runner.parameters()).device
    was_training = runner.training
    runner.eval()
    plan = plan_micro_batches(examples, token_budget, num_ranks=world_size(), shuffle=False,
                              share_prompt=share_prompt)
    local = []
    try:
        for mb in progress(iterable=plan.micro_batches[rank()], desc=desc, unit="batch"):
            batch = pack_batch([examples[i] for i in (mb or [0])], share_prompt=share_prompt).to(device)
            with autocast():
                # Packed batches are known good (no value checks); non-finite log-probs are
                # reported by the caller with the model and the row.
                logps = runner.no_grad(lambda m, b: sequence_logps(m, b, impl=impl, average=average,
                                                                   check_values=False), batch)
            values = logps.float().cpu().tolist()
            local += [{"index": i, "ref": (values[2 * p], values[2 * p + 1])} for p, i in enumerate(mb)]
    finally:
        runner.train(was_training)
    try:
        gathered = gather_by_index(local, expected=len(examples))
    except ValueError as exc:
        raise RuntimeError(f"reference pass skipped examples (packing plan incomplete): {exc}") from exc
    return [tuple(r["ref"]) for r in gathered]  # type: ignore[misc]
