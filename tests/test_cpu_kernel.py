"""The C++ kernels of csrc/ (impl="cpu") beyond the generic op tests of test_ops_reference.py.

Tiny tiles (a few rows, 8-16 vocabulary columns, several parts) make small shapes cross every
boundary the real tiling has: parts of the vocabulary, partial last tiles, row blocks, logits
kept in the store or recomputed, both matrix-product engines. Runs in ~15 s on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cases import IGNORE, assert_close, grads, make_case, random_lengths
from spin_kernels.ops import as_impl, linear_logprobs, linear_spin_loss
from spin_kernels.ops.backends import Needs
from spin_kernels.ops.layout import pair_groups
from spin_kernels.ops.naive import naive_linear_logprobs, naive_linear_spin_loss
from spin_kernels.ops.options import SpinOptions

cpu_backend = pytest.importorskip("spin_kernels.ops.backends.cpu_backend",
                                  reason="the C++ extension spin_kernels._C is not built")
CpuFused = cpu_backend.CpuFused
OPS = torch.ops.spin_kernels_cpu

# (parts, row_tile, vocab_tile): one tile; several parts with ragged last tiles and row blocks.
TILINGS = [(1, 1024, 256), (3, 5, 8), (2, 7, 16)]
HEADS = [{}, {"bias": True, "temperature": 0.7}, {"bias": True, "temperature": 1.3, "softcap": 4.0, "average": True}]


def _ids(options):
    return "-".join(options) or "plain"


def _head(options):
    return {k: v for k, v in options.items() if k != "bias"}


def _naive_kwargs(case, options):
    return dict(bias=case.bias, **_head(options))


def _logprobs(case, backend, options):
    return linear_logprobs(case.hidden, case.weight, case.targets, case.cu_seqlens, bias=case.bias,
                           ignore_index=IGNORE, impl=as_impl(backend), **_head(options))


def _spin_loss(case, backend, options, beta=0.3, loss_type="sigmoid"):
    return linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps, bias=case.bias,
                            beta=beta, loss_type=loss_type, ignore_index=IGNORE, impl=as_impl(backend),
                            **_head(options))[0]


def _check_against_reference(case, out, ref_case, ref, rtol_out, rtol_grad):
    assert_close(out, ref, rtol_out, "output")
    upstream = torch.randn(out.shape, dtype=torch.float64)
    got = grads((out.double() * upstream).sum(), [case.hidden, case.weight, case.bias])
    want = grads((ref * upstream).sum(), [ref_case.hidden, ref_case.weight, ref_case.bias])
    for name, g, w, x in zip(("hidden", "weight", "bias"), got, want, (case.hidden, case.weight, case.bias)):
        if x is not None:
            assert g.dtype == x.dtype, f"d{name} dtype"
            assert_close(g, w, rtol_grad, f"d{name}")


@pytest.mark.parametrize("options", HEADS, ids=_ids)
@pytest.mark.parametrize("tiling", TILINGS, ids=str)
def test_logprobs_with_any_tiling_match_float64_reference(tiling, options):
    parts, row_tile, vocab_tile = tiling
    lengths = random_lengths(4, 21, seed=5) + [0, 1, 2]
    case = make_case(lengths, 13, 61, bias=options.get("bias", False), seed=6)
    backend = CpuFused(parts=parts, row_tile=row_tile, vocab_tile=vocab_tile)
    ref_case = case.float64()
    ref = naive_linear_logprobs(ref_case.hidden, ref_case.weight, case.targets, case.cu_seqlens,
                                **_naive_kwargs(ref_case, options))
    _check_against_reference(case, _logprobs(case, backend, options), ref_case, ref, 2e-5, 2e-5)


# store_bytes: nothing kept (two passes); some tiles of a pair's logits; several pairs per group.
@pytest.mark.parametrize("store_bytes", [0, 4000, 1 << 20])
@pytest.mark.parametrize("options", HEADS, ids=_ids)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_spin_loss_with_any_store_matches_float64_reference(store_bytes, options, loss_type):
    lengths = random_lengths(5, 25, seed=7) + [1, 0]
    case = make_case(lengths, 11, 53, bias=options.get("bias", False), seed=8)
    backend = CpuFused(store_bytes=store_bytes, parts=3, row_tile=6, vocab_tile=8)
    beta = 0.3 if loss_type == "sigmoid" else 0.01
    ref_case = case.float64()
    ref, _ = naive_linear_spin_loss(ref_case.hidden, ref_case.weight, case.targets, case.cu_seqlens,
                                    ref_case.ref_logps, beta=beta, loss_type=loss_type,
                                    **_naive_kwargs(ref_case, options))
    out = _spin_loss(case, backend, options, beta, loss_type)
    _check_against_reference(case, out, ref_case, ref, 2e-5, 6e-5)


@pytest.mark.parametrize("gemm", ["onednn", "blas"])
def test_backward_from_stored_logits_matches_recomputation(gemm):
    if gemm == "onednn" and cpu_backend.default_gemm() != "onednn":
        pytest.skip("this torch does not export oneDNN's matmul")
    g = torch.Generator().manual_seed(1)
    h, w, b = torch.randn(10, 12, generator=g), torch.randn(64, 12, generator=g), torch.randn(64, generator=g)
    y = torch.randint(0, 64, (10,), generator=g)
    tiles = (2, 4, 8)  # two parts of 32 columns = 4 tiles each; row blocks of 4
    store = torch.full((10 * 64 + 7,), float("nan"))
    logp, lse, _ = OPS.rows_forward(h, w, b, y, 0.8, 3.0, store, *tiles, None, gemm)
    assert torch.equal(logp, OPS.rows_forward(h, w, b, y, 0.8, 3.0, None, *tiles, None, gemm)[0])
    assert not store[:640].isnan().any() and store[640:].isnan().all()  # every logit kept, nothing past M x V
    grad = torch.randn(10, generator=g)
    results = []
    for s in (store, None):
        out = (torch.empty(10, 12), torch.zeros(64, 12), torch.zeros(64))
        OPS.rows_backward(h, w, b, y, lse, grad, 0.8, 3.0, s, *tiles, *out, None, gemm)
        results.append(out)
    for a, c in zip(*results):
        assert torch.equal(a, c)


def test_both_matrix_product_engines_match_the_float64_reference():
    """gemm="onednn" (the default where torch exports it) and gemm="blas" compute the same function."""
    lengths = random_lengths(4, 23, seed=17) + [0, 1]
    case = make_case(lengths, 19, 83, bias=True, seed=18)
    options = {"bias": True, "temperature": 0.9}
    engines = ["blas"] + (["onednn"] if cpu_backend.default_gemm() == "onednn" else [])
    for gemm in engines:
        ref_case = case.float64()
        ref, _ = naive_linear_spin_loss(ref_case.hidden, ref_case.weight, case.targets, case.cu_seqlens,
                                        ref_case.ref_logps, beta=0.3, **_naive_kwargs(ref_case, options))
        backend = CpuFused(parts=2, row_tile=7, vocab_tile=16, gemm=gemm)
        _check_against_reference(case, _spin_loss(case, backend, options), ref_case, ref, 2e-5, 6e-5)


def test_gemm_names_are_checked():
    assert cpu_backend.default_gemm() in ("onednn", "blas")
    with pytest.raises(ValueError, match="gemm must be one of"):
        CpuFused(gemm="mkl")
    with pytest.raises(RuntimeError, match="gemm must be 'auto', 'onednn' or 'blas', got 'mkl'"):
        OPS.rows_forward(*_kernel_args().values(), "mkl")


def test_dhidden_through_row_index_writes_only_the_counted_rows():
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(9, 8, generator=g), torch.randn(30, 8, generator=g)
    index = torch.tensor([0, 2, 3, 7, 8])
    y = torch.randint(0, 30, (5,), generator=g)
    tiles = (2, 2, 8)
    logp, lse, _ = OPS.rows_forward(h, w, None, y, 1.0, 0.0, None, *tiles, index)
    assert torch.equal(logp, OPS.rows_forward(h[index], w, None, y, 1.0, 0.0, None, *tiles)[0])
    grad = torch.randn(5, generator=g)
    dh = torch.full((9, 8), 7.0)
    OPS.rows_backward(h, w, None, y, lse, grad, 1.0, 0.0, None, *tiles, dh, None, None, index)
    gathered = torch.empty(5, 8)
    OPS.rows_backward(h[index], w, None, y, lse, grad, 1.0, 0.0, None, *tiles, gathered, None, None)
    assert torch.equal(dh[index], gathered)
    others = torch.tensor([1, 4, 5, 6])
    assert torch.equal(dh[others], torch.full((4, 8), 7.0))


def test_spin_path_with_kept_logits_equals_the_two_pass_path():
    """The fused SPIN path (logits kept in the store, 6·N·H·V) against forward + backward through
    the counted-row index (Backend's default, 8·N·H·V); dhidden shaped like hidden."""
    from spin_kernels.ops.backends import Backend
    from spin_kernels.ops.layout import CountedRows

    case = make_case(random_lengths(3, 20, seed=15), 10, 40, dtype=torch.bfloat16, bias=True, seed=16)
    rows = CountedRows.build(case.targets, case.cu_seqlens, IGNORE)
    backend = CpuFused(parts=2, row_tile=5, vocab_tile=8, store_bytes=1 << 20)
    h, w, b = case.hidden.detach(), case.weight.detach(), case.bias.detach()
    args = (w, b, rows, case.ref_logps, SpinOptions(softcap=2.0, average=True, beta=0.2), Needs())
    assert h.shape[0] > rows.num_rows
    fused = backend.spin_forward_backward(h, *args)
    two_pass = Backend.spin_forward_backward(backend, h, *args)
    for name, a, c in zip(fused._fields, fused, two_pass):
        assert (a is None) == (c is None), name
        if a is not None:
            assert_close(a, c, 1e-6, name)
    dh = fused.dhidden
    assert dh.shape == h.shape  # zero on the rows that are not counted
    not_counted = torch.ones(h.shape[0], dtype=torch.bool)
    not_counted[rows.index] = False
    assert torch.equal(dh[not_counted], torch.zeros_like(dh[not_counted]))


def test_pair_groups_hold_whole_pairs_within_the_store():
    offsets = [0, 3, 9, 9, 25, 30, 31]  # pairs of 3, 6, 0, 16, 5, 1 rows
    groups = pair_groups(offsets, 10)  # a store of 10 rows
    assert groups == [(0, 3), (3, 4), (4, 6)]  # 3 + 6 + 0 rows; 16 (too big: alone); 5 + 1
    assert pair_groups(offsets, 0) == [(i, i + 1) for i in range(6)]


def test_hinge_pairs_past_the_margin_get_zero_gradient():
    case = make_case([9, 8, 7, 10, 6, 9], 12, 40, seed=9)
    case.ref_logps = torch.tensor([-500.0, 0.0, -20.0, -20.0, 0.0, -500.0])  # margins +inf-ish, ~0, -inf-ish
    backend = CpuFused(parts=2, row_tile=4, vocab_tile=8, store_bytes=600)
    out = _spin_loss(case, backend, {}, beta=0.1, loss_type="hinge")
    ref_case = case.float64()
    ref, _ = naive_linear_spin_loss(ref_case.hidden, ref_case.weight, case.targets, case.cu_seqlens,
                                    ref_case.ref_logps, beta=0.1, loss_type="hinge")
    _check_against_reference(case, out, ref_case, ref, 2e-5, 6e-5)
    (dh,) = grads(_spin_loss(case, backend, {}, beta=0.1, loss_type="hinge"), [case.hidden])
    first_pair = slice(0, 17)
    assert torch.equal(dh[first_pair], torch.zeros_like(dh[first_pair]))
    assert dh[17:].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_fp32(dtype):
    case = make_case(random_lengths(4, 19, seed=10), 24, 67, dtype=dtype, bias=True, seed=11)
    backend = CpuFused(parts=2, row_tile=9, vocab_tile=16, store_bytes=3000)
    ref_case = case.float64()
    options = {"bias": True, "softcap": 5.0}
    ref = naive_linear_logprobs(ref_case.hidden, ref_case.weight, case.targets, case.cu_seqlens,
                                **_naive_kwargs(ref_case, options))
    out = _logprobs(case, backend, options)
    assert out.dtype == torch.float32
    # Output from the rounded inputs, accumulated in fp32: as tight as fp32; gradients carry
    # the rounding to the input dtype.
    _check_against_reference(case, out, ref_case, ref, 2e-5, 1e-2)
    ref_loss, _ = naive_linear_spin_loss(ref_case.hidden, ref_case.weight, case.targets, case.cu_seqlens,
                                         ref_case.ref_logps, **_naive_kwargs(ref_case, options))
    _check_against_reference(case, _spin_loss(case, backend, options, beta=0.1), ref_case, ref_loss, 2e-5, 3e-2)


def test_mixed_input_dtypes_compute_in_fp32():
    case = make_case([12, 9, 14, 7], 16, 45, seed=12)
    hidden = case.hidden.detach().bfloat16().requires_grad_()
    backend = CpuFused(parts=2, vocab_tile=8)
    out = linear_logprobs(hidden, case.weight, case.targets, case.cu_seqlens, impl=as_impl(backend))
    ref = naive_linear_logprobs(hidden.double(), case.weight.double(), case.targets, case.cu_seqlens)
    assert_close(out, ref, 2e-5, "logps")
    dh, dw = grads(out.sum(), [hidden, case.weight])
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.float32


def _run_kernels(case, parts):
    backend = CpuFused(parts=parts, row_tile=8, vocab_tile=16, store_bytes=2000)
    loss = _spin_loss(case, backend, {"bias": True, "softcap": 3.0})
    return [loss.detach()] + grads(loss, [case.hidden, case.weight, case.bias])


def test_results_are_bitwise_repeatable_and_independent_of_the_thread_count():
    case = make_case(random_lengths(4, 30, seed=13), 20, 150, bias=True, seed=14)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, again = _run_kernels(case, parts=3), _run_kernels(case, parts=3)
        torch.set_num_threads(1)
        serial = _run_kernels(case, parts=3)  # same parts, one thread: the same sums in the same order
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, serial):
        assert torch.equal(a, b) and torch.equal(a, c)
    for a, b in zip(first, _run_kernels(case, parts=1)):  # another split: the same up to rounding
        assert_close(a, b, 1e-5)


