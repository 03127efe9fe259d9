"""The ops' corners (issue 25, item 7), each against the float64 full-logits reference:

* ``torch.autocast`` (bf16, CPU) around the ops: they compute in the inputs' dtypes with fp32
  accumulation, as without autocast (it used to round impl="torch"'s logits to bf16 in
  ``linear_logprobs`` and make its ``linear_spin_loss`` raise);
* impl="torch" holds one chunk of logits at a time (its temporaries are column blocks of it);
* a fp32 hidden with a half-precision weight is not rounded down (impl="triton" used to);
* the pair layout is an argument: a chosen-half / rejected-half batch (TRL's, Liger's) with
  ``pairs="halves"`` gives what the interleaved batch gives, on every impl.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings

import pytest
import torch

from cases import IGNORE, assert_close, cpu_kernels, grads, make_case, random_lengths
from spin_kernels import LinearSPINLoss, linear_logprobs, linear_spin_loss
from spin_kernels.ops import as_impl
from spin_kernels.ops.backends import TorchChunked
from spin_kernels.ops.backends.torch_chunked import COLUMN_BLOCKS
from spin_kernels.ops.layout import CountedRows, pair_order
from spin_kernels.ops.naive import naive_linear_logprobs, naive_linear_spin_loss

IMPLS = cpu_kernels()


def _reference_grads(case, out_fn, ref_fn):
    """(output, its gradients, the float64 reference's output and gradients) for upstream weights."""
    out = out_fn(case)
    r = case.float64()
    ref = ref_fn(r)
    upstream = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
    got = grads((out.double() * upstream).sum(), [case.hidden, case.weight, case.bias])
    want = grads((ref * upstream).sum(), [r.hidden, r.weight, r.bias])
    return out, got, ref, want


# -- autocast -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", IMPLS)
def test_logprobs_under_autocast_compute_in_the_inputs_dtype(kernel):
    case = make_case(random_lengths(4, 19, seed=30) + [1, 0], 24, 131, bias=True, seed=31)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, got, ref, want = _reference_grads(
            case,
            lambda c: linear_logprobs(c.hidden, c.weight, c.targets, c.cu_seqlens, bias=c.bias, softcap=4.0, impl=kernel),
            lambda r: naive_linear_logprobs(r.hidden, r.weight, r.targets, r.cu_seqlens, bias=r.bias, softcap=4.0))
    assert out.dtype == torch.float32
    assert_close(out, ref, 2e-5, "logps")  # bf16 logits would be ~1e-2 off
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        assert g.dtype == torch.float32, name
        assert_close(g, w, 2e-5, f"d{name}")


@pytest.mark.parametrize("kernel", IMPLS)
def test_spin_loss_under_autocast_runs_in_the_inputs_dtype(kernel):
    case = make_case(random_lengths(4, 19, seed=32), 24, 131, bias=True, seed=33)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps,
                                         bias=case.bias, beta=0.3, impl=kernel)
        got = grads(loss, [case.hidden, case.weight, case.bias])
    r = case.float64()
    ref, ref_metrics = naive_linear_spin_loss(r.hidden, r.weight, r.targets, r.cu_seqlens, r.ref_logps, bias=r.bias,
                                              beta=0.3)
    want = grads(ref, [r.hidden, r.weight, r.bias])
    assert_close(loss, ref, 2e-5, "loss")
    assert_close(metrics["rewards/margin"], ref_metrics["rewards/margin"], 1e-4, "margin")
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        assert_close(g, w, 6e-5, f"d{name}")


# -- impl="torch": one chunk of logits --------------------------------------------------------------


