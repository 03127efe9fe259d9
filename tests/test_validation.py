"""Bad input is rejected before any kernel runs, with an error naming the argument."""

from __future__ import annotations

import re

import pytest
import torch

from cases import make_case
from spin_kernels import LinearSPINLoss, linear_logprobs, linear_spin_loss, spin_loss


@pytest.fixture
def case():
    return make_case([4, 5, 3, 6], 8, 20, bias=True)


def _call(case, **overrides):
    args = dict(hidden=case.hidden, weight=case.weight, targets=case.targets, cu_seqlens=case.cu_seqlens,
                ref_logps=case.ref_logps, bias=case.bias)
    args.update(overrides)
    return linear_spin_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"), args.pop("cu_seqlens"),
                            args.pop("ref_logps"), **args)


BAD = [
    ("hidden", dict(hidden=torch.randn(18, 8, 1)), ValueError, "hidden must be 2-D"),
    ("hidden dtype", dict(hidden=torch.randint(0, 3, (18, 8))), TypeError, "hidden must be float"),
    ("hidden type", dict(hidden=[[0.0] * 8] * 18), TypeError, "hidden must be a torch.Tensor"),
    ("weight", dict(weight=torch.randn(20)), ValueError, "weight must be 2-D"),
    ("weight width", dict(weight=torch.randn(20, 7)), ValueError, "H = hidden.shape[1] = 8"),
    ("weight empty", dict(weight=torch.randn(0, 8), bias=None), ValueError, "V >= 1"),
    ("weight dtype", dict(weight=torch.ones(20, 8, dtype=torch.int64)), TypeError, "weight must be float"),
    ("targets dtype", dict(targets=torch.zeros(18)), TypeError, "targets must be an int32/int64"),
    ("targets length", dict(targets=torch.zeros(17, dtype=torch.long)), ValueError, "targets must be 1-D of length N"),
    ("targets 2-D", dict(targets=torch.zeros(18, 1, dtype=torch.long)), ValueError, "targets must be 1-D"),
    ("target too large", dict(targets=torch.full((18,), 20)), ValueError, "targets must be in [0, V=20)"),
    ("target negative", dict(targets=torch.full((18,), -3)), ValueError, "found [-3"),
    ("cu dtype", dict(cu_seqlens=torch.tensor([0.0, 18.0])), TypeError, "cu_seqlens must be an int32/int64"),
    ("cu 2-D", dict(cu_seqlens=torch.zeros(2, 3, dtype=torch.int32)), ValueError, "cu_seqlens must be 1-D"),
    ("cu empty", dict(cu_seqlens=torch.zeros(0, dtype=torch.int32)), ValueError, "cu_seqlens must be 1-D [S+1]"),
    ("cu start", dict(cu_seqlens=torch.tensor([1, 4, 9, 12, 18])), ValueError, "cu_seqlens must start at 0"),
    ("cu end", dict(cu_seqlens=torch.tensor([0, 4, 9, 12, 17])), ValueError, "cu_seqlens must end at N"),
    ("cu order", dict(cu_seqlens=torch.tensor([0, 9, 4, 12, 18])), ValueError, "non-decreasing"),
    ("odd S", dict(cu_seqlens=torch.tensor([0, 4, 9, 18]), ref_logps=torch.zeros(3)), ValueError, "even number"),
    ("ref shape", dict(ref_logps=torch.zeros(3)), ValueError, "ref_logps must have shape [S] = [4]"),
    ("ref dtype", dict(ref_logps=torch.zeros(4, dtype=torch.long)), TypeError, "ref_logps must be a floating"),
    ("bias shape", dict(bias=torch.zeros(19)), ValueError, "bias must have shape [V] = [20]"),
    ("bias dtype", dict(bias=torch.zeros(20, dtype=torch.long)), TypeError, "bias must be a floating"),
    ("beta", dict(beta=0.0), ValueError, "beta must be a finite number > 0"),
    ("beta nan", dict(beta=float("nan")), ValueError, "beta must be"),
    ("beta type", dict(beta="0.1"), TypeError, "beta must be a float"),
    ("loss type", dict(loss_type="ipo"), ValueError, "loss_type must be one of"),
    ("impl", dict(impl="cuda"), ValueError, "impl must be one of"),
    ("temperature", dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    ("softcap", dict(softcap=-1.0), ValueError, "softcap must be None or a finite number > 0"),
    ("average", dict(average=1), TypeError, "average must be a bool"),
    ("ignore_index", dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
]


@pytest.mark.parametrize("name,overrides,exc,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_rejected_with_a_clear_error(case, name, overrides, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        _call(case, **overrides)


def test_linear_logprobs_validates_too(case):
    with pytest.raises(ValueError, match="cu_seqlens must end at N"):
        linear_logprobs(case.hidden, case.weight, case.targets, torch.tensor([0, 5]))
    # an odd number of sequences is fine for log-probs (no pairs involved)
    out = linear_logprobs(case.hidden, case.weight, case.targets, torch.tensor([0, 5, 18]))
    assert out.shape == (2,)


def test_devices_must_match(case):
    meta = torch.empty(20, 8, device="meta")
    with pytest.raises(ValueError, match="weight is on meta but hidden is on cpu"):
        _call(case, weight=meta)


def test_unavailable_impl_is_a_clear_error(case, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # conftest enables it for the triton tests
    with pytest.raises((RuntimeError, ValueError), match="impl='triton'"):
        _call(case, impl="triton")


def test_module_validates_options_at_construction():
    with pytest.raises(ValueError, match="loss_type"):
        LinearSPINLoss(loss_type="dpo")
    with pytest.raises(ValueError, match="beta"):
        LinearSPINLoss(beta=-1.0)


def test_spin_loss_validates_shapes():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="ref_synthetic_logps must be 1-D of the same shape"):
        spin_loss(a, a, a, torch.zeros(4))
    with pytest.raises(TypeError, match="policy_real_logps must be a floating"):
        spin_loss(torch.zeros(3, dtype=torch.long), a, a, a)
