"""Issue 27's op parts, every impl (triton in its interpreter), against float64 full logits:

* TRL's metrics without logits: the per-row entropy, mean logit and top-1 hit computed in the
  fused pass (``linear_spin_loss(token_metrics=True)``, ``RowLogprobs.stats``), off by default;
* per-token outputs for RL: ``linear_logprobs(reduction="none", return_entropy=True)``, forward
  and backward (the entropy differentiated too);
* the ``[B, T, H]`` entry points with a mask and ``shift``, and the pair layout they take;
* the GRPO example of docs/integrations.md, run as written there.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cases import IGNORE, assert_close, cpu_kernels, grads, make_case, random_lengths
from spin_kernels.ops import (
    as_impl,
    batched_linear_logprobs,
    batched_linear_spin_loss,
    linear_logprobs,
    linear_spin_loss,
)
from spin_kernels.ops.naive import naive_row_stats

KERNELS = cpu_kernels()
# Triton's interpreter computes bf16 tl.dot wrongly (docs/anchors.md): fp32 and fp16 there.
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEADS = [{}, {"bias": True, "temperature": 0.7}, {"bias": True, "temperature": 1.3, "softcap": 4.0}]
# Gradient tolerance by input dtype (gradients are returned rounded to it).
GRAD_RTOL = {torch.float32: 3e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _skip_unsupported(kernel, dtype):
    if kernel == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bf16 tl.dot is wrong; bf16 runs on CUDA")


def _case(dtype, options, seed, lengths=None):
    lengths = lengths if lengths is not None else random_lengths(5, 23, seed=seed) + [0, 1, 1, 0, 37, 2]
    return make_case(lengths, 19, 131, dtype=dtype, bias=options.get("bias", False), seed=seed + 1)


def _kw(case, options):
    return dict(bias=case.bias, **{k: v for k, v in options.items() if k != "bias"})


def _reference_rows(case, options):
    """float64 copies of the case's leaves and their per-row statistics (naive_row_stats)."""
    r = case.float64()
    return r, naive_row_stats(r.hidden, r.weight, r.targets, **_kw(r, options))


def _per_sequence(values, cu_seqlens, counted, mean=False):
    cu = cu_seqlens.tolist()
    sums = torch.stack([values[a:b].sum() for a, b in zip(cu, cu[1:])]) if len(cu) > 1 else values.new_zeros(0)
    if mean:
        counts = torch.stack([counted[a:b].sum() for a, b in zip(cu, cu[1:])]).clamp(min=1).to(values.dtype)
        sums = sums / counts
    return sums


# -- per-row statistics and TRL's metrics ------------------------------------------------------------


def _reference_token_metrics(stats, targets, cu_seqlens):
    """TRL's DPOTrainer token metrics (trl/trainer/dpo_trainer.py, 1.16) on interleaved pairs:
    entropy over the completion tokens of both responses; the mean logits per kind; top-1
    accuracy of the chosen (real) responses; all token-weighted."""
    counted = (targets != IGNORE).double()
    cu = cu_seqlens.tolist()
    kind = torch.zeros_like(counted)
    for s, (a, b) in enumerate(zip(cu, cu[1:])):
        kind[a:b] = s % 2  # 0 real, 1 synthetic
    real, synthetic = counted * (1 - kind), counted * kind

    def mean(values, weights):
        return (values * weights).sum() / weights.sum() if weights.sum() > 0 else values.new_zeros(())

    return {"entropy": mean(stats["entropy"], counted), "logits/real": mean(stats["mean_logit"], real),
            "logits/synthetic": mean(stats["mean_logit"], synthetic), "token_accuracy/real": mean(stats["top1"], real),
            "token_accuracy/synthetic": mean(stats["top1"], synthetic), "tokens/real": real.sum(),
            "tokens/synthetic": synthetic.sum()}