def peak_cpu_bytes(fn) -> int:
    """The most bytes of CPU tensors alive at once while ``fn`` runs beyond those alive when it
    starts, from the profiler's memory timeline (allocations and frees in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # export_memory_timeline: deprecated for CUDA's snapshots
        path = os.path.join(tmp, "memory.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as fh:
            _, sizes = json.load(fh)
    return max(sum(at) for at in sizes) - sum(sizes[0])


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("op", ["logprobs", "spin"])
def test_torch_path_holds_one_chunk_of_logits(op, softcap):
    """Forward + backward of impl="torch" at N = 1024, V = 8192 (32 MiB of fp32 logits) with a
    4 MiB chunk: the peak is the chunk, its column-block temporaries and the gradients, not two
    chunks (four with a softcap) as before: 10.5 / 18.5 MiB then, ~7 MiB now."""
    n, h, v, budget = 1024, 64, 8192, 4 * 2**20
    g = torch.Generator().manual_seed(34)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / 8).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    cu = torch.tensor([0, n // 4, n // 2, 3 * n // 4, n])
    chunked = as_impl(TorchChunked(logits_budget=budget))

    def step():
        if op == "logprobs":
            out = linear_logprobs(hidden, weight, targets, cu, softcap=softcap, impl=chunked).sum()
        else:
            out, _ = linear_spin_loss(hidden, weight, targets, cu, torch.zeros(4), softcap=softcap, impl=chunked)
        out.backward()

    step()  # warm: .grad buffers exist, as in training
    peak = peak_cpu_bytes(step)
    gradients = (n * h + v * h) * 4  # the op's gradients (then accumulated into the existing .grad)
    temporaries = 2 * budget // COLUMN_BLOCKS + 2**20
    assert peak <= budget + gradients + temporaries, (peak, budget + gradients + temporaries)
    assert peak < 2 * budget  # not two chunks


# -- mixed dtypes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", IMPLS)
def test_fp32_hidden_with_a_half_precision_weight_is_not_rounded_down(kernel):
    """Products in fp32: the output and ∂hidden are as accurate as for fp32 inputs (rounding the
    hidden to fp16 first costs ~1e-3 relative in ∂hidden); ∂weight comes back in fp16."""
    case = make_case(random_lengths(4, 19, seed=35) + [1, 0], 24, 131, seed=36)
    case.weight = case.weight.detach().half().requires_grad_()
    out, got, ref, want = _reference_grads(
        case, lambda c: linear_logprobs(c.hidden, c.weight, c.targets, c.cu_seqlens, impl=kernel),
        lambda r: naive_linear_logprobs(r.hidden, r.weight, r.targets, r.cu_seqlens))
    assert_close(out, ref, 2e-5, "logps")
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float16
    assert_close(got[0], want[0], 2e-5, "dhidden")
    assert_close(got[1], want[1], 2e-3, "dweight (rounded to fp16)")


# -- the pair layout ------------------------------------------------------------------------------------


def _halves(case):
    """The same pairs as chosen-half / rejected-half: (hidden rows, targets, cu_seqlens, ref_logps)
    with real responses 0..P-1 first, then the synthetic ones, and the row permutation used."""
    s = case.cu_seqlens.shape[0] - 1
    order = torch.cat([torch.arange(0, s, 2), torch.arange(1, s, 2)])
    cu = case.cu_seqlens.tolist()
    rows = torch.cat([torch.arange(cu[k], cu[k + 1]) for k in order.tolist()])
    lengths = torch.tensor([cu[k + 1] - cu[k] for k in order.tolist()])
    cu_halves = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(case.cu_seqlens.dtype)
    hidden = case.hidden.detach()[rows].requires_grad_()
    return hidden, case.targets[rows], cu_halves, case.ref_logps[order], rows


@pytest.mark.parametrize("kernel", IMPLS)
def test_pairs_halves_equal_the_interleaved_batch(kernel):
    case = make_case(random_lengths(5, 17, seed=37) + [0, 3], 20, 97, bias=True, seed=38)
    kw = dict(bias=case.bias, beta=0.2, softcap=6.0, impl=kernel)
    loss, metrics = linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps, **kw)
    want = grads(loss, [case.hidden, case.weight, case.bias])
    hidden, targets, cu, ref, rows = _halves(case)
    halves, halves_metrics = linear_spin_loss(hidden, case.weight, targets, cu, ref, pairs="halves", **kw)
    got = grads(halves, [hidden, case.weight, case.bias])
    assert_close(halves, loss, 1e-6, "loss")
    assert set(halves_metrics) == set(metrics)
    for key in metrics:
        assert_close(halves_metrics[key], metrics[key], 1e-6, key)
    assert_close(got[0], want[0][rows], 1e-6, "dhidden")
    assert_close(got[1], want[1], 1e-6, "dweight")
    assert_close(got[2], want[2], 1e-6, "dbias")
    # The same batch read as interleaved pairs is another loss: the layout is not guessed.
    wrong, _ = linear_spin_loss(hidden.detach(), case.weight.detach(), targets, cu, ref, **{**kw, "bias": None})
    assert abs(wrong.item() - loss.item()) > 1e-3


def test_pairs_halves_in_the_module_and_the_reference():
    case = make_case([6, 4, 9, 7, 5, 8], 12, 40, seed=39)
    hidden, targets, cu, ref, _ = _halves(case)
    module = LinearSPINLoss(beta=0.5, pairs="halves", impl="torch")
    assert "pairs='halves'" in repr(module)
    loss, _ = module(hidden, case.weight, targets, cu, ref)
    want, _ = naive_linear_spin_loss(case.hidden.double(), case.weight.double(), case.targets, case.cu_seqlens,
                                     case.ref_logps.double(), beta=0.5)
    assert_close(loss, want, 2e-6, "loss")
    with pytest.raises(ValueError, match="pairs must be one of"):
        linear_spin_loss(hidden, case.weight, targets, cu, ref, pairs="chosen_first")


@pytest.mark.parametrize("padded", [False, True], ids=["exact", "padded"])
@pytest.mark.parametrize("seed", range(6))
def test_counted_rows_in_pair_order_read_each_pair_in_place(seed, padded):
    """CountedRows with pair_order("halves"): the counted rows of sequence order[k] in place k,
    in row order, found from running counts (the padded layout: every row, counted ones first)."""
    lengths = random_lengths(3, 9, seed=seed)
    case = make_case(lengths, 4, 10, seed=seed)
    order = pair_order(6, "halves", torch.device("cpu"))
    assert order.tolist() == [0, 3, 1, 4, 2, 5]
    got = CountedRows.build(case.targets, case.cu_seqlens, IGNORE, padded=padded, order=order)
    cu = case.cu_seqlens.tolist()
    counted = [[i for i in range(cu[k], cu[k + 1]) if case.targets[i] != IGNORE] for k in order.tolist()]
    index = [i for rows in counted for i in rows]
    m = len(index)
    assert got.index[:m].tolist() == index
    assert got.seq[:m].tolist() == [k for k, rows in enumerate(counted) for _ in rows]
    assert got.counts.tolist() == [len(rows) for rows in counted]
    assert torch.equal(got.targets[:m], case.targets[index])
    if padded:
        assert int(got.count) == m and sorted(got.index.tolist()) == list(range(len(case.targets)))
        assert (got.targets[m:] == IGNORE).all()
    assert pair_order(6, "interleaved", torch.device("cpu")) is None
