"""impl="triton": the fused kernels against the float64 naive reference and impl="torch".

Without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py
before anything imports Triton) on small odd shapes: N <= 64, H <= 24, V <= 131, so
that every size crosses block edges (interpreter blocks are 16 rows × 32 vocab × 16 hidden).
With a GPU the same tests run compiled on CUDA; the tests at the end need CUDA.
The interpreter is unreliable for bf16 (docs/anchors.md): bf16 runs on CUDA only.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from cases import (CUDA, DEVICE, IGNORE, OPTIONS, RTOL, assert_close, check_logprobs, grads, head_kwargs, make_case,
                   needs_cuda, on_device, random_lengths)

from spin_kernels import linear_logprobs, linear_spin_loss
from spin_kernels.ops import as_impl
from spin_kernels.ops.backends import resolve_backend
from spin_kernels.ops.backends.triton_backend import TritonBackend, filter_eps_for
from spin_kernels.ops.naive import naive_linear_logprobs, naive_linear_spin_loss
from spin_kernels.ops.options import LogprobsOptions, SpinOptions

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def test_triton_backend_is_resolved():
    assert resolve_backend("triton", DEVICE).name == "triton"


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_logprobs_matches_float64_reference(dtype, options):
    lengths = random_lengths(5, 23, seed=1) + [0, 1, 1, 0, 37]  # odd sizes, empty, single-token
    case = on_device(make_case(lengths, 19, 131, dtype=dtype, bias=options.get("bias", False), seed=2))
    check_logprobs(case, "triton", options, dtype)


def _spin(case, impl, beta, loss_type, options):
    return linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps, beta=beta,
                            loss_type=loss_type, impl=impl, **head_kwargs(case, options))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[-1]], ids=["plain", "all"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_spin_loss_matches_float64_reference_and_torch(dtype, options, loss_type):
    lengths = random_lengths(6, 29, seed=3) + [1, 0]
    case = on_device(make_case(lengths, 17, 97, dtype=dtype, bias=options.get("bias", False), seed=4))
    beta = 0.3 if loss_type == "sigmoid" else 0.01  # hinge: margins on both sides of the kink
    loss, metrics = _spin(case, "triton", beta, loss_type, options)
    torch_loss, torch_metrics = _spin(case, "torch", beta, loss_type, options)
    ref_case = case.float64()
    ref_loss, ref_metrics = naive_linear_spin_loss(
        ref_case.hidden, ref_case.weight, case.targets, case.cu_seqlens, ref_case.ref_logps, beta=beta,
        loss_type=loss_type, **head_kwargs(ref_case, options))
    rtol_out, rtol_grad = RTOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref_loss, rtol_out, "loss")
    assert_close(loss, torch_loss, rtol_out, "loss vs torch")
    for key in ref_metrics:
        assert_close(metrics[key], ref_metrics[key], 1e-4, key)
        assert_close(metrics[key], torch_metrics[key], 1e-4, f"{key} vs torch")
    inputs = [case.hidden, case.weight, case.bias]
    got = grads(loss * 1.7, inputs)
    via_torch = grads(torch_loss * 1.7, inputs)
    want = grads(ref_loss * 1.7, [ref_case.hidden, ref_case.weight, ref_case.bias])
    for name, g, t, w, x in zip(("hidden", "weight", "bias"), got, via_torch, want, inputs):
        if x is not None:
            assert g.dtype == x.dtype, f"d{name} dtype"
            assert_close(g, w, rtol_grad * 3, f"d{name}")
            assert_close(g, t, rtol_grad * 3, f"d{name} vs torch")


def test_forward_vocabulary_splits_agree():
    """The (row tile × vocab split) grid with its host-side merge gives the one-split result,
    including splits that end inside a block and a last split shorter than the others."""
    from spin_kernels.triton.forward import rows_logprobs

    g = torch.Generator().manual_seed(13)
    hidden = torch.randn(37, 21, generator=g).to(DEVICE)
    weight = torch.randn(131, 21, generator=g).to(DEVICE)
    targets = torch.randint(0, 131, (37,), generator=g).to(DEVICE)
    targets[:5] = torch.tensor([0, 130, 31, 32, 96])  # block and split edges
    ref = torch.log_softmax(hidden.double() @ weight.double().t(), dim=1)
    ref_logp, ref_lse = ref.gather(1, targets[:, None]).squeeze(1), torch.logsumexp(
        hidden.double() @ weight.double().t(), dim=1)
    for splits in (1, 2, 3, 5):
        logp, lse, _ = rows_logprobs(hidden, weight, None, targets, 1.0, None, splits=splits)
        assert_close(logp, ref_logp, 2e-6, f"logp, {splits} splits")
        assert_close(lse, ref_lse, 2e-6, f"lse, {splits} splits")


def test_all_ignored_and_empty_sequences():
    case = on_device(make_case([5, 3, 0, 8], 12, 50, all_ignored=True, bias=True))
    out = linear_logprobs(case.hidden, case.weight, case.targets, case.cu_seqlens, bias=case.bias, impl="triton")
    assert torch.equal(out, torch.zeros(4, device=DEVICE))
    for g in grads((out * torch.arange(1.0, 5.0, device=DEVICE)).sum(), [case.hidden, case.weight, case.bias]):
        assert torch.equal(g, torch.zeros_like(g))
    loss, _ = linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps,
                               bias=case.bias, impl="triton")
    margin = 0.1 * ((0 - case.ref_logps[0::2]) - (0 - case.ref_logps[1::2]))
    assert_close(loss, torch.nn.functional.softplus(-margin).mean(), 1e-6, "loss")
    empty = on_device(make_case([], 8, 40))
    assert linear_logprobs(empty.hidden, empty.weight, empty.targets, empty.cu_seqlens, impl="triton").shape == (0,)


def test_ignored_rows_get_exactly_zero_gradient():
    case = on_device(make_case([9, 12, 7, 10], 8, 40, seed=8))
    out = linear_logprobs(case.hidden, case.weight, case.targets, case.cu_seqlens, impl="triton")
    (dh,) = grads(out.sum(), [case.hidden])
    ignored = case.targets == IGNORE
    assert torch.equal(dh[ignored], torch.zeros_like(dh[ignored]))
    assert (dh[~ignored].abs().sum(1) > 0).all()


def test_non_contiguous_hidden_and_strided_weight_view():
    case = on_device(make_case([7, 5, 6, 8], 18, 45, seed=10))
    hidden = torch.randn(case.hidden.shape[0], 40, device=DEVICE)[:, 3:21]  # row stride 40
    embed = torch.randn(45, 36, device=DEVICE, requires_grad=True)
    weight = embed[:, ::2]  # column stride 2: a tied/sliced embedding view
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    out = linear_logprobs(hidden, weight, case.targets, case.cu_seqlens, impl="triton")
    e64 = embed.detach().double().requires_grad_()
    ref = naive_linear_logprobs(hidden.double(), e64[:, ::2], case.targets, case.cu_seqlens)
    assert_close(out, ref, 2e-5, "logps")
    (g_embed,) = grads(out.sum(), [embed])
    (g_ref,) = grads(ref.sum(), [e64])
    assert_close(g_embed, g_ref, 2e-5, "dembed")


def test_only_some_gradients_requested():
    case = on_device(make_case([6, 9, 4, 7], 16, 60, bias=True, seed=14))
    case.hidden.requires_grad_(False)
    out = linear_logprobs(case.hidden, case.weight, case.targets, case.cu_seqlens, bias=case.bias, impl="triton")
    dw, db = grads(out.sum(), [case.weight, case.bias])
    r = case.float64()
    ref = naive_linear_logprobs(r.hidden, r.weight, case.targets, case.cu_seqlens, bias=r.bias)
    rw, rb = grads(ref.sum(), [r.weight, r.bias])
    assert_close(dw, rw, 2e-5, "dweight")
    assert_close(db, rb, 2e-5, "dbias")


def test_repeated_runs_are_bitwise_identical():
    case = on_device(make_case([11, 8, 13, 6], 20, 70, bias=True, seed=15))
    runs = []
    for _ in range(2):
        loss, _ = linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps,
                                   bias=case.bias, softcap=5.0, impl="triton")
        runs.append([loss] + grads(loss, [case.hidden, case.weight, case.bias]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# Workspaces (interpreter tiles 16 rows × 32 columns, H = 24, fp32, 53 counted rows): 1 byte =
# one tile of rows and of columns per step; 6,000 = 16-row blocks with 64-column chunks; 30,000 =
# one block of every row, 96-column chunks (ragged last chunk, V = 131); 1 MiB = all at once.
@pytest.mark.parametrize("workspace", [1, 6_000, 30_000, 2**20])
def test_backward_in_row_blocks_and_vocabulary_chunks_matches_float64_reference(workspace):
    """The backward walks row blocks × vocabulary chunks (its workspace budget): small budgets
    cross block and chunk edges, ∂W is summed across blocks, ∂b across both."""
    from spin_kernels.triton.backward import workspace_shape
    from spin_kernels.triton.config import backward_tiles

    case = on_device(make_case(random_lengths(4, 19, seed=21) + [0, 1], 24, 131, bias=True, seed=22))
    counted = int((case.targets != IGNORE).sum())
    block, chunk = workspace_shape(counted, 131, 24, 4, *backward_tiles(DEVICE), workspace)
    assert counted > 16 and (block < counted) == (workspace < 30_000) and (chunk < 131) == (workspace < 2**20)
    r = case.float64()
    ref = naive_linear_logprobs(r.hidden, r.weight, case.targets, case.cu_seqlens, bias=r.bias, softcap=4.0)
    out = linear_logprobs(case.hidden, case.weight, case.targets, case.cu_seqlens, bias=case.bias, softcap=4.0,
                          impl=as_impl(TritonBackend(workspace_bytes=workspace)))
    upstream = torch.randn(out.shape, dtype=torch.float64, device=out.device)
    got = grads((out.double() * upstream).sum(), [case.hidden, case.weight, case.bias])
    want = grads((ref * upstream.to(ref.device)).sum(), [r.hidden, r.weight, r.bias])
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        assert_close(g, w, 2e-5, f"d{name}")


def test_workspace_shape_fits_the_budget():
    from spin_kernels.triton.backward import workspace_shape

    mib = 2**20
    # llama3-8b, 16k rows, bf16, the default 56 MiB: 1,792-row blocks (28 MiB of fp32 ∂h), 8,192 columns.
    assert workspace_shape(16384, 128256, 4096, 2, 128, 128, 56 * mib) == (1792, 8192)
    block, chunk = workspace_shape(16384, 128256, 4096, 2, 128, 128, 56 * mib)
    assert block * (4 * 4096 + 2 * chunk) <= 56 * mib
    # A batch whose ∂h fits half the budget is one block; the chunk takes the rest, <= V.
    assert workspace_shape(1000, 50_000, 64, 2, 128, 128, mib) == (1000, 384)
    assert workspace_shape(10, 300, 8, 4, 16, 128, 1 << 30) == (10, 384)
    # Nothing fits: one tile of rows and one of columns.
    assert workspace_shape(1000, 50_000, 4096, 2, 128, 128, 1) == (128, 128)
    # Without ∂h there are no blocks: G alone takes the budget.
    assert workspace_shape(1000, 50_000, 4096, 2, 128, 128, mib, need_hidden=False) == (1000, 512)


def _grads_with_filter(case, setting):
    out = linear_logprobs(case.hidden, case.weight, case.targets, case.cu_seqlens, bias=case.bias,
                          impl=as_impl(TritonBackend(grad_filter=setting)))
    return grads(out.sum(), [case.hidden, case.weight, case.bias])


def test_gradient_filter_skips_only_below_its_threshold():
    """"auto" (2⁻²⁸ for fp32) stays within the fp32 tolerance; a threshold of 2 exceeds every
    |onehot − softmax| (<= 1), so every matmul tile is skipped: ∂h = ∂W = 0 exactly, while ∂b,
    which is never filtered, stays exact."""
    case = on_device(make_case([13, 17, 11, 19], 16, 127, bias=True, seed=16, scale=3.0))
    r = case.float64()
    ref = naive_linear_logprobs(r.hidden, r.weight, case.targets, case.cu_seqlens, bias=r.bias)
    want = grads(ref.sum(), [r.hidden, r.weight, r.bias])
    for name, g, w in zip(("hidden", "weight", "bias"), _grads_with_filter(case, "auto"), want):
        assert_close(g, w, 2e-5, f"d{name}, auto filter")
    dh, dw, db = _grads_with_filter(case, 2.0)
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))
    assert_close(db, want[2], 2e-5, "dbias, everything filtered")


def test_bad_grad_filter_setting_names_itself():
    with pytest.raises(ValueError, match="grad filter"):
        TritonBackend(grad_filter=-1.0)
    assert filter_eps_for(torch.bfloat16, "auto") == 2.0**-12
    assert filter_eps_for(torch.float16, "off") == 0.0


def test_torch_compile_fullgraph_matches_eager():
    """The fused ops are custom ops: fullgraph compilation over a layer and the loss succeeds."""
    case = on_device(make_case([5, 7, 0, 9, 4, 6], 16, 40, bias=True, seed=3))
    layer = torch.nn.Linear(16, 16, device=DEVICE)

    def step(x, w, b):
        loss, metrics = linear_spin_loss(torch.tanh(layer(x)), w, case.targets, case.cu_seqlens, case.ref_logps,
                                         bias=b, softcap=3.0, impl="triton")
        logps = linear_logprobs(x, w, case.targets, case.cu_seqlens, average=True, impl="triton")
        return loss + 0.01 * logps.sum(), metrics["rewards/margin"]

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    inputs = [case.hidden, case.weight, case.bias, layer.weight]
    loss, margin = compiled(*inputs[:3])
    got = grads(loss, inputs)
    loss0, margin0 = step(*inputs[:3])
    want = grads(loss0, inputs)
    assert_close(loss, loss0, 1e-6, "loss")
    assert_close(margin, margin0, 1e-6, "margin")
    for name, g, w in zip(("hidden", "weight", "bias", "layer"), got, want):
        assert_close(g, w, 1e-5, f"d{name}")


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch with dynamic
    shapes of the three torch.library ops, on impl="triton". Their autograd is the Functions'
    (autograd.py), not the ops': the ops are checked on detached inputs."""
    from spin_kernels.ops import library

    case = on_device(make_case([5, 7, 0, 9], 16, 40, bias=True, seed=3))
    head = tuple(t.detach() for t in (case.hidden, case.weight, case.bias, case.targets, case.cu_seqlens))
    options = dict(ignore_index=IGNORE, temperature=0.9, softcap=3.0, average=False, impl="triton")
    needs = (True, True, True)
    checks = [
        (library.linear_logprobs_op, head + LogprobsOptions(**options, reduction="sum").scalars()),
        (library.linear_spin_loss_op, head + (case.ref_logps,) + SpinOptions(**options, beta=0.1).scalars() + needs),
    ]
    _, lse_tokens, _, entropy_tokens = library.linear_logprobs_op(*checks[0][1])
    grad_seq = torch.randn(4, device=DEVICE)
    checks.append((library.linear_logprobs_backward_op,
                   (grad_seq, grad_seq.new_empty(0)) + head + (lse_tokens, entropy_tokens)
                   + LogprobsOptions(**options, reduction="sum").scalars() + needs))
    for op, args in checks:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