@pytest.mark.parametrize("options", HEADS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_token_metrics_match_full_logits(kernel, dtype, options):
    _skip_unsupported(kernel, dtype)
    case = _case(dtype, options, seed=40)
    loss, metrics = linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps,
                                     beta=0.2, token_metrics=True, impl=kernel, **_kw(case, options))
    r, stats = _reference_rows(case, options)
    want = _reference_token_metrics(stats, r.targets, r.cu_seqlens)
    for key, value in want.items():
        assert metrics[key].dtype == torch.float32 and not metrics[key].requires_grad, key
        assert_close(metrics[key], value, 1e-5, key)
    # The loss, its gradients and the other metrics are those without the token metrics.
    plain_loss, plain = linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps,
                                         beta=0.2, impl=kernel, **_kw(case, options))
    assert set(metrics) - set(plain) == set(want)
    assert torch.equal(loss, plain_loss)
    for got, base in zip(grads(loss, [case.hidden, case.weight]), grads(plain_loss, [case.hidden, case.weight])):
        assert torch.equal(got, base)


def _top1_case():
    """Integer-valued inputs (every logit exact, whatever the summation order): tokens 10 and 70
    tie at the top (z = 64) of the rows of kind A; token 40 is the unique top (z = 96) of the
    rows of kind B (odd rows). Targets cycle so that kind A meets 10 (a hit: tied with a later
    token), 70 (a miss: tied with an earlier one) and 40, kind B meets 40 (a hit) and 70."""
    g = torch.Generator().manual_seed(41)
    v, h, n = 100, 8, 32
    weight = torch.randint(-1, 2, (v, h), generator=g).float()
    weight[10] = weight[70] = torch.full((h,), 2.0)
    weight[40] = torch.full((h,), 3.0)
    weight[40, 4:] = -3.0
    hidden = torch.full((n, h), 4.0)
    hidden[1::2, 4:] = -4.0  # kind B: z_40 = 96, z_10 = z_70 = 0
    targets = torch.tensor([10, 70, 40, 7, 70, 40, 10, 7] * (n // 8))
    targets[:3] = IGNORE
    return hidden.requires_grad_(), weight, targets, torch.tensor([0, 8, 16, 24, 32])


@pytest.mark.parametrize("kernel", KERNELS)
def test_top1_follows_argmax_ties_and_empty_batches(kernel):
    """argmax = the first maximal index (torch.argmax, as TRL counts it): a target tied at the top
    with an earlier token is a miss, with a later one a hit, across vocabulary tiles and parts
    (the C++ kernel with 8-column tiles in 3 parts too). All-ignored rows and no rows at all
    give 0, not NaN."""
    hidden, weight, targets, cu = _top1_case()
    stats = naive_row_stats(hidden.double(), weight.double(), targets)
    counted = targets != IGNORE
    kinds = ["A" if r % 2 == 0 else "B" for r in range(32)]
    hits = [float((k, t) in (("A", 10), ("B", 40))) for k, t in zip(kinds, targets.tolist())]
    assert stats["top1"][counted].tolist() == [h for h, c in zip(hits, counted.tolist()) if c]
    want = _reference_token_metrics(stats, targets, cu)
    impls = [kernel]
    if kernel == "cpu":
        from spin_kernels.ops.backends.cpu_backend import CpuFused

        impls.append(as_impl(CpuFused(parts=3, row_tile=5, vocab_tile=8)))
    for impl in impls:
        _, metrics = linear_spin_loss(hidden, weight, targets, cu, torch.zeros(4), token_metrics=True, impl=impl)
        for key in ("token_accuracy/real", "token_accuracy/synthetic", "entropy", "logits/real"):
            assert_close(metrics[key], want[key], 1e-6, f"{key} {impl}")
        assert 0 < metrics["token_accuracy/real"].item() < 1
    empty = make_case([3, 0, 4, 2], 8, 40, all_ignored=True)
    _, metrics = linear_spin_loss(empty.hidden, empty.weight, empty.targets, empty.cu_seqlens, empty.ref_logps,
                                  token_metrics=True, impl=kernel)
    none = make_case([], 8, 40)
    _, no_rows = linear_spin_loss(none.hidden, none.weight, none.targets, none.cu_seqlens, torch.zeros(0),
                                  token_metrics=True, impl=kernel)
    for m in (metrics, no_rows):
        assert all(value.item() == 0.0 for key, value in m.items() if not key.startswith(("rewards", "logps"))), m


def test_cpu_kernel_statistics_cross_parts_and_tiles():
    """The C++ kernel's statistics merged across vocabulary parts and tiles, with and without the
    logits store (the SPIN path keeps them), equal the full logits'."""
    from spin_kernels.ops.backends.cpu_backend import CpuFused

    case = _case(torch.float32, HEADS[-1], seed=42)
    r, stats = _reference_rows(case, HEADS[-1])
    want = _reference_token_metrics(stats, r.targets, r.cu_seqlens)
    for backend in (CpuFused(parts=3, row_tile=5, vocab_tile=8, store_bytes=0),
                    CpuFused(parts=2, row_tile=7, vocab_tile=16, store_bytes=1 << 20)):
        _, metrics = linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps,
                                      token_metrics=True, impl=as_impl(backend), **_kw(case, HEADS[-1]))
        for key, value in want.items():
            assert_close(metrics[key], value, 1e-5, f"{key} {backend!r}")


def test_triton_statistics_across_vocabulary_splits():
    """The forward kernel's statistics merged across vocabulary splits (host-side, as lse is)."""
    pytest.importorskip("triton")
    from spin_kernels.triton.forward import rows_logprobs

    case = _case(torch.float32, {"softcap": 3.0}, seed=43)
    counted = case.targets != IGNORE
    h, w, y = case.hidden.detach()[counted], case.weight.detach(), case.targets[counted]
    stats = naive_row_stats(h.double(), w.double(), y, softcap=3.0)
    for splits in (1, 2, 3, 5):
        _, _, got = rows_logprobs(h, w, None, y, 1.0, 3.0, splits=splits, stats=True)
        for i, key in enumerate(("entropy", "mean_logit", "top1")):
            assert_close(got[i], stats[key], 1e-5, f"{key}, {splits} splits")
    assert rows_logprobs(h, w, None, y, 1.0, 3.0)[2] is None


# -- per-token log-probs and entropy (RL) -------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("options", HEADS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_logprobs_and_entropy_forward_and_backward(kernel, dtype, options, reduction):
    _skip_unsupported(kernel, dtype)
    case = _case(dtype, options, seed=44)
    logps, entropy = linear_logprobs(case.hidden, case.weight, case.targets, case.cu_seqlens, reduction=reduction,
                                     return_entropy=True, impl=kernel, **_kw(case, options))
    r, stats = _reference_rows(case, options)
    counted = r.targets != IGNORE
    if reduction == "none":
        want_logps, want_entropy = stats["logp"], stats["entropy"]
    else:
        mean = reduction == "mean"
        want_logps = _per_sequence(stats["logp"], r.cu_seqlens, counted, mean)
        want_entropy = _per_sequence(stats["entropy"], r.cu_seqlens, counted, mean)
    assert logps.shape == entropy.shape == want_logps.shape
    assert_close(logps, want_logps, 2e-5, "logps")
    assert_close(entropy, want_entropy, 2e-5, "entropy")
    # Both outputs differentiated, with unrelated upstream weights.
    u = torch.linspace(-1.0, 2.0, logps.numel(), dtype=torch.float64)
    v = torch.linspace(1.5, -0.5, logps.numel(), dtype=torch.float64)
    got = grads((logps.double() * u).sum() + (entropy.double() * v).sum(), [case.hidden, case.weight, case.bias])
    want = grads((want_logps * u).sum() + (want_entropy * v).sum(), [r.hidden, r.weight, r.bias])
    for name, g, w, x in zip(("hidden", "weight", "bias"), got, want, (case.hidden, case.weight, case.bias)):
        if x is not None:
            assert g.dtype == x.dtype, f"d{name} dtype"
            assert_close(g, w, GRAD_RTOL[dtype], f"d{name}")


@pytest.mark.parametrize("kernel", KERNELS)
def test_each_output_differentiated_alone(kernel):
    """Only the entropy, or only the log-probs, reaches the loss: the other's gradient is not
    computed, and an entropy asked for but unused changes nothing."""
    case = _case(torch.float32, {"bias": True}, seed=45)
    args = (case.hidden, case.weight, case.targets, case.cu_seqlens)
    r, stats = _reference_rows(case, {"bias": True})
    logps, entropy = linear_logprobs(*args, bias=case.bias, reduction="none", return_entropy=True, impl=kernel)
    (dh,) = grads(entropy.sum(), [case.hidden])
    (want,) = grads(stats["entropy"].sum(), [r.hidden])
    assert_close(dh, want, 3e-5, "dhidden of the entropy")
    logps, entropy = linear_logprobs(*args, bias=case.bias, reduction="none", return_entropy=True, impl=kernel)
    plain = linear_logprobs(*args, bias=case.bias, reduction="none", impl=kernel)
    assert torch.equal(logps, plain)
    assert torch.equal(grads(logps.sum(), [case.hidden])[0], grads(plain.sum(), [case.hidden])[0])


def test_gradcheck_entropy_and_per_row_logprobs():
    case = make_case([3, 0, 5, 1, 4], 5, 7, dtype=torch.float64, bias=True, seed=46)

    def fn(h, w, b):
        logps, entropy = linear_logprobs(h, w, case.targets, bias=b, temperature=0.8, softcap=2.0, reduction="none",
                                         return_entropy=True, impl="torch")
        return logps, entropy

    assert torch.autograd.gradcheck(fn, (case.hidden, case.weight, case.bias))


@pytest.mark.parametrize("kernel", KERNELS)
def test_all_ignored_and_no_rows_per_token(kernel):
    case = make_case([5, 3, 0, 8], 12, 50, all_ignored=True, bias=True)
    logps, entropy = linear_logprobs(case.hidden, case.weight, case.targets, bias=case.bias, reduction="none",
                                     return_entropy=True, impl=kernel)
    assert torch.equal(logps, torch.zeros(16)) and torch.equal(entropy, torch.zeros(16))
    for g in grads(logps.sum() + entropy.sum(), [case.hidden, case.weight, case.bias]):
        assert torch.equal(g, torch.zeros_like(g))
    none = make_case([], 8, 40)
    out = linear_logprobs(none.hidden, none.weight, none.targets, reduction="none", return_entropy=True, impl=kernel)
    assert out[0].shape == out[1].shape == (0,)


def test_reduction_options_are_checked():
    case = make_case([4, 5], 8, 20)
    args = (case.hidden, case.weight, case.targets, case.cu_seqlens)
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_logprobs(*args, reduction="max")
    with pytest.raises(ValueError, match="average=True means reduction='mean'"):
        linear_logprobs(*args, average=True, reduction="none")
    with pytest.raises(TypeError, match="return_entropy must be a bool"):
        linear_logprobs(*args, return_entropy=1)
    assert torch.equal(linear_logprobs(*args, average=True), linear_logprobs(*args, reduction="mean"))


# -- [B, T, H] inputs ---------------------------------------------------------------------------------


def _batch(seed=47, b=6, t=13, h=16, v=61, dtype=torch.float32):
    """Right- and left-padded rows: labels with the prompt ignored, an attention mask."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5 * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for row in range(b):
        pad = int(torch.randint(0, t // 2, (1,), generator=g))
        if row % 2:
            mask[row, t - pad:] = 0  # right padding
        else:
            mask[row, :pad] = 0  # left padding
        labels[row, :3] = IGNORE  # a prompt
        labels[row][mask[row] == 0] = IGNORE
    return hidden, weight, labels, mask


def _reference_batched(hidden, weight, labels, mask, shift):
    """float64 full logits: position t scores labels[:, t + 1] (shift) or labels[:, t]; counted when
    the label is not ignored and the positions involved are real tokens."""
    logits = hidden.double() @ weight.double().t()
    logp_all = torch.log_softmax(logits, -1)
    if shift:
        target = labels[:, 1:]
        ok = (target != IGNORE) & mask[:, :-1].bool() & mask[:, 1:].bool()
        lp = logp_all[:, :-1].gather(2, target.clamp(min=0)[..., None]).squeeze(2) * ok
        ent = -(logp_all.exp() * logp_all).sum(2)[:, :-1] * ok
        pad = torch.nn.functional.pad
        return pad(lp, (1, 0)), pad(ent, (1, 0)), pad(ok, (1, 0))
    ok = (labels != IGNORE) & mask.bool()
    lp = logp_all.gather(2, labels.clamp(min=0)[..., None]).squeeze(2) * ok
    return lp, -(logp_all.exp() * logp_all).sum(2) * ok, ok


@pytest.mark.parametrize("shift", [True, False], ids=["shift", "aligned"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_batched_logprobs_match_full_logits(kernel, shift):
    hidden, weight, labels, mask = _batch()
    per_token, entropy = batched_linear_logprobs(hidden, weight, labels, attention_mask=mask, shift=shift,
                                                 reduction="none", return_entropy=True, impl=kernel)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want, want_entropy, counted = _reference_batched(h64, w64, labels, mask, shift)
    assert per_token.shape == labels.shape
    assert_close(per_token, want, 2e-5, "per-token logps")
    assert_close(entropy, want_entropy, 2e-5, "entropy")
    sums = batched_linear_logprobs(hidden, weight, labels, attention_mask=mask, shift=shift, impl=kernel)
    means = batched_linear_logprobs(hidden, weight, labels, attention_mask=mask, shift=shift, reduction="mean",
                                    impl=kernel)
    assert_close(sums, want.sum(1), 2e-5, "sums")
    assert_close(means, want.sum(1) / counted.sum(1).clamp(min=1), 2e-5, "means")
    u = torch.linspace(-1, 1, labels.numel(), dtype=torch.float64).view(labels.shape)
    got = grads((per_token.double() * u).sum() + entropy.double().sum(), [hidden, weight])
    ref = grads((want * u).sum() + want_entropy.sum(), [h64, w64])
    for name, g, w in zip(("hidden", "weight"), got, ref):
        assert_close(g, w, 3e-5, f"d{name}")


def test_batched_inputs_map_onto_packed_rows_without_copying_hidden(monkeypatch):
    from spin_kernels.ops import batched

    hidden, weight, labels, mask = _batch()
    seen = {}
    real = batched.linear_logprobs
    monkeypatch.setattr(batched, "linear_logprobs", lambda rows, *a, **k: seen.setdefault("rows", rows) is None
                        or real(rows, *a, **k))
    batched_linear_logprobs(hidden, weight, labels, attention_mask=mask, impl="torch")
    assert seen["rows"].data_ptr() == hidden.data_ptr() and seen["rows"].shape == (6 * 13, 16)
    with pytest.raises(ValueError, match="labels must be a \\[B, T\\] = \\[6, 13\\]"):
        batched_linear_logprobs(hidden, weight, labels[:, :5])
    with pytest.raises(ValueError, match="hidden must be a \\[B, T, H\\]"):
        batched_linear_logprobs(hidden[0], weight, labels)
    with pytest.raises(TypeError, match="pairs"):
        batched_linear_spin_loss(hidden, weight, labels, torch.zeros(6))  # the layout is never guessed


@pytest.mark.parametrize("kernel", KERNELS)
def test_batched_spin_loss_halves_is_the_chosen_then_rejected_batch(kernel):
    """TRL's / Liger's layout (rows 0..P-1 chosen, P..2P-1 rejected) with pairs="halves" equals the
    same pairs packed interleaved, with the metrics of the pairs."""
    hidden, weight, labels, mask = _batch(seed=48)
    ref = torch.tensor([-30.0, -25.0, -28.0, -31.0, -24.0, -29.0])
    loss, metrics = batched_linear_spin_loss(hidden, weight, labels, ref, pairs="halves", attention_mask=mask,
                                             beta=0.2, token_metrics=True, impl=kernel)
    order = [0, 3, 1, 4, 2, 5]  # the same pairs, interleaved
    h2 = hidden.detach()[order].requires_grad_()
    interleaved, metrics2 = batched_linear_spin_loss(h2, weight, labels[order], ref[order], pairs="interleaved",
                                                     attention_mask=mask[order], beta=0.2, token_metrics=True,
                                                     impl=kernel)
    assert_close(loss, interleaved, 1e-6, "loss")
    for key in metrics:
        assert_close(metrics[key], metrics2[key], 1e-6, key)
    (dh,) = grads(loss, [hidden])
    (dh2,) = grads(interleaved, [h2])
    assert_close(dh[order], dh2, 1e-6, "dhidden")


def test_batched_spin_loss_equals_liger_dpo_on_its_layout():
    """Liger-Kernel's fused linear DPO loss (chosen half, then rejected half, targets aligned with
    the hidden states) and ours on the same [2P, T, H] batch: the same loss and gradients."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, labels, _ = _batch(seed=49)
    ref_hidden = (hidden.detach() + 0.1 * torch.randn_like(hidden)).requires_grad_(False)
    ref_weight = weight.detach() * 0.9
    theirs = liger.LigerFusedLinearDPOLoss(beta=0.2, compiled=False, use_ref_model=True)
    their_loss = theirs(weight, hidden, labels, ref_input=ref_hidden, ref_weight=ref_weight)[0]
    their_grads = grads(their_loss, [hidden, weight])
    ref_logps = batched_linear_logprobs(ref_hidden, ref_weight, labels, shift=False, impl="torch")
    loss, _ = batched_linear_spin_loss(hidden, weight, labels, ref_logps, pairs="halves", shift=False, beta=0.2,
                                       impl="torch")
    assert_close(loss, their_loss, 1e-5, "loss")
    for name, g, w in zip(("hidden", "weight"), grads(loss, [hidden, weight]), their_grads):
        assert_close(g, w, 1e-4, f"d{name}")
    wrong, _ = batched_linear_spin_loss(hidden, weight, labels, ref_logps, pairs="interleaved", shift=False, beta=0.2,
                                        impl="torch")
    assert abs(wrong.item() - their_loss.item()) > 1e-4


