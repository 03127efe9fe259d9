"""Step (2) of a SPIN iteration: the opponent's log-probs of the real and synthetic responses.

The opponent that generated the synthetic responses is also the reference model of the
iteration, so its log-probs are computed once, right after generation, on packed batches
(fused head, no [N, V] logits) and stored with the data (``ref_logps: [real, synthetic]``);
training then needs no second model in memory.
"""

from __future__ import annotations

import dataclasses

import torch
from tqdm.auto import tqdm

from .data import Record
from .loading import autocast


def to_examples(tokenizer, rows: list[Record], *, max_length: int, max_prompt_length: int) -> list:
    """``SpinExample`` s (token ids) for rows ``{prompt, real, synthetic[, finished, ref_logps]}``;
    example i gets ``index=i`` (its position in ``rows``)."""
    from spin_kernels.packing import tokenize_example

    out = []
    for i, row in enumerate(rows):
        ex = tokenize_example(tokenizer, row["prompt"], row["real"], row["synthetic"], max_length=max_length,
                              max_prompt_length=max_prompt_length, index=i)
        if row.get("finished") is False and ex.synthetic_ids[-1:] == [tokenizer.eos_token_id] \
                and len(ex.synthetic_ids) > 1:
            # Generation hit max_new_tokens: the response was cut, not ended. As for responses cut
            # by max_length (spin_kernels.packing), the opponent is not credited with an EOS here.
            ex = dataclasses.replace(ex, synthetic_ids=ex.synthetic_ids[:-1])
        if row.get("ref_logps") is not None:
            ex = dataclasses.replace(ex, ref_logps=tuple(float(v) for v in row["ref_logps"]))
        out.append(ex)
    return out


@torch.no_grad()
def reference_logps_for(
    model,
    examples: list,
    *,
    token_budget: int,
    impl: str = "auto",
    average: bool = False,
    bf16: bool = False,
    desc: str = "reference",
) -> list[tuple[float, float]]:
    """``[(log p(real|x), log p(synthetic|x))]`` under ``model`` for each example, in order.

    ``model`` must have gone through ``spin_kernels.models.prepare_model``. Micro-batches are
    planned without shuffling so the values do not depend on anything but the data.
    """
    from spin_kernels.models import sequence_logps
    from spin_kernels.packing import pack_batch, plan_micro_batches

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    plan = plan_micro_batches(examples, token_budget, shuffle=False)
    out: list[tuple[float, float] | None] = [None] * len(examples)
    try:
        for mb in tqdm([m for m in plan.micro_batches[0] if m], desc=desc, unit="batch", dynamic_ncols=True):
            chosen = [examples[i] for i in mb]
            batch = pack_batch(chosen).to(device)
            with autocast(device, bf16):
                logps = sequence_logps(model, batch, impl=impl, average=average)
            values = logps.float().cpu().tolist()
            for p, i in enumerate(mb):
                out[i] = (values[2 * p], values[2 * p + 1])
    finally:
        model.train(was_training)
    missing = [i for i, v in enumerate(out) if v is None]
    if missing:
        raise RuntimeError(f"reference pass skipped examples {missing[:5]} (packing plan incomplete)")
    return out  # type: ignore[return-value]
