"""The sync-free path: the padded row layout, ``count`` read on the device, ``check_values=False``.

On a GPU, finding the M counted rows (``nonzero``) and checking input values both read data
back to the host. impl="triton" avoids both: its kernels take every row, counted ones first, and
skip the rows past a device-side count; ``check_values=False`` skips the value checks. These
tests check that this layout computes the same thing as the exact one (kernels in the Triton
interpreter here, compiled on CUDA) and, on CUDA, that a whole fused SPIN step never synchronises.
"""

from __future__ import annotations

import pytest
import torch

from cases import (CUDA, DEVICE, IGNORE, assert_close, grads, impl_unavailable, make_case, needs_cuda, needs_impl,
                   on_device, random_lengths)

from spin_kernels import linear_logprobs, linear_spin_loss
from spin_kernels.ops.layout import CountedRows
from spin_kernels.ops.naive import naive_linear_spin_loss


@pytest.mark.parametrize("seed", range(5))
def test_padded_layout_is_a_permutation_with_counted_rows_first(seed):
    lengths = [9, 0, 13, 1, 7, 6] if seed == 0 else random_lengths(4, 17, seed=seed)
    case = make_case(lengths, 4, 10, seed=seed, prompt_frac=0.2 * seed)
    exact = CountedRows.build(case.targets, case.cu_seqlens, IGNORE)
    padded = CountedRows.build(case.targets, case.cu_seqlens, IGNORE, padded=True)
    m, n = exact.num_rows, case.targets.shape[0]
    assert exact.count is None and padded.num_rows == n
    assert padded.count.dtype == torch.int32 and padded.count.tolist() == [m]
    assert torch.equal(padded.index.sort().values, torch.arange(n))
    assert torch.equal(padded.index[:m], exact.index)
    assert torch.equal(padded.targets[:m], exact.targets) and torch.equal(padded.seq[:m], exact.seq)
    assert (padded.targets[m:] == IGNORE).all()
    assert torch.equal(padded.offsets, exact.offsets) and torch.equal(padded.counts, exact.counts)


def test_padded_layout_of_unchecked_garbage_stays_in_range():
    """check_values=False hands the layout whatever it is given: indices are clamped, not trusted."""
    targets = torch.tensor([3, IGNORE, 5, 7, IGNORE])
    for cu in ([0, 9, 2, -4, 5], [0, 2, 3, 3, 3], [5, 0, 1, 2, 7]):
        rows = CountedRows.build(targets, torch.tensor(cu), IGNORE, padded=True)
        s = len(cu) - 1
        assert int(rows.seq.min()) >= 0 and int(rows.seq.max()) < s
        assert int(rows.offsets.min()) >= 0 and int(rows.offsets.max()) <= 3
        rows.seq_logps(torch.ones(rows.num_rows), average=True)  # indexes only in range
        rows.row_grads(torch.ones(s), average=True)


@pytest.mark.skipif(CUDA, reason="the interpreter's comparison; CUDA runs the test below")
@needs_impl("triton")
@pytest.mark.parametrize("workspace", [2**20, 1], ids=["one-block", "16-row-blocks"])
def test_triton_kernels_padded_equal_exact_in_the_interpreter(workspace):
    """Padded and exact layouts through the kernels; with 16-row blocks the padded layout has
    blocks with no live row at all (30 counted rows of 71)."""
    from spin_kernels.triton.backward import rows_grads
    from spin_kernels.triton.forward import rows_logprobs

    case = make_case([12, 0, 23, 1, 17, 9], 20, 70, bias=True, seed=4, prompt_frac=0.5)
    exact = CountedRows.build(case.targets, case.cu_seqlens, IGNORE)
    padded = CountedRows.build(case.targets, case.cu_seqlens, IGNORE, padded=True)
    h, w, b = case.hidden.detach(), case.weight.detach(), case.bias.detach()
    m = exact.num_rows
    assert 16 < m < h.shape[0] - 32
    logp_e, lse_e, _ = rows_logprobs(h, w, b, exact.targets, 1.3, 4.0, index=exact.index)
    logp_p, lse_p, _ = rows_logprobs(h, w, b, padded.targets, 1.3, 4.0, index=padded.index, count=padded.count)
    # Same row tiles over the counted rows: bitwise equal; padding rows are exactly 0.
    assert torch.equal(logp_p[:m], logp_e) and torch.equal(lse_p[:m], lse_e)
    assert torch.equal(logp_p[m:], torch.zeros(h.shape[0] - m)) and torch.equal(lse_p[m:], lse_p[m:] * 0)
    g = torch.randn(h.shape[0])
    grads_e = rows_grads(h, w, b, exact.targets, lse_e, g[:m], 1.3, 4.0, True, True, True, index=exact.index,
                         workspace_bytes=workspace)
    grads_p = rows_grads(h, w, b, padded.targets, lse_p, g, 1.3, 4.0, True, True, True, index=padded.index,
                         count=padded.count, workspace_bytes=workspace)
    for name, got, want in zip(("dhidden", "dweight", "dbias"), grads_p, grads_e):
        assert_close(got, want, 1e-6, name)
    ignored = case.targets == IGNORE
    assert torch.equal(grads_p[0][ignored], torch.zeros_like(grads_p[0][ignored]))


