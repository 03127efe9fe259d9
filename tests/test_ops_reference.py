"""Every CPU impl of the fused ops against the float64 naive reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

from cases import IGNORE, OPTIONS, RTOL, assert_close, check_logprobs, grads, head_kwargs, make_case, random_lengths
from spin_kernels import LinearSPINLoss, linear_logprobs, linear_spin_loss, spin_loss
from spin_kernels.ops.naive import naive_linear_logprobs, naive_linear_spin_loss


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_logprobs_matches_float64_reference(impl, dtype, options):
    lengths = random_lengths(5, 23, seed=1) + [0, 1, 1, 0, 37]  # odd sizes, empty, single-token
    case = make_case(lengths, 19, 131, dtype=dtype, bias=options.get("bias", False), seed=2)
    check_logprobs(case, impl, options, dtype)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_spin_loss_matches_float64_reference(impl, dtype, options, loss_type):
    lengths = random_lengths(6, 29, seed=3) + [1, 0]
    case = make_case(lengths, 17, 97, dtype=dtype, bias=options.get("bias", False), seed=4)
    beta = 0.3 if loss_type == "sigmoid" else 0.01  # hinge: keep margins around the kink's both sides
    loss, metrics = linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps,
                                     beta=beta, loss_type=loss_type, impl=impl, **head_kwargs(case, options))
    ref_case = case.float64()
    ref_loss, ref_metrics = naive_linear_spin_loss(
        ref_case.hidden, ref_case.weight, case.targets, case.cu_seqlens, ref_case.ref_logps, beta=beta,
        loss_type=loss_type, **head_kwargs(ref_case, options))
    rtol_out, rtol_grad = RTOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref_loss, rtol_out, "loss")
    assert set(metrics) == set(ref_metrics)
    for key in metrics:
        assert not metrics[key].requires_grad
        assert_close(metrics[key], ref_metrics[key], 1e-4, key)
    got = grads(loss * 1.7, [case.hidden, case.weight, case.bias])
    want = grads(ref_loss * 1.7, [ref_case.hidden, ref_case.weight, ref_case.bias])
    for name, g, w, x in zip(("hidden", "weight", "bias"), got, want, (case.hidden, case.weight, case.bias)):
        if x is not None:
            assert_close(g, w, rtol_grad * 3, f"d{name}")


def test_float64_inputs_give_float64_results(impl):
    if impl != "torch":
        pytest.skip("float64 is the torch path's (gradcheck) precision")
    case = make_case([4, 7, 0, 9], 6, 11, dtype=torch.float64, bias=True, seed=5)
    check_logprobs(case, impl, {"bias": True, "softcap": 3.0}, torch.float64)


def test_gradcheck_linear_logprobs():
    case = make_case([3, 0, 5, 1, 4], 5, 7, dtype=torch.float64, bias=True, seed=6)
    fn = lambda h, w, b: linear_logprobs(h, w, case.targets, case.cu_seqlens, bias=b, temperature=0.8,  # noqa: E731
                                         softcap=2.0, average=True, impl="torch")
    assert torch.autograd.gradcheck(fn, (case.hidden, case.weight, case.bias))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_gradcheck_linear_spin_loss(loss_type):
    case = make_case([3, 4, 5, 2], 5, 7, dtype=torch.float64, bias=True, seed=7)
    ref = case.ref_logps.double()

    def fn(h, w, b):
        return linear_spin_loss(h, w, case.targets, case.cu_seqlens, ref, bias=b, beta=0.2, loss_type=loss_type,
                                softcap=3.0, impl="torch")[0]

    assert torch.autograd.gradcheck(fn, (case.hidden, case.weight, case.bias))


def test_all_ignored_targets_give_zero_logps_and_zero_grads(impl):
    case = make_case([5, 3, 0, 8], 12, 50, all_ignored=True, bias=True)
    out = linear_logprobs(case.hidden, case.weight, case.targets, case.cu_seqlens, bias=case.bias, impl=impl)
    assert torch.equal(out, torch.zeros(4))
    for g in grads((out * torch.arange(1.0, 5.0)).sum(), [case.hidden, case.weight, case.bias]):
        assert torch.equal(g, torch.zeros_like(g))
    loss, metrics = linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps,
                                     bias=case.bias, impl=impl)
    ref = case.ref_logps
    margin = 0.1 * ((0 - ref[0::2]) - (0 - ref[1::2]))
    assert_close(loss, torch.nn.functional.softplus(-margin).mean(), 1e-6, "loss")
    for g in grads(loss, [case.hidden, case.weight, case.bias]):
        assert torch.equal(g, torch.zeros_like(g))


def test_ignored_rows_get_exactly_zero_gradient(impl):
    case = make_case([9, 12, 7, 10], 8, 40, seed=8)
    out = linear_logprobs(case.hidden, case.weight, case.targets, case.cu_seqlens, impl=impl)
    (dh,) = grads(out.sum(), [case.hidden])
    ignored = case.targets == IGNORE
    assert torch.equal(dh[ignored], torch.zeros_like(dh[ignored]))
    assert (dh[~ignored].abs().sum(1) > 0).all()


def test_no_sequences_and_no_rows(impl):
    case = make_case([], 8, 40)
    out = linear_logprobs(case.hidden, case.weight, case.targets, case.cu_seqlens, impl=impl)
    assert out.shape == (0,)
    loss, metrics = linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens,
                                     torch.zeros(0), impl=impl)
    assert loss.item() == 0.0 and metrics["rewards/accuracy"].item() == 0.0


def test_int64_cu_seqlens_and_int32_targets(impl):
    case = make_case([6, 4, 9, 3], 8, 33, cu_dtype=torch.int64, seed=9)
    a = linear_logprobs(case.hidden, case.weight, case.targets.int(), case.cu_seqlens, impl=impl)
    b = naive_linear_logprobs(case.hidden.double(), case.weight.double(), case.targets, case.cu_seqlens)
    assert_close(a, b, 2e-5, "logps")


def test_non_contiguous_hidden_and_tied_weight_view(impl):
    case = make_case([7, 5, 6, 8], 10, 45, seed=10)
    wide = torch.randn(case.hidden.shape[0], 25)
    hidden = wide[:, 3:13]  # non-contiguous rows
    hidden.requires_grad_(False)
    embed = torch.randn(45, 20, requires_grad=True)
    weight = embed[:, ::2]  # a strided view, as a tied/sliced embedding can be
    out = linear_logprobs(hidden, weight, case.targets, case.cu_seqlens, impl=impl)
    ref = naive_linear_logprobs(hidden.double(), weight.double(), case.targets, case.cu_seqlens)
    assert_close(out, ref, 2e-5, "logps")
    (g_embed,) = grads(out.sum(), [embed])
    e64 = embed.detach().double().requires_grad_()
    (g_ref,) = grads(naive_linear_logprobs(hidden.double(), e64[:, ::2], case.targets, case.cu_seqlens).sum(), [e64])
    assert_close(g_embed, g_ref, 2e-5, "dembed")


def test_spin_loss_formulas_and_metrics():
    pr, ps = torch.tensor([-10.0, -20.0, -5.0], requires_grad=True), torch.tensor([-12.0, -15.0, -5.0])
    rr, rs = torch.tensor([-11.0, -19.0, -6.0]), torch.tensor([-11.0, -19.0, -6.0])
    loss, m = spin_loss(pr, ps, rr, rs, beta=0.5)
    margin = 0.5 * ((pr - rr) - (ps - rs))
    assert torch.allclose(loss, torch.log1p(torch.exp(-margin)).mean())
    assert torch.allclose(m["rewards/margin"], margin.mean())
    assert m["rewards/accuracy"].item() == pytest.approx(1 / 3)  # margins 1, -2.5, 0
    assert m["logps/real"].item() == pytest.approx(pr.mean().item())
    loss.backward()
    assert torch.allclose(pr.grad, -0.5 * torch.sigmoid(-margin.detach()) / 3)
    hinge, _ = spin_loss(pr, ps, rr, rs, beta=0.5, loss_type="hinge")
    assert torch.allclose(hinge, torch.relu(1 - margin).mean())


def test_module_form_matches_function(impl):
    case = make_case([5, 6, 7, 3], 9, 30, seed=11)
    module = LinearSPINLoss(beta=0.2, loss_type="hinge", softcap=5.0, impl=impl)
    a, _ = module(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps)
    b, _ = naive_linear_spin_loss(case.hidden.double(), case.weight.double(), case.targets, case.cu_seqlens,
                                  case.ref_logps.double(), beta=0.2, loss_type="hinge", softcap=5.0)
    assert_close(a, b, 2e-5, "loss")
    assert "hinge" in repr(module)


def test_no_grad_forward_matches_grad_forward(impl):
    case = make_case([5, 6, 7, 3], 9, 30, seed=12)
    with torch.no_grad():
        a, ma = linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps, impl=impl)
    b, mb = linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps, impl=impl)
    assert b.requires_grad and not a.requires_grad
    assert_close(a, b, 1e-6, "loss")


def test_no_grad_forward_computes_no_gradients(impl, monkeypatch):
    """Under no_grad the SPIN op asks its backend for the forward only (2·N·H·V flops), not for
    the gradients it computes in the forward when a backward will come."""
    from spin_kernels.ops.backends import resolve_backend

    backend_type = type(resolve_backend(impl, torch.device("cpu")))
    calls = []
    fused = backend_type.spin_forward_backward
    monkeypatch.setattr(backend_type, "spin_forward_backward", lambda self, *a: calls.append(1) or fused(self, *a))
    case = make_case([5, 6, 7, 3], 9, 30, bias=True, seed=12)
    args = (case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps)
    with torch.no_grad():
        linear_spin_loss(*args, bias=case.bias, impl=impl)
    assert calls == []
    linear_spin_loss(*args, bias=case.bias, impl=impl)
    assert calls == [1]


def test_spin_backward_hands_over_its_gradients_scaled_in_place(impl):
    """The SPIN op's gradients, computed in the forward, reach .grad scaled in place (no second
    [V, H] copy); a second backward through the same graph is refused, not scaled twice."""
    case = make_case([5, 6, 7, 3], 9, 30, seed=13)
    loss, _ = linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps, impl=impl)
    (want,) = grads(loss, [case.weight])
    loss, _ = linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps, impl=impl)
    (loss * 2.5).backward(retain_graph=True)
    assert_close(case.weight.grad, want * 2.5, 1e-6, "dweight")
    with pytest.raises(RuntimeError, match="inplace"):
        (loss * 2.5).backward()
