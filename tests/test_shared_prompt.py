"""The shared-prompt layout (``pack_batch(..., share_prompt=True)``) against today's packed layout.

Every shared-layout token stands for one or two tokens of the default layout (a prefix token for
the same token in the real and in the synthetic sequence; a branch token for one token of one
sequence). ``default_to_shared`` gives, for every default-layout row, the shared row that stands
for it; everything per row (ids, positions, targets, attention outputs, hidden states) must agree
through it, and the per-sequence log-probs and every parameter gradient must equal today's path
(float64, tiny models from configs).
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import VOCAB, assert_close, lora_policy, make_model, model_rtol, param_grads, traceable_examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spin_kernels.models import (
    SharedPromptLayout,
    packed_hidden_states,
    packed_spin_loss,
    prepare_model,
    reference_logps,
    sequence_logps,
    shared_prompt_backend,
    varlen_attention,
)
from spin_kernels.models import shared_prompt as shared_module
from spin_kernels.models.attention import spin_varlen_attention_forward
from spin_kernels.packing import IGNORE_INDEX, SpinExample, pack_batch, plan_micro_batches

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ARCHS = ("llama", "mistral", "qwen2", "gemma2", "granite")


def default_to_shared(examples) -> torch.Tensor:
    """[T_default] int64: the shared-layout row standing for each row of ``pack_batch(examples)``.

    Computed from the examples' lengths alone (not from either batch): for pair p with prompt
    length L, prefix length A = max(L - 1, 0), the real sequence's row j is shared row
    start + j (prefix + real branch are contiguous); the synthetic sequence's row j is the prefix
    row start + j for j < A, else row j - A of the synthetic branch.
    """
    out, start = [], 0
    for ex in examples:
        a = max(len(ex.prompt_ids) - 1, 0)
        real_len = len(ex.prompt_ids) + len(ex.real_ids)  # = A + len(real branch)
        syn_start = start + real_len
        out += [start + j for j in range(real_len)]
        out += [start + j if j < a else syn_start + j - a for j in range(len(ex.prompt_ids) + len(ex.synthetic_ids))]
        start = syn_start + len(ex.synthetic_ids) + len(ex.prompt_ids) - a
    return torch.tensor(out, dtype=torch.int64)


def edge_examples(seed: int = 1) -> list[SpinExample]:
    """Random pairs plus the edge cases: single-token responses, a one-token prompt, no prompt."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, VOCAB, (n,), generator=g).tolist()

    lengths = [(5, 7, 3), (8, 1, 9), (3, 6, 1), (1, 4, 2), (0, 5, 3), (6, 1, 1), (7, 12, 10)]
    return [SpinExample(ids(lp), ids(lr), ids(ls), index=p) for p, (lp, lr, ls) in enumerate(lengths)]


# ---------------------------------------------------------------- the layout

def test_shared_layout_by_hand():
    ex = SpinExample([10, 11, 12], [20, 21], [30], ref_logps=(-1.0, -2.0), index=7)
    b = pack_batch([ex], share_prompt=True)
    assert b.share_prompt and not pack_batch([ex]).share_prompt
    assert b.input_ids.tolist() == [10, 11, 12, 20, 21, 12, 30]  # prefix | 12 + real | 12 + synthetic
    assert b.position_ids.tolist() == [0, 1, 2, 3, 4, 2, 3]  # both branches continue from the prefix
    assert b.segment_cu_seqlens.tolist() == [0, 2, 5, 7] and b.segment_cu_seqlens.dtype == torch.int32
    assert b.cu_seqlens.tolist() == [0, 5, 7] and b.cu_seqlens.dtype == torch.int32  # loss sequences
    assert b.targets.tolist() == [-100, -100, 20, 21, -100, 30, -100]
    assert b.max_seqlen == 5 and b.num_tokens == 7 == ex.packed_tokens(True) and ex.packed_tokens() == 9
    assert b.ref_logps.tolist() == [-1.0, -2.0] and b.example_index.tolist() == [7]
    moved = b.to("cpu")
    assert torch.equal(moved.segment_cu_seqlens, b.segment_cu_seqlens)