def _op_allocations(fn) -> int:
    """Bytes allocated by ATen while fn runs (the kernels' outputs and workspace)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::empty") and e.cpu_memory_usage > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_workspace_is_independent_of_rows_and_vocabulary(dtype):
    hidden_size, tiles = 24, (2, 16, 32)

    def workspace(rows, vocab):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(rows, hidden_size, generator=g).to(dtype)
        w = torch.randn(vocab, hidden_size, generator=g).to(dtype)
        y = torch.randint(0, vocab, (rows,), generator=g)
        lse, grad = torch.randn(rows), torch.randn(rows)
        dh, dw, db = torch.empty(rows, hidden_size), torch.zeros(vocab, hidden_size), torch.zeros(vocab)
        fwd = _op_allocations(lambda: OPS.rows_forward(h, w, None, y, 1.0, 0.0, None, *tiles))
        bwd = _op_allocations(lambda: OPS.rows_backward(h, w, None, y, lse, grad, 1.0, 0.0, None, *tiles, dh, dw, db))
        return fwd - 2 * 4 * rows, bwd  # the forward's own outputs: logp and lse, fp32 [rows]

    small = workspace(40, 300)
    assert small[0] > 0 and small[1] > 0
    assert workspace(400, 300) == small
    assert workspace(40, 3000) == small


def _kernel_args(**override):
    g = torch.Generator().manual_seed(0)
    args = dict(hidden=torch.randn(6, 8, generator=g), weight=torch.randn(20, 8, generator=g), bias=None,
                targets=torch.randint(0, 20, (6,), generator=g), temperature=1.0, softcap=0.0, store=None, parts=2,
                row_tile=4, vocab_tile=8, row_index=None)
    args.update(override)
    return args


def _backward_args(**override):
    args = _kernel_args()
    args.update(lse=torch.zeros(6), grad=torch.ones(6), dhidden=torch.empty(6, 8), dweight=torch.zeros(20, 8),
                dbias=None)
    args.update(override)
    return args


def _call_backward(a):
    OPS.rows_backward(a["hidden"], a["weight"], a["bias"], a["targets"], a["lse"], a["grad"], a["temperature"],
                      a["softcap"], a["store"], a["parts"], a["row_tile"], a["vocab_tile"], a["dhidden"],
                      a["dweight"], a["dbias"], a.get("row_index"))


@pytest.mark.parametrize("override, message", [
    (dict(targets=torch.tensor([0, 1, 2, 3, 4, 20])), r"targets must be in \[0, V=20\), got 20 at row 5"),
    (dict(targets=torch.tensor([0, 1, 2, 3, 4, -100])), r"targets must be in \[0, V=20\), got -100"),
    (dict(targets=torch.zeros(6, dtype=torch.int32)), "targets must be int64"),
    (dict(targets=torch.zeros(5, dtype=torch.int64)), r"targets must have shape \[M\] = \[hidden.size\(0\)\] = \[6\]"),
    (dict(weight=torch.randn(20, 9)), "weight must be \\[V, H\\] with H = hidden.size\\(1\\) = 8"),
    (dict(weight=torch.randn(8, 20).t()), "weight must be contiguous"),
    (dict(hidden=torch.randn(8, 6).t()), "hidden must be contiguous"),
    (dict(hidden=torch.randn(6, 8, dtype=torch.float64)), "hidden must be float32/bfloat16/float16"),
    (dict(bias=torch.randn(21)), r"bias must have shape \[V\] = \[20\]"),
    (dict(temperature=0.0), "temperature must be finite and > 0"),
    (dict(softcap=-1.0), "softcap must be finite and >= 0"),
    (dict(parts=0), "parts must be >= 1"),
    (dict(vocab_tile=0), "vocab_tile must be >= 1"),
    (dict(store=torch.zeros(120, dtype=torch.float64)), "store must be a contiguous 1-D float32"),
    (dict(store=torch.zeros(119)), r"store must hold the logits of all rows: M x V = 6 x 20 floats, got 119"),
    (dict(row_index=torch.tensor([0, 1, 2, 3, 4, 6])), r"row_index must be in \[0, hidden.size\(0\)=6\), got 6"),
    (dict(row_index=torch.tensor([0, 1, 2])), r"row_index must be a contiguous int64 CPU tensor of shape \[M\] = \[6\]"),
])
def test_kernel_checks_name_the_bad_argument(override, message):
    a = _kernel_args(**override)
    with pytest.raises(RuntimeError, match=message):
        OPS.rows_forward(*a.values())
    with pytest.raises(RuntimeError, match=message):
        _call_backward(_backward_args(**override))


@pytest.mark.parametrize("override, message", [
    (dict(lse=torch.zeros(5)), r"lse must have shape \[6\]"),
    (dict(grad=torch.ones(6, dtype=torch.float64)), "grad must be float32"),
    (dict(dhidden=torch.empty(6, 9)), r"dhidden must have shape \[6, 8\]"),
    (dict(dweight=torch.zeros(20, 8, dtype=torch.bfloat16)), "dweight must be a float32 CPU tensor"),
    (dict(dweight=torch.zeros(8, 20).t()), "dweight must be contiguous"),
    (dict(dbias=torch.zeros(19)), r"dbias must have shape \[20\]"),
])
def test_backward_checks_its_gradient_buffers(override, message):
    with pytest.raises(RuntimeError, match=message):
        _call_backward(_backward_args(**override))


def test_without_the_extension_cpu_is_a_clear_error_and_auto_falls_back():
    """A process where spin_kernels._C cannot be imported (as after an install without a compiler)."""
    code = """
