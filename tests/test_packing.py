"""Tokenisation rules, the PackedBatch layout and the packer's properties."""

from __future__ import annotations

import copy
import itertools
from collections import Counter

import pytest
import torch
from cases import traceable_examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spin_kernels.packing import (
    IGNORE_INDEX,
    PackedBatch,
    SpinExample,
    build_bpe_tokenizer,
    load_ultrachat_sample,
    pack_batch,
    plan_micro_batches,
    sample_tokenizer,
    tokenize_example,
    tokenize_prompt,
)
from spin_kernels.packing.stats import (
    FIRST_TURN_ROWS,
    packing_stats,
    sample_spin_examples,
)

ROWS = load_ultrachat_sample()
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tok():
    return sample_tokenizer()


# ---------------------------------------------------------------- tokenizer and tokenisation

def test_sample_has_the_documented_rows():
    assert len(ROWS) == 154 and all(set(r) == {"prompt", "real"} for r in ROWS)
    assert max(FIRST_TURN_ROWS) < len(ROWS)


def test_bpe_training_is_deterministic(tok):
    again = build_bpe_tokenizer((t for r in ROWS for t in (r["prompt"], r["real"])), 4096)
    assert again.get_vocab() == tok.get_vocab()
    text = ROWS[3]["real"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: lossless
    with pytest.raises(ValueError, match="vocab_size"):
        build_bpe_tokenizer(["abc"], vocab_size=100)


def test_chat_template_prompt_and_eos(tok):
    ex = tokenize_example(tok, "What is 2+2?", "It is 4.", "Five.", index=7)
    assert tok.decode(ex.prompt_ids) == "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n"
    assert tok.decode(ex.real_ids) == "It is 4.<|end|>" and ex.real_ids[-1] == tok.eos_token_id
    assert ex.synthetic_ids[-1] == tok.eos_token_id and ex.index == 7 and ex.ref_logps is None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    prompt = tokenize_prompt(tok, messages)
    assert tok.decode(prompt) == "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n"


def test_plain_format_without_chat_template(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    ex = tokenize_example(plain, "Hi", "Hello.", "Yo.")
    assert plain.decode(ex.prompt_ids) == "User: Hi\n\nAssistant:"
    assert plain.decode(ex.real_ids) == " Hello.<|end|>"


def test_tokenisation_errors(tok):
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_example(tok, "a", "b", "c", max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_example(tok, "a", "b", "c", max_length=0)
    with pytest.raises(ValueError, match="assistant"):
        tokenize_prompt(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(TypeError, match="prompt"):
        tokenize_prompt(tok, 42)
    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="eos"):
        tokenize_example(no_eos, "a", "b", "c")


@FAST
@given(row=st.integers(0, len(ROWS) - 1), max_prompt=st.integers(1, 200), extra=st.integers(1, 400))
def test_truncation_rules(row, max_prompt, extra):
    tok = sample_tokenizer()
    max_length = max_prompt + extra
    prompt, real = ROWS[row]["prompt"], ROWS[row]["real"]
    synthetic = ROWS[(row + 1) % len(ROWS)]["real"]
    ex = tokenize_example(tok, prompt, real, synthetic, max_length=max_length, max_prompt_length=max_prompt)
    full_prompt = tokenize_prompt(tok, prompt, max_prompt_length=10**9)
    assert ex.prompt_ids == full_prompt[-max_prompt:]  # the prompt keeps its end
    for text, ids in ((real, ex.real_ids), (synthetic, ex.synthetic_ids)):
        full = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        room = max_length - len(ex.prompt_ids)
        assert ids == full[:room]  # the response keeps its start
        assert len(ex.prompt_ids) + len(ids) <= max_length
        assert (ids[-1] == tok.eos_token_id) == (len(full) <= room)  # EOS only if the whole response fits


# ---------------------------------------------------------------- PackedBatch layout

lengths = st.tuples(st.integers(0, 12), st.integers(1, 12), st.integers(1, 12))


@FAST
@given(spec=st.lists(lengths, min_size=1, max_size=6), ref=st.booleans())
def test_pack_batch_layout(spec, ref):
    examples = traceable_examples(spec, ref)
    b = pack_batch(examples)
    assert b.num_pairs == len(examples) and b.num_sequences == 2 * len(examples)
    assert b.cu_seqlens.dtype == torch.int32 and b.input_ids.dtype == torch.int64
    assert b.targets.dtype == torch.int64 and b.position_ids.dtype == torch.int64
    cu = b.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == b.num_tokens
    assert b.max_seqlen == max(e - s for s, e in itertools.pairwise(cu))
    for p, ex in enumerate(examples):
        for k, response in enumerate((ex.real_ids, ex.synthetic_ids)):
            s, e = cu[2 * p + k], cu[2 * p + k + 1]
            assert b.input_ids[s:e].tolist() == ex.prompt_ids + response
            assert b.position_ids[s:e].tolist() == list(range(e - s))
            targets = b.targets[s:e].tolist()
            # Row n predicts token n+1 of the same sequence, only for response tokens.
            seq = ex.prompt_ids + response
            want = [seq[n + 1] if len(ex.prompt_ids) <= n + 1 < len(seq) else IGNORE_INDEX for n in range(len(seq))]
            assert targets == want
            assert targets[-1] == IGNORE_INDEX  # the shift never crosses into the next sequence
    assert b.num_counted == sum(len(ex.real_ids) + len(ex.synthetic_ids) for ex in examples) - sum(
        2 for ex in examples if not ex.prompt_ids)
    assert b.example_index.tolist() == [ex.index for ex in examples]
    if ref:
        assert b.ref_logps.dtype == torch.float32
        assert b.ref_logps.tolist() == [v for ex in examples for v in ex.ref_logps]
    else:
        assert b.ref_logps is None


def test_pack_batch_errors_and_moves():
    examples = traceable_examples([(2, 3, 4), (1, 1, 1)], ref=True)
    b = pack_batch(examples)
    moved = b.to("cpu")
    assert isinstance(moved, PackedBatch) and torch.equal(moved.input_ids, b.input_ids)
    assert moved.max_seqlen == b.max_seqlen and torch.equal(moved.ref_logps, b.ref_logps)
    pinned = b.pin_memory()
    assert torch.equal(pinned.targets, b.targets)
    if torch.cuda.is_available():
        assert pinned.input_ids.is_pinned()
    with pytest.raises(ValueError, match="at least one"):
        pack_batch([])
    examples[1].ref_logps = None
    with pytest.raises(ValueError, match="ref_logps"):
        pack_batch(examples)
    with pytest.raises(ValueError, match="empty response"):
        pack_batch([SpinExample([1], [], [2])])
    with pytest.raises(TypeError, match="SpinExample"):
        pack_batch([(1, 2, 3)])


# ---------------------------------------------------------------- the packer

pair_lengths = st.tuples(st.integers(0, 60), st.integers(1, 90), st.integers(1, 90))


def _plan_tokens(plan, examples):
    return [[sum(examples[i].num_tokens for i in mb) for mb in rank] for rank in plan.micro_batches]


@FAST
@given(spec=st.lists(pair_lengths, min_size=0, max_size=60), budget=st.integers(40, 600),
       num_ranks=st.integers(1, 4), seed=st.integers(0, 3), shuffle=st.booleans())
def test_packer_properties(spec, budget, num_ranks, seed, shuffle):
    examples = traceable_examples(spec)
    plan = plan_micro_batches(examples, budget, num_ranks=num_ranks, seed=seed, shuffle=shuffle)
    assert len(plan.micro_batches) == num_ranks
    assert len({len(rank) for rank in plan.micro_batches}) == 1  # same number of steps on every rank

    placed = Counter(i for rank in plan.micro_batches for mb in rank for i in mb)
    assert placed == Counter(range(len(examples)))  # every pair exactly once, never split (an index is a pair)

    loads = _plan_tokens(plan, examples)
    assert sum(map(sum, loads)) == sum(ex.num_tokens for ex in examples)  # no token lost or duplicated
    for rank, rank_loads in zip(plan.micro_batches, loads):
        for mb, load in zip(rank, rank_loads):
            assert load <= budget or len(mb) == 1  # budget kept, except an oversized pair alone

    biggest = max((load for rank_loads in loads for load in rank_loads), default=0)
    totals = [sum(r) for r in loads]
    assert max(totals) - min(totals) <= biggest  # ranks balanced within one micro-batch

    if num_ranks == 1:  # any-fit packing: at most one micro-batch at most half full
        assert sum(1 for load in loads[0] if load <= budget / 2) <= 1

    again = plan_micro_batches(examples, budget, num_ranks=num_ranks, seed=seed, shuffle=shuffle)
    assert again.micro_batches == plan.micro_batches  # deterministic for a seed

    s = plan.stats
    assert s.num_tokens == sum(ex.num_tokens for ex in examples) and s.num_pairs == len(examples)
    assert s.num_micro_batches == sum(len(r) for r in plan.micro_batches)
    assert s.padded_tokens >= s.num_tokens
    assert s.num_oversized == sum(1 for ex in examples if ex.num_tokens > budget)


def test_fewer_pairs_than_ranks_get_empty_micro_batches():
    examples = traceable_examples([(1, 2, 3), (2, 2, 2), (3, 3, 3)])
    plan = plan_micro_batches(examples, 1000, num_ranks=4)
    assert plan.num_steps == 1 and plan.stats.num_empty == 1
    assert sorted(len(rank[0]) for rank in plan.micro_batches) == [0, 1, 1, 1]
    got = [b for r in range(4) for b in plan.batches(examples, r)]
    assert sum(b is None for b in got) == 1
    assert sorted(int(b.example_index[0]) for b in got if b is not None) == [100, 101, 102]
    assert plan_micro_batches([], 100, num_ranks=2).micro_batches == [[], []]


def test_packer_argument_errors():
    with pytest.raises(ValueError, match="token_budget"):
        plan_micro_batches(traceable_examples([(1, 1, 1)]), 0)
    with pytest.raises(ValueError, match="num_ranks"):
        plan_micro_batches(traceable_examples([(1, 1, 1)]), 10, num_ranks=0)
    with pytest.raises(TypeError, match="SpinExample"):
        plan_micro_batches([(1, 1, 1)], 10)


def test_seed_changes_order_not_quality():
    examples = traceable_examples([(i % 7, 1 + i % 13, 1 + (5 * i) % 17) for i in range(80)])
    a = plan_micro_batches(examples, 200, seed=0)
    b = plan_micro_batches(examples, 200, seed=1)
    assert a.micro_batches != b.micro_batches
    assert abs(a.stats.num_micro_batches - b.stats.num_micro_batches) <= 1


def test_packing_beats_padding_on_real_text(tok):
    examples = sample_spin_examples(tok, ROWS, seed=0)
    assert len(examples) == len(ROWS)
    assert all(ex.real_length <= 1024 and ex.synthetic_length <= 1024 for ex in examples)
    assert all(len(ex.synthetic_ids) <= 256 for ex in examples)
    stats = packing_stats(examples, 4096)
    # Packing leaves less of each micro-batch empty than padding would waste on the same pairs.
    assert 1 - stats.fill_ratio < stats.padding_waste < stats.random_padding_waste
    assert stats.fill_ratio > 0.9