@pytest.mark.parametrize("path", ["torch", "cpu", "triton"])
def test_unchecked_values_give_the_checked_result_on_good_input(path):
    why = impl_unavailable(path, DEVICE)
    if why:
        pytest.skip(why)
    impl = path
    case = on_device(make_case([11, 8, 0, 14, 6, 9], 16, 50, bias=True, seed=6))
    results = []
    for check in (True, False):
        loss, metrics = linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps,
                                         bias=case.bias, impl=impl, check_values=check)
        logps = linear_logprobs(case.hidden, case.weight, case.targets, case.cu_seqlens, bias=case.bias, impl=impl,
                                check_values=check)
        results.append([loss, logps, *grads(loss + logps.sum(), [case.hidden, case.weight, case.bias])])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_impl("triton")
def test_unchecked_bad_values_on_triton_give_numbers_not_memory_errors():
    """Targets are only compared inside the kernels and indices are clamped: out-of-range
    targets and a malformed cu_seqlens produce (meaningless) finite numbers."""
    case = on_device(make_case([7, 9, 5, 6], 16, 40, seed=7))
    targets = case.targets.clone()
    targets[2], targets[9] = 40, -7  # past V, negative (not ignore_index)
    cu = torch.tensor([0, 20, 3, 30, 27], dtype=torch.int32, device=DEVICE)
    for t, c in ((targets, case.cu_seqlens), (case.targets, cu), (targets, cu)):
        with pytest.raises(ValueError):
            linear_spin_loss(case.hidden, case.weight, t, c, case.ref_logps, impl="triton")
        loss, _ = linear_spin_loss(case.hidden, case.weight, t, c, case.ref_logps, impl="triton", check_values=False)
        dh, dw = grads(loss, [case.hidden, case.weight])
        assert torch.isfinite(loss) and torch.isfinite(dh).all() and torch.isfinite(dw).all()


def test_check_values_must_be_a_bool():
    case = make_case([3, 4], 8, 20)
    with pytest.raises(TypeError, match="check_values"):
        linear_logprobs(case.hidden, case.weight, case.targets, case.cu_seqlens, impl="torch", check_values=1)


def test_no_sequence_but_rows_is_a_shape_error_even_unchecked():
    case = make_case([3, 4], 8, 20)
    with pytest.raises(ValueError, match="no sequence"):
        linear_logprobs(case.hidden, case.weight, case.targets, torch.zeros(1, dtype=torch.int32), impl="torch",
                        check_values=False)


@needs_cuda
@needs_impl("triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_fused_spin_step_never_synchronises(dtype):
    """linear_spin_loss(impl="triton", check_values=False) forward + backward under
    torch.cuda.set_sync_debug_mode("error"): any host synchronisation raises."""
    case = on_device(make_case([300, 0, 517, 1, 260, 411], 256, 5000, dtype=dtype, bias=True, seed=9))
    args = (case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps)

    def step():
        loss, metrics = linear_spin_loss(*args, bias=case.bias, impl="triton", check_values=False)
        loss.backward()
        return loss, metrics

    step()  # autotuning benchmarks (and synchronises) on the first call
    torch.cuda.synchronize()
    for t in (case.hidden, case.weight, case.bias):
        t.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, metrics = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref, _ = naive_linear_spin_loss(case.float64().hidden, case.float64().weight, case.targets, case.cu_seqlens,
                                    case.ref_logps, bias=case.float64().bias)
    assert_close(loss, ref, 1e-3 if dtype != torch.float32 else 1e-5, "loss")