@FAST
@given(spec=st.lists(st.tuples(st.integers(0, 12), st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=6),
       ref=st.booleans())
def test_shared_layout_stands_for_the_default_one(spec, ref):
    examples = traceable_examples(spec, ref)
    d, s = pack_batch(examples), pack_batch(examples, share_prompt=True)
    rows = default_to_shared(examples)
    assert rows.shape[0] == d.num_tokens and set(rows.tolist()) == set(range(s.num_tokens))  # every row stands for one
    assert torch.equal(s.input_ids[rows], d.input_ids)
    assert torch.equal(s.position_ids[rows], d.position_ids)
    assert torch.equal(s.targets[rows], d.targets)  # incl. the prompt's last token, held once per branch
    assert s.num_tokens == sum(ex.packed_tokens(True) for ex in examples)
    assert d.num_tokens == sum(ex.packed_tokens(False) for ex in examples) == sum(ex.num_tokens for ex in examples)
    assert s.max_seqlen == d.max_seqlen and s.num_sequences == d.num_sequences and s.num_counted == d.num_counted
    # The fused ops' view: the same counted targets, sequence by sequence, in the same order.
    for i in range(d.num_sequences):
        a, b = d.cu_seqlens[i:i + 2].tolist()
        c, e = s.cu_seqlens[i:i + 2].tolist()
        want, got = d.targets[a:b], s.targets[c:e]
        assert torch.equal(got[got != IGNORE_INDEX], want[want != IGNORE_INDEX])
    seg = s.segment_cu_seqlens.tolist()
    assert seg[0] == 0 and seg[-1] == s.num_tokens and len(seg) == 3 * len(examples) + 1
    assert s.cu_seqlens.tolist() == [x for i, x in enumerate(seg) if i % 3 != 1]
    assert torch.equal(s.example_index, d.example_index)
    assert (s.ref_logps is None) == (not ref) and (not ref or torch.equal(s.ref_logps, d.ref_logps))


def test_shared_layout_errors():
    with pytest.raises(ValueError, match="empty response"):  # as in today's layout
        pack_batch([SpinExample([1, 2], [3], [])], share_prompt=True)
    with pytest.raises(ValueError, match="empty response"):
        pack_batch([SpinExample([1, 2], [3], [])])
    with pytest.raises(TypeError, match="share_prompt"):
        pack_batch([SpinExample([1], [2], [3])], share_prompt=1)
    with pytest.raises(TypeError, match="share_prompt"):
        plan_micro_batches([SpinExample([1], [2], [3])], 10, share_prompt="yes")


def test_planner_costs_the_shared_layout():
    examples = traceable_examples([(30, 5, 5)] * 4)  # 70 tokens as two sequences, 41 shared
    default = plan_micro_batches(examples, 140, shuffle=False)
    shared = plan_micro_batches(examples, 140, shuffle=False, share_prompt=True)
    assert [len(mb) for mb in default.micro_batches[0]] == [2, 2]
    assert [len(mb) for mb in shared.micro_batches[0]] == [3, 1]
    assert shared.stats.num_tokens == 4 * 41 and default.stats.num_tokens == 4 * 70
    batches = list(shared.batches(examples))
    assert all(b.share_prompt for b in batches) and sum(b.num_tokens for b in batches) == 4 * 41
    assert not any(b.share_prompt for b in default.batches(examples))


# ---------------------------------------------------------------- attention

def _qkv(num_tokens, dtype=torch.float64, seed=0, hq=4, hkv=2, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(num_tokens, h, d, dtype=dtype, generator=g) for h in (hq, hkv, hkv)]


@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (None, 1.5), (4, 1.5)])
def test_attention_equals_default_layout_forward_and_backward(window, softcap):
    examples = edge_examples()
    d, s = pack_batch(examples), pack_batch(examples, share_prompt=True)
    rows = default_to_shared(examples)
    q, k, v = (t.requires_grad_() for t in _qkv(s.num_tokens))
    layout = SharedPromptLayout.from_batch(s, backend="sdpa_gather")
    got = layout.attention(q, k, v, scale=0.4, window=window, softcap=softcap)
    want = varlen_attention(q[rows], k[rows], v[rows], d.cu_seqlens, d.max_seqlen, scale=0.4, window=window,
                            softcap=softcap)
    assert_close(got[rows], want, 1e-12, "shared attention vs default layout")
    # Same loss in both layouts: a prefix row stands for two default rows, so each gets half its weight.
    w = torch.randn(s.num_tokens, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    count = torch.bincount(rows, minlength=s.num_tokens).to(w.dtype)[:, None, None]
    g_got = torch.autograd.grad((w * got).sum(), (q, k, v))
    g_want = torch.autograd.grad(((w / count)[rows] * want).sum(), (q, k, v))
    for name, a, b in zip("qkv", g_got, g_want):
        assert_close(a, b, 1e-12, f"d{name}")
    # FlexAttention: forward only on CPU (inputs must not require grad)
    flex = SharedPromptLayout.from_batch(s, backend="flex").attention(q.detach(), k.detach(), v.detach(), scale=0.4,
                                                                      window=window, softcap=softcap)
    assert_close(flex[rows], want, 1e-12, "flex block mask vs default layout")


@pytest.mark.parametrize("backend", ["sdpa_gather", "flex"])
def test_attention_never_reaches_the_other_branch(backend):
    """The synthetic branch's outputs do not depend on the real branch's keys or values (and the
    real branch's do not depend on the synthetic's); the prefix depends on neither branch."""
    examples = edge_examples()
    s = pack_batch(examples, share_prompt=True)
    seg = s.segment_cu_seqlens.tolist()
    piece = torch.repeat_interleave(torch.arange(len(seg) - 1) % 3, torch.diff(torch.tensor(seg)))
    q, k, v = _qkv(s.num_tokens)
    layout = SharedPromptLayout.from_batch(s, backend=backend)
    with torch.no_grad():
        base = layout.attention(q, k, v, scale=0.4)
        for changed, kept in ((1, 2), (2, 1)):
            k2, v2 = k.clone(), v.clone()
            k2[piece == changed] += 3.0
            v2[piece == changed] -= 2.0
            out = layout.attention(q, k2, v2, scale=0.4)
            assert torch.equal(out[piece == kept], base[piece == kept]) or \
                (out[piece == kept] - base[piece == kept]).abs().max() < 1e-13
            assert torch.equal(out[piece == 0], base[piece == 0]) or \
                (out[piece == 0] - base[piece == 0]).abs().max() < 1e-13
            assert (out[piece == changed] - base[piece == changed]).abs().max() > 1e-2  # the test can fail


def test_layout_errors_and_backend_choice():
    s = pack_batch(edge_examples(), share_prompt=True)
    with pytest.raises(ValueError, match="not a shared-prompt batch"):
        SharedPromptLayout.from_batch(pack_batch(edge_examples()))
    with pytest.raises(ValueError, match="segment_cu_seqlens"):
        SharedPromptLayout(s.cu_seqlens[:-1], s.position_ids)
    with pytest.raises(ValueError, match="backend"):
        SharedPromptLayout.from_batch(s, backend="flash")
    q, k, v = _qkv(s.num_tokens - 1)
    with pytest.raises(ValueError, match="tokens"):
        SharedPromptLayout.from_batch(s).attention(q, k, v, scale=1.0)
    q, k, v = _qkv(s.num_tokens)
    with pytest.raises(ValueError, match="dropout"):
        SharedPromptLayout.from_batch(s, backend="flex").attention(q, k, v, scale=1.0, dropout=0.1)
    assert shared_prompt_backend(torch.device("cpu"), torch.float32) == "sdpa_gather"
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, T, D] as transformers calls it
    with pytest.raises(ValueError, match="one packed row"):
        spin_varlen_attention_forward(None, q4.expand(2, -1, -1, -1), k4.expand(2, -1, -1, -1),
                                      v4.expand(2, -1, -1, -1), None,
                                      spin_shared_prompt=SharedPromptLayout.from_batch(s))