def test_batched_spin_loss_matches_the_naive_loss():
    hidden, weight, labels, mask = _batch(seed=50)
    ref = torch.linspace(-40, -20, 6)
    loss, _ = batched_linear_spin_loss(hidden, weight, labels, ref, pairs="interleaved", attention_mask=mask,
                                       beta=0.3, impl="cpu" if "cpu" in KERNELS else "torch")
    logps, _, _ = _reference_batched(hidden.double(), weight.double(), labels, mask, True)
    seq = logps.sum(1)
    margin = 0.3 * ((seq[0::2] - ref[0::2].double()) - (seq[1::2] - ref[1::2].double()))
    assert_close(loss, torch.nn.functional.softplus(-margin).mean(), 2e-5, "loss")


# -- the GRPO example of docs/integrations.md ------------------------------------------------------------


def _doc_example() -> str:
    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    match = re.search(r"<!-- grpo-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/integrations.md lost its GRPO example"
    return match.group(1)


@pytest.mark.parametrize("kernel", KERNELS)
def test_grpo_example_of_the_docs_matches_full_logits(kernel):
    """The documented per-token GRPO loss (ratio × advantage, clipped, from the fused per-token
    log-probs) run as written, against the same loss on plain full logits: loss and gradients."""
    namespace: dict = {}
    exec(compile(_doc_example(), "docs/integrations.md", "exec"), namespace)  # noqa: S102
    grpo_loss = namespace["grpo_loss"]
    g = torch.Generator().manual_seed(51)
    n, h, v = 40, 16, 97
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) / 4).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::7] = IGNORE  # prompt tokens
    cu_seqlens = torch.tensor([0, 9, 20, 26, 40])
    old_logps = linear_logprobs(hidden.detach() * 0.97, weight.detach(), targets, reduction="none", impl="torch")
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.5])
    loss = grpo_loss(hidden, weight, targets, cu_seqlens, old_logps, advantages, impl=kernel)

    # The same loss from [N, V] logits.
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logp_all = torch.log_softmax(h64 @ w64.t(), -1)
    counted = targets != IGNORE
    logps = logp_all.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    seq = torch.repeat_interleave(torch.arange(4), cu_seqlens.diff())
    ratio = torch.exp(logps - old_logps.double())
    adv = advantages.double()[seq]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - 0.2, 1 + 0.2) * adv)
    entropy = -(logp_all.exp() * logp_all).sum(1)
    per_token = per_token - 0.01 * entropy
    want = torch.stack([per_token[(seq == s) & counted].mean() for s in range(4)]).mean()
    assert_close(loss, want, 2e-5, "loss")
    for name, got, ref in zip(("hidden", "weight"), grads(loss, [hidden, weight]), grads(want, [h64, w64])):
        assert_close(got, ref, 3e-5, f"d{name}")
