"""Property tests over random cu_seqlens layouts (hypothesis), and the chunking edge cases."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cases import assert_close, grads, make_case
from spin_kernels import linear_logprobs, linear_spin_loss
from spin_kernels.ops import as_impl
from spin_kernels.ops.backends import TorchChunked
from spin_kernels.ops.naive import naive_linear_logprobs, naive_linear_spin_loss

layouts = st.lists(st.integers(min_value=0, max_value=12), min_size=0, max_size=10)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=layouts, prompt_frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), average=st.booleans())
def test_logprobs_any_layout(lengths, prompt_frac, seed, average):
    case = make_case(lengths, 6, 29, prompt_frac=prompt_frac, seed=seed, dtype=torch.float64)
    out = linear_logprobs(case.hidden, case.weight, case.targets, case.cu_seqlens, average=average, impl="torch")
    ref = naive_linear_logprobs(case.hidden, case.weight, case.targets, case.cu_seqlens, average=average)
    assert_close(out, ref, 1e-10, "logps")
    if out.numel():
        up = torch.randn(out.shape[0], dtype=torch.float64)
        for g, r in zip(grads((out * up).sum(), [case.hidden, case.weight]),
                        grads((ref * up).sum(), [case.hidden, case.weight])):
            assert_close(g, r, 1e-10, "grad")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair_lengths=st.lists(st.integers(0, 15), min_size=2, max_size=12).filter(lambda x: len(x) % 2 == 0),
       budget_rows=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_spin_tiling_any_budget(pair_lengths, budget_rows, seed):
    """Tiles of whole pairs, and pairs larger than one chunk (two-pass), give the same result."""
    vocab = 23
    case = make_case(pair_lengths, 5, vocab, seed=seed, dtype=torch.float64, bias=True)
    backend = TorchChunked(logits_budget=budget_rows * vocab * 8)
    options = dict(temperature=0.9, softcap=3.0, average=True, beta=0.5, loss_type="sigmoid")
    loss, _ = linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps.double(),
                               bias=case.bias, impl=as_impl(backend), **options)
    ref, _ = naive_linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps.double(),
                                    beta=0.5, bias=case.bias, temperature=0.9, softcap=3.0, average=True)
    assert_close(loss, ref, 1e-10, "loss")
    for g, r in zip(grads(loss, [case.hidden, case.weight, case.bias]),
                    grads(ref, [case.hidden, case.weight, case.bias])):
        assert_close(g, r, 1e-10, "grad")


def test_logprobs_chunking_is_invisible():
    case = make_case([30, 1, 0, 44, 17], 7, 41, dtype=torch.float64, seed=3)
    outs = []
    for rows in (1, 7, 1000):
        backend = TorchChunked(logits_budget=rows * 41 * 8)
        out = linear_logprobs(case.hidden, case.weight, case.targets, case.cu_seqlens, impl=as_impl(backend))
        outs.append((out, grads(out.sum(), [case.hidden, case.weight])))
    for out, g in outs[1:]:
        assert_close(out, outs[0][0], 1e-12, "logps")
        for a, b in zip(g, outs[0][1]):
            assert_close(a, b, 1e-12, "grad")