# -- CUDA only: real sizes ------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_real_size_matches_torch(dtype):
    lengths = random_lengths(8, 700, seed=17)
    case = on_device(make_case(lengths, 1024, 32000, dtype=dtype, bias=False, seed=17))
    loss, _ = _spin(case, "triton", 0.1, "sigmoid", {})
    ref, _ = _spin(case, "torch", 0.1, "sigmoid", {})
    assert_close(loss, ref, 1e-4, "loss")
    got = grads(loss, [case.hidden, case.weight])
    want = grads(ref, [case.hidden, case.weight])
    for name, g, w in zip(("hidden", "weight"), got, want):
        assert_close(g, w, 2e-2 if dtype != torch.float32 else 1e-4, f"d{name}")


@needs_cuda
def test_cuda_offsets_past_2_to_31():
    """N·V > 2³¹ (and V·H row offsets past 2³¹ elements of a [V, H] weight slice) stay exact."""
    n, h, v = 17_000, 64, 128_256  # n·v = 2.18e9 > 2³¹
    g = torch.Generator(device="cuda").manual_seed(18)
    hidden = torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16)
    weight = (torch.randn(v, h, device="cuda", generator=g) / 4).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[-1] = v - 1
    cu = torch.tensor([0, n // 2, n], device="cuda", dtype=torch.int32)
    out = linear_logprobs(hidden, weight, targets, cu, impl="triton")
    ref = linear_logprobs(hidden, weight, targets, cu, impl="torch")
    assert_close(out, ref, 1e-5, "logps")


@needs_cuda
def test_cuda_repeated_runs_are_bitwise_identical_at_real_size():
    case = on_device(make_case(random_lengths(4, 900, seed=19), 2048, 50_000, dtype=torch.bfloat16, seed=19))
    runs = []
    for _ in range(3):
        loss, _ = _spin(case, "triton", 0.1, "sigmoid", {})
        runs.append([loss] + grads(loss, [case.hidden, case.weight]))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_kernels_compile_for_hopper_without_a_gpu():
    """What the interpreter cannot check: every kernel lowers to a cubin for sm90 with Triton's
    own ptxas, in a configuration that fits the card's shared memory (scripts/triton_compile_check.py,
    --quick; the full sweep over sm80/sm90, dtypes and configurations runs without --quick)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(root / "scripts" / "triton_compile_check.py"), "--quick"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 failed, 0 variants with no configuration that fits" in out.stdout


@needs_cuda
def test_cuda_backward_memory_is_its_outputs_plus_the_workspace():
    """The backward holds its outputs (dh, dW in the inputs' dtype) and its workspace; nothing
    of size [M, V], [M, H] in fp32 or [V, H] in fp32. 8k rows of H = 1024 need 32 MiB of fp32
    ∂h: a 16 MiB budget makes row blocks."""
    from spin_kernels.triton.backward import rows_grads

    m, h, v, budget = 8192, 1024, 32_000, 16 * 2**20
    g = torch.Generator(device="cuda").manual_seed(20)
    hidden = torch.randn(m, h, device="cuda", generator=g, dtype=torch.bfloat16)
    weight = (torch.randn(v, h, device="cuda", generator=g) / 8).to(torch.bfloat16)
    targets = torch.randint(0, v, (m,), device="cuda", generator=g)
    lse, grad = torch.full((m,), 12.0, device="cuda"), torch.ones(m, device="cuda")
    # Warm-up: the autotuner's trials happen on the first call.
    rows_grads(hidden, weight, None, targets, lse, grad, 1.0, None, True, True, False, workspace_bytes=budget)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    rows_grads(hidden, weight, None, targets, lse, grad, 1.0, None, True, True, False, workspace_bytes=budget)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    outputs = 2 * m * h + 2 * v * h
    assert extra <= outputs + budget + 2**20, (extra, outputs)


def test_autotune_can_be_cut_to_two_candidates(monkeypatch):
    from spin_kernels.triton.config import _FAMILIES, candidates

    for family in _FAMILIES:
        assert candidates(family, 9) == _FAMILIES[family][9]
    monkeypatch.setenv("SPIN_KERNELS_AUTOTUNE", "0")
    for family in _FAMILIES:
        for major in (8, 9):
            full = _FAMILIES[family][major]
            assert candidates(family, major) == [full[0], full[-1]]


@pytest.mark.skipif(CUDA, reason="the interpreter's stand-in for CUDA launches, which every CUDA test takes")
def test_autotuned_launch_runs_the_heuristics_with_absent_tensors(monkeypatch):
    """What ``launch`` runs on CUDA, autotune(heuristics(jit)) over the sm90 candidates, run in
    the interpreter: the autotuner tries each candidate through the kernels' heuristics, which
    derive HAS_BIAS, HAS_INDEX, FILTER and COMPUTE_DB from pointers given as None or as
    tensors, and the result is the plain launch's."""
    from spin_kernels.triton import backward, config, forward

    monkeypatch.setenv("SPIN_KERNELS_AUTOTUNE", "0")  # two candidates a family: still a choice to make
    trials = []

    def timer(kernel_call, quantiles):  # no GPU to time: each trial runs once, the first one wins
        kernel_call()
        trials.append(kernel_call)
        return [float(len(trials))] * len(quantiles)

    def tuned_launch(kernel, grid, *, device, family="head", reset_to_zero=(), restore_value=(), **args):
        tuned = config._tuned.__wrapped__(kernel, family, 9, reset_to_zero, restore_value)  # uncached
        tuned._do_bench = timer
        tuned[grid](**args)

    g = torch.Generator().manual_seed(21)
    hidden, weight = torch.randn(40, 24, generator=g), torch.randn(131, 24, generator=g) / 4
    bias, grad = torch.randn(131, generator=g), torch.randn(30, generator=g)
    index, targets = torch.randperm(40, generator=g)[:30], torch.randint(0, 131, (30,), generator=g)
    runs = {}
    for name, launch in (("plain", config.launch), ("tuned", tuned_launch)):
        monkeypatch.setattr(forward, "launch", launch)
        monkeypatch.setattr(backward, "launch", launch)
        runs[name] = []
        # Every optional tensor absent (softcap on), then every one given (softcap off).
        for b, idx, softcap, eps in ((None, None, 30.0, 0.0), (bias, index, None, 1e-3)):
            h = hidden if idx is not None else hidden[:30]
            logp, lse, _ = forward.rows_logprobs(h, weight, b, targets, 1.3, softcap, index=idx)
            runs[name] += [logp, lse, *backward.rows_grads(h, weight, b, targets, lse, grad, 1.3, softcap, True, True,
                                                          b is not None, filter_eps=eps, index=idx)]
    # Per combination, the forward and the three backward kernels each tried both candidates.
    assert len(trials) == 2 * 4 * 2
    for i, (got, want) in enumerate(zip(runs["tuned"], runs["plain"])):
        assert (got is None) == (want is None), i
        if want is not None:
            assert_close(got, want, 1e-5, f"output {i}")


def test_planner_knows_the_backward_workspace():
    from spin_kernels.memory.estimate import TRITON_WORKSPACE_BYTES
    from spin_kernels.triton.backward import DEFAULT_WORKSPACE_BYTES

    assert TRITON_WORKSPACE_BYTES == DEFAULT_WORKSPACE_BYTES