import sys, warnings, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "spin_kernels._C":
            raise ImportError("simulated: not built")
sys.meta_path.insert(0, Block())
import torch
from spin_kernels import linear_logprobs
h, w = torch.randn(4, 3), torch.randn(5, 3)
y, cu = torch.tensor([1, 2, 3, -100]), torch.tensor([0, 4])
try:
    linear_logprobs(h, w, y, cu, impl="cpu")
except RuntimeError as exc:
    print("ERROR:", exc)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    linear_logprobs(h, w, y, cu, impl="auto")
print("WARNINGS:", len(caught), caught[0].message if caught else "")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ERROR: impl='cpu' is not available" in out.stdout and "spin_kernels._C" in out.stdout
    assert "WARNINGS: 1" in out.stdout and "falls back to impl='torch'" in out.stdout


# --------------------------------------------------------------------------- the machine's rule

cpu_rule_mod = pytest.importorskip("spin_kernels.ops.backends.cpu_rule")
RULES = [f"{engine}:{logits}" for engine in ("onednn", "blas") for logits in ("keep", "recompute")]


@pytest.fixture
def rule_env(monkeypatch, tmp_path):
    """SPIN_KERNELS_CPU_RULE and the cache dir under the test's control; no rule memoised."""
    monkeypatch.setenv(cpu_rule_mod.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(cpu_rule_mod.ENV_RULE, raising=False)  # conftest's "default"
    monkeypatch.setattr(cpu_rule_mod, "_RULES", {})
    return monkeypatch


@pytest.mark.parametrize("forced", RULES)
def test_each_forced_rule_runs_its_path_and_matches_float64(rule_env, forced):
    """SPIN_KERNELS_CPU_RULE forces each (engine, keep/recompute) pair; CpuFused() (what impl="cpu"
    and impl="auto" build) follows it, and every path matches the float64 reference forward and
    backward."""
    engine, logits = forced.split(":")
    if engine == "onednn" and cpu_backend.default_gemm() != "onednn":
        pytest.skip("this torch does not export oneDNN's matmul")
    rule_env.setenv(cpu_rule_mod.ENV_RULE, forced)
    backend = CpuFused(parts=2, row_tile=6, vocab_tile=16)
    assert backend.gemm == engine
    assert backend.store_bytes == (cpu_rule_mod.DEFAULT_STORE_BUDGET if logits == "keep" else 0)
    stores = []
    kernel_forward = backend._forward
    rule_env.setattr(backend, "_forward", lambda *a, **k: stores.append(a[5] if len(a) > 5 else k.get("store"))
                     or kernel_forward(*a, **k))
    case = make_case(random_lengths(4, 19, seed=21), 14, 57, bias=True, seed=22)
    options = {"bias": True, "softcap": 6.0}
    ref_case = case.float64()
    ref, _ = naive_linear_spin_loss(ref_case.hidden, ref_case.weight, case.targets, case.cu_seqlens,
                                    ref_case.ref_logps, beta=0.3, **_naive_kwargs(ref_case, options))
    _check_against_reference(case, _spin_loss(case, backend, options), ref_case, ref, 2e-5, 6e-5)
    assert stores and all((s is not None) == (logits == "keep") for s in stores)


def test_bad_rule_override_names_the_variable(rule_env):
    for bad in ("mkl:keep", "onednn", "blas:keep:lots"):
        rule_env.setenv(cpu_rule_mod.ENV_RULE, bad)
        with pytest.raises(ValueError, match=f"SPIN_KERNELS_CPU_RULE='{bad}'"):
            CpuFused().gemm
    rule_env.setenv(cpu_rule_mod.ENV_RULE, "blas:keep:96M")
    assert CpuFused().store_bytes == 96 * 2**20


def test_the_measured_rule_is_cached_and_reused(rule_env):
    """Measured once per key, written to the cache, read back by later processes (here: an
    emptied memo), measured again only when asked (``measure``), for another thread count, or
    when the file is unreadable."""
    calls = []

    def fake_measure(key):
        calls.append(key["threads"])
        return cpu_rule_mod.CpuRule("blas", len(calls) % 2 == 1, 123 << 20, "measured", key, {"n": len(calls)})

    rule_env.setattr(cpu_rule_mod, "measure_rule", fake_measure)
    first = cpu_rule_mod.cpu_rule(2)
    assert (first.source, first.gemm, first.keep_logits, first.store_budget) == ("measured", "blas", True, 123 << 20)
    assert first.path and os.path.exists(first.path) and calls == [2]
    rule_env.setattr(cpu_rule_mod, "_RULES", {})  # a new process
    again = cpu_rule_mod.cpu_rule(2)
    assert (again.source, again.keep_logits, again.measurements) == ("cache", True, {"n": 1}) and calls == [2]
    assert cpu_rule_mod.cpu_rule(1).source == "measured" and calls == [2, 1]  # another key
    rule_env.setenv(cpu_rule_mod.ENV_RULE, "measure")
    assert cpu_rule_mod.cpu_rule(2).keep_logits is True and calls == [2, 1, 2]  # measured anew (3rd call: keep)
    rule_env.setenv(cpu_rule_mod.ENV_RULE, "auto")
    rule_env.setattr(cpu_rule_mod, "_RULES", {})
    with open(first.path, "w") as fh:
        fh.write("{not json")
    assert cpu_rule_mod.cpu_rule(2).source == "measured" and calls == [2, 1, 2, 2]


def test_the_measurement_picks_the_faster_candidates(rule_env):
    """The real probe, shrunk: it times every engine this torch has and keep vs recompute, and
    the rule is the faster of each (by the minimum of the alternated repeats)."""
    for name, value in (("PROBE_ROWS", 64), ("PROBE_HIDDEN", 32), ("PROBE_VOCAB", 256)):
        rule_env.setattr(cpu_rule_mod, name, value)
    rule = cpu_rule_mod.measure_rule(cpu_rule_mod.machine_key())
    forward, spin = rule.measurements["forward_s"], rule.measurements["spin_fwd_bwd_s"]
    assert set(forward) == ({"onednn", "blas"} if cpu_backend.default_gemm() == "onednn" else {"blas"})
    assert all(len(t) == cpu_rule_mod.PROBE_REPEATS and min(t) > 0 for t in [*forward.values(), *spin.values()])
    assert min(forward[rule.gemm]) == min(min(t) for t in forward.values())
    assert rule.keep_logits == (min(spin["keep"]) <= min(spin["recompute"]))


def test_kept_logits_cost_the_largest_pair_not_the_budget():
    """cpu-small (4 pairs of 768 counted rows, V 32,000, row blocks of 512): each pair's logits
    are kept on their own, 93.75 MiB, well inside the 256 MiB budget; small pairs are grouped to
    at least two row blocks; a pair over the budget is recomputed."""
    from spin_kernels.ops.backends.cpu_backend import store_rows_for

    budget = cpu_rule_mod.DEFAULT_STORE_BUDGET
    rows = store_rows_for([768] * 4, budget, 32000, 512)
    assert rows == 1024 and pair_groups([0, 768, 1536, 2304, 3072], rows) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert 768 * 32000 * 4 == 93.75 * 2**20
    assert store_rows_for([40] * 10, budget, 32000, 512) == 1024  # ~25 pairs per group
    assert store_rows_for([3000, 40], budget, 128256, 512) == 523  # 256 MiB / (4 B * 128256): the 40 only
    assert store_rows_for([3000], budget, 128256, 512) == 0
    assert store_rows_for([768], 0, 32000, 512) == 0
