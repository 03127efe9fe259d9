"""Per-example sampling and continuous batching (spin_kernels.models.decoding).

The oracle of continuous batching is transformers' own ``generate`` (its KV cache, its eager
attention) on each prompt alone, driven by the same per-example random stream: every sampled
token must be the same, for every architecture the packed tests cover (sliding windows,
softcaps, GQA, logits scaling), with fewer slots than prompts so that slots are refilled.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import ARCHS, VOCAB, make_model

from spin_kernels.models.decoding import ExampleSampler, continuous_generate, example_seed

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9], [10, 11, 12, 13], [14, 15, 16, 17, 18, 19]]


def _alone(model, prompt, seed, max_new_tokens, eos):
    """One prompt through transformers' generate (batch of one), Gumbel-max with its own stream."""
    sampler = ExampleSampler([seed], device="cpu")
    out = model.generate(torch.tensor([prompt]), do_sample=False, logits_processor=[sampler.processor()],
                         max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0, use_cache=True)
    tokens = out[0, len(prompt):].tolist()
    if eos in tokens:
        return tokens[:tokens.index(eos)], True
    return tokens, False


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_continuous_batching_samples_what_generate_samples_alone(arch):
    model = make_model(arch).eval()
    seeds = [example_seed(3, i) for i in range(len(PROMPTS))]
    # An EOS that some responses reach: the token the first prompt's stream samples at step 4.
    probe, _ = _alone(model, PROMPTS[0], seeds[0], 6, None)
    eos = probe[3]
    want = [_alone(model, p, s, 10, eos) for p, s in zip(PROMPTS, seeds)]
    got = continuous_generate(model, PROMPTS, ExampleSampler(seeds), slots=2, max_new_tokens=10, eos_token_id=eos)
    assert got == want
    assert any(finished for _, finished in want) and not all(finished for _, finished in want)
    assert model.config._attn_implementation == "eager"  # restored


def test_example_sampling_is_the_softmax_distribution():
    """Gumbel-max with the per-example streams draws from softmax(z / T) restricted to the top-p
    set: empirical frequencies over 20k streams against the exact probabilities."""
    z = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.0, 0.8)):
        n = 20000
        sampler = ExampleSampler([example_seed(0, i) for i in range(n)], temperature=temperature, top_p=top_p)
        draws = torch.cat([sampler.sample(z.expand(1000, -1), range(k, k + 1000)) for k in range(0, n, 1000)])
        freq = torch.bincount(draws, minlength=5).double() / n
        p = torch.softmax(z[0].double() / temperature, 0)
        if top_p < 1:  # transformers' rule: drop the tokens whose ascending cumulative mass is <= 1 - top_p
            sorted_p, order = p.sort()
            drop = sorted_p.cumsum(0) <= 1 - top_p
            p[order[drop]] = 0
            p /= p.sum()
        tolerance = 4 * math.sqrt(0.25 / n)
        assert (freq - p).abs().max() < tolerance, (temperature, top_p, freq, p)
        assert ((p == 0) <= (freq == 0)).all()


def test_a_stream_depends_on_its_seed_only():
    z = torch.randn(6, VOCAB)
    a = ExampleSampler([11, 12, 13, 14, 15, 16]).sample(z, range(6))
    shuffled = [3, 0, 5, 1, 4, 2]
    b = ExampleSampler([11 + i for i in shuffled]).sample(z[shuffled], range(6))
    assert torch.equal(a[shuffled], b)
    assert example_seed(1, 5) != example_seed(2, 5) and example_seed(1, 5) == example_seed(1, 5)


def test_continuous_generate_checks_its_arguments():
    model = make_model("llama")
    with pytest.raises(ValueError, match="streams for 2 prompts"):
        continuous_generate(model, [[1], [2]], ExampleSampler([1]), slots=1, max_new_tokens=2, eos_token_id=None)
    with pytest.raises(ValueError, match="at least one token"):
        continuous_generate(model, [[]], ExampleSampler([1]), slots=1, max_new_tokens=2, eos_token_id=None)
    with pytest.raises(ValueError, match="slots and max_new_tokens"):
        continuous_generate(model, [[1]], ExampleSampler([1]), slots=0, max_new_tokens=2, eos_token_id=None)
