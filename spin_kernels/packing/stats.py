"""Packer statistics on real text: ``python -m spin_kernels.packing.stats``.

Real pairs: the UltraChat-200k sample (tests/data/ultrachat_sample.jsonl, MIT), all 154 rows by
default (``--first-turns``: the 41 rows that start a conversation), tokenised with the offline
BPE (``sample_tokenizer``) and its chat template.

Synthetic responses: there is no model to sample from here, so each prompt's synthetic response
is the real response of another row drawn at random (seeded), cut to ``--max-new-tokens`` as a
generation limit would (EOS kept only if the response ended within the limit). Synthetic lengths
therefore follow the real length distribution, capped like SPIN's generation (256 new tokens in
the paper).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path

from .example import SpinExample, tokenize_prompt, tokenize_response, truncate_response
from .planner import PackStats, plan_micro_batches
from .tokenizer import load_ultrachat_sample, sample_tokenizer

#: 0-based rows of the sample that start a conversation (tests/data/README.md).
FIRST_TURN_ROWS = (0, 4, 12, 15, 16, 19, 23, 30, 32, 38, 43, 48, 51, 56, 58, 62, 69, 74, 77, 79, 81, 85, 90, 92, 95,
                   97, 99, 103, 107, 111, 115, 118, 121, 125, 131, 133, 136, 140, 141, 145, 151)


def sample_spin_examples(tokenizer, rows: Sequence[dict], *, seed: int = 0, max_length: int = 1024,
                         max_prompt_length: int = 512, max_new_tokens: int = 256,
                         repeat: int = 1) -> list[SpinExample]:
    """SPIN pairs from ``{"prompt", "real"}`` rows, with synthetic responses borrowed from other rows.

    Args:
        rows: at least two rows.
        repeat: pairs per row (each with its own synthetic draw), to make larger realistic sets.

    Returns:
        ``repeat * len(rows)`` SpinExample, ``index`` = the row number.
    """
    if len(rows) < 2:
        raise ValueError(f"rows must hold at least 2 rows to borrow synthetic responses, got {len(rows)}")
    rng = random.Random(seed)
    prompts = [tokenize_prompt(tokenizer, r["prompt"], max_prompt_length=max_prompt_length) for r in rows]
    responses = [tokenize_response(tokenizer, r["real"]) for r in rows]
    examples = []
    for _ in range(repeat):
        for i, prompt_ids in enumerate(prompts):
            j = rng.randrange(len(rows) - 1)
            j += j >= i  # any row but i
            synthetic = responses[j][:max_new_tokens]
            examples.append(SpinExample(
                prompt_ids=prompt_ids,
                real_ids=truncate_response(responses[i], len(prompt_ids), max_length),
                synthetic_ids=truncate_response(synthetic, len(prompt_ids), max_length),
                index=i,
            ))
    return examples


def packing_stats(examples: Sequence[SpinExample], token_budget: int, num_ranks: int = 1,
                  seed: int = 0, share_prompt: bool = False) -> PackStats:
    """The PackStats of ``plan_micro_batches`` for these pairs."""
    return plan_micro_batches(examples, token_budget, num_ranks=num_ranks, seed=seed, share_prompt=share_prompt).stats


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m spin_kernels.packing.stats", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="JSONL of {prompt, real} (default: the sample)")
    parser.add_argument("--first-turns", action="store_true", help="only rows that start a conversation")
    parser.add_argument("--budgets", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-prompt-length", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1, help="synthetic draws per row")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--share-prompt", action="store_true",
                        help="plan the shared-prompt layout (pack_batch(..., share_prompt=True))")
    args = parser.parse_args(argv)

    rows = load_ultrachat_sample(args.data)
    if args.first_turns:
        rows = [rows[i] for i in FIRST_TURN_ROWS if i < len(rows)]
    tokenizer = sample_tokenizer(args.vocab_size, args.data)
    examples = sample_spin_examples(tokenizer, rows, seed=args.seed, max_length=args.max_length,
                                    max_prompt_length=args.max_prompt_length, max_new_tokens=args.max_new_tokens,
                                    repeat=args.repeat)
    chars = sum(len(r["prompt"]) + len(r["real"]) for r in rows)
    toks = sum(len(tokenize_prompt(tokenizer, r["prompt"], max_prompt_length=10**9))
               + len(tokenize_response(tokenizer, r["real"])) for r in rows)
    seq = sorted(n for ex in examples for n in (ex.real_length, ex.synthetic_length))
    print(f"{len(examples)} pairs from {len(rows)} rows ({'first turns' if args.first_turns else 'all rows'}); "
          f"BPE vocab {len(tokenizer)}, {chars / toks:.2f} chars/token; max_length {args.max_length}, "
          f"max_prompt_length {args.max_prompt_length}, synthetic <= {args.max_new_tokens} new tokens, "
          f"seed {args.seed}")
    print(f"sequence tokens: median {seq[len(seq) // 2]}, p90 {seq[int(0.9 * (len(seq) - 1))]}, max {seq[-1]}; "
          f"prompt share of tokens {sum(2 * len(ex.prompt_ids) for ex in examples) / sum(seq):.1%}")
    default, shared = (sum(ex.packed_tokens(share) for ex in examples) for share in (False, True))
    print(f"tokens per pair: {default / len(examples):.1f} as two sequences, {shared / len(examples):.1f} with "
          f"the prompt shared ({shared / default - 1:+.1%}); planned layout: "
          f"{'shared prompt' if args.share_prompt else 'two sequences'}")
    print("| budget | ranks | micro-batches | fill ratio | padding waste (same micro-batches) "
          "| padding waste (random batches, same pairs/batch) | rank imbalance | step imbalance |")
    print("|---|---|---|---|---|---|---|---|")
    for budget in args.budgets:
        for ranks in args.ranks:
            s = packing_stats(examples, budget, ranks, args.seed, share_prompt=args.share_prompt)
            print(f"| {budget} | {ranks} | {s.num_micro_batches} | {s.fill_ratio:.1%} | {s.padding_waste:.1%} "
                  f"| {s.random_padding_waste:.1%} | {s.rank_imbalance:.3f} | {s.step_imbalance:.3f} |")


if __name__ == "__main__":
    main()