# ---------------------------------------------------------------- models (float64, from configs)

@pytest.mark.parametrize("arch", ARCHS)
def test_logps_and_every_gradient_equal_the_default_layout(arch):
    model = prepare_model(make_model(arch))
    examples = edge_examples()
    d, s = pack_batch(examples), pack_batch(examples, share_prompt=True)
    rtol = model_rtol(arch)
    assert_close(packed_hidden_states(model, s)[default_to_shared(examples)], packed_hidden_states(model, d), rtol,
                 f"{arch} hidden states")

    got, want = sequence_logps(model, s, impl="torch"), sequence_logps(model, d, impl="torch")
    assert_close(got, want, rtol, f"{arch} logps")
    weights = torch.linspace(-1.0, 2.0, d.num_sequences, dtype=torch.float64)
    got_grads, want_grads = param_grads(model, (weights * got).sum()), param_grads(model, (weights * want).sum())
    assert set(got_grads) == set(want_grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, g in want_grads.items():
        assert_close(got_grads[name], g, rtol * 10, f"{arch} grad {name}")

    ref = want.detach() + torch.linspace(-0.5, 0.5, d.num_sequences, dtype=torch.float64)
    (loss_s, metrics_s), (loss_d, metrics_d) = (packed_spin_loss(model, b, beta=0.5, impl="torch", ref_logps=ref)
                                                for b in (s, d))
    assert_close(loss_s, loss_d, rtol, f"{arch} SPIN loss")
    for key in metrics_d:
        assert_close(metrics_s[key], metrics_d[key], rtol, f"{arch} {key}")
    got_grads, want_grads = param_grads(model, loss_s), param_grads(model, loss_d)
    assert set(got_grads) == set(want_grads)
    for name, g in want_grads.items():
        assert_close(got_grads[name], g, rtol * 10, f"{arch} SPIN grad {name}")


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_changing_the_real_response_leaves_the_synthetic_alone(arch):
    model = prepare_model(make_model(arch))
    examples = edge_examples()
    changed = copy.deepcopy(examples)
    changed[0].real_ids = [(t + 1) % VOCAB for t in changed[0].real_ids]  # same length, other tokens
    changed[2].real_ids = changed[2].real_ids[:2] + [5, 6, 7, 8, 9]  # other length
    with torch.no_grad():
        before = sequence_logps(model, pack_batch(examples, share_prompt=True), impl="torch")
        after = sequence_logps(model, pack_batch(changed, share_prompt=True), impl="torch")
    assert_close(after[1::2], before[1::2], model_rtol(arch), f"{arch} synthetic logps")
    assert (after[0::2][[0, 2]] - before[0::2][[0, 2]]).abs().min() > 1e-3  # the real ones did change


def test_flex_backend_inside_a_model_forward(monkeypatch):
    """Gemma-2 (sliding window + attention softcap) through the flex block mask, forward (CPU)."""
    model = prepare_model(make_model("gemma2"))
    examples = edge_examples()
    want = reference_logps(pack_batch(examples), ref_model=model, impl="torch")
    monkeypatch.setattr(shared_module, "shared_prompt_backend", lambda *a, **k: "flex")
    got = reference_logps(pack_batch(examples, share_prompt=True), ref_model=model, impl="torch")
    assert_close(got, want, model_rtol("gemma2"), "flex, gemma2")


def test_reference_modes_on_shared_batches():
    base = make_model("llama")
    frozen = prepare_model(copy.deepcopy(base)).requires_grad_(False)
    policy = prepare_model(lora_policy(copy.deepcopy(base)))
    policy.train()
    examples = edge_examples()
    d, s = pack_batch(examples), pack_batch(examples, share_prompt=True)
    want = reference_logps(d, ref_model=frozen, impl="torch")
    assert_close(reference_logps(s, ref_model=frozen, impl="torch"), want, model_rtol("llama"), "frozen")
    assert_close(reference_logps(s, policy=policy, impl="torch"), want, model_rtol("llama"), "LoRA disabled")
    values = want.tolist()
    for p, ex in enumerate(examples):
        ex.ref_logps = (values[2 * p], values[2 * p + 1])
    precomputed = pack_batch(examples, share_prompt=True)
    assert_close(reference_logps(precomputed), want.float(), 1e-6, "precomputed")
    # The policy pass (adapter on) on the shared batch: same loss and LoRA gradients as the default one.
    assert policy.training
    losses = [packed_spin_loss(policy, b, beta=0.5, impl="torch", ref_logps=want)[0] for b in (s, d)]
    assert_close(losses[0], losses[1], model_rtol("llama"), "LoRA SPIN loss")
    grads = [param_grads(policy, loss) for loss in losses]
    assert grads[0] and set(grads[0]) == set(grads[1]) and all("lora_" in n for n in grads[0])
    for name, g in grads[1].items():
        assert_close(grads[0][name], g, model_rtol("llama") * 10, f"LoRA grad {name}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlexAttention's backward)")
@pytest.mark.parametrize("window,softcap", [(None, None), (5, 2.0)])
def test_flex_cuda_forward_and_backward(window, softcap):
    examples = edge_examples()
    d, s = pack_batch(examples).to("cuda"), pack_batch(examples, share_prompt=True).to("cuda")
    rows = default_to_shared(examples).cuda()
    q, k, v = (t.cuda().requires_grad_() for t in _qkv(s.num_tokens, dtype=torch.float32))
    got = SharedPromptLayout.from_batch(s, backend="flex").attention(q, k, v, scale=0.4, window=window,
                                                                     softcap=softcap)
    want = SharedPromptLayout.from_batch(s, backend="sdpa_gather").attention(q, k, v, scale=0.4, window=window,
                                                                             softcap=softcap)
    assert_close(got, want, 1e-4, "flex vs sdpa_gather (CUDA)")
    assert_close(got[rows], varlen_attention(q[rows], k[rows], v[rows], d.cu_seqlens, d.max_seqlen, scale=0.4,
                                             window=window, softcap=softcap), 1e-4, "flex vs default")
    w = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad((w * got).sum(), (q, k, v)), torch.autograd.grad((w * want).sum(), (q, k, v))):
        assert_close(a, b, 1e-4, "flex grads (CUDA)")
