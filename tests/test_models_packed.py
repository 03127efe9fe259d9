"""Packed batches through real transformers models (tiny configs, float64, CPU).

The reference for every packed result is the same model run by transformers itself, with its
eager attention, on each sequence alone (batch of one, no padding, no packing).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from cases import ARCHS, VOCAB, assert_close, lora_policy, make_model, model_rtol, param_grads

from spin_kernels.models import (
    lm_head_kwargs,
    packed_hidden_states,
    packed_spin_loss,
    prepare_model,
    reference_logps,
    sequence_logps,
    varlen_attention,
    varlen_backend,
)
from spin_kernels.ops import spin_loss
from spin_kernels.packing import SpinExample, pack_batch

transformers = pytest.importorskip("transformers")

def make_examples(num_pairs: int = 3, seed: int = 1, ref: bool = False) -> list[SpinExample]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return torch.randint(0, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [SpinExample(ids(2, 9), ids(1, 14), ids(1, 14), ref_logps=(-30.0 - p, -40.0 + p) if ref else None,
                        index=10 + p) for p in range(num_pairs)]


def per_sequence_logps(model, batch) -> torch.Tensor:
    """transformers' own forward (with its lm_head / softcap / scaling) on each sequence alone."""
    cu = batch.cu_seqlens.tolist()
    out = []
    for s, e in itertools.pairwise(cu):
        logits = model(batch.input_ids[s:e].unsqueeze(0), use_cache=False).logits[0]
        targets = batch.targets[s:e]
        keep = targets != -100
        out.append(torch.log_softmax(logits[keep].double(), -1).gather(1, targets[keep, None]).sum())
    return torch.stack(out)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_packed_logps_and_grads_match_each_sequence_alone(arch):
    reference = make_model(arch)
    model = prepare_model(copy.deepcopy(reference))
    batch = pack_batch(make_examples())
    weights = torch.linspace(-1.0, 2.0, batch.num_sequences, dtype=torch.float64)

    got = sequence_logps(model, batch, impl="torch")
    want = per_sequence_logps(reference, batch)
    rtol = model_rtol(arch)
    assert_close(got, want, rtol, f"{arch} logps")

    got_grads = param_grads(model, (weights * got).sum())
    want_grads = param_grads(reference, (weights * want).sum())
    assert set(got_grads) == set(want_grads)
    for name, g in want_grads.items():
        assert_close(got_grads[name], g, rtol * 10, f"{arch} grad {name}")


def test_oracle_honours_the_attention_softcap():
    """The oracle is the configured model: removing Gemma-2's attention softcap moves its log-probs by
    far more than the tolerance. Fails where transformers' attention drops the softcap (its "sdpa"
    path of Gemma-2, the default with transformers 4.54 to 5.17), which made the packed log-probs,
    right all along, look 9.4e-3 off."""
    batch = pack_batch(make_examples())
    capped = per_sequence_logps(make_model("gemma2"), batch)
    uncapped = per_sequence_logps(make_model("gemma2", attn_logit_softcapping=None), batch)
    assert (capped - uncapped).abs().max() > 1e-3


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_prepared_model_cannot_leak_even_with_default_use_cache(arch):
    """A direct transformers call on packed input with the config's default use_cache=True: a cache
    is created, yet attention stays inside each sequence."""
    reference = make_model(arch).eval()  # eval: where every version makes the cache (see below)
    assert reference.config.use_cache is True  # the default that triggers the leak
    model = prepare_model(copy.deepcopy(reference))
    model.config.use_cache = True  # undo prepare_model's setting: the attention alone must hold the line
    examples = make_examples()
    rows = [pack_batch(examples), pack_batch(examples[::-1])]  # two packed rows of the same length
    out = model(input_ids=torch.stack([b.input_ids for b in rows]),
                position_ids=torch.stack([b.position_ids for b in rows]))
    assert out.past_key_values is not None, "transformers should have created a cache here"
    for r, batch in enumerate(rows):
        for s, e in itertools.pairwise(batch.cu_seqlens.tolist()):
            alone = reference(batch.input_ids[s:e][None], use_cache=False).logits[0]
            assert_close(out.logits[r, s:e], alone, model_rtol(arch), f"{arch} row {r} tokens {s}:{e}")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_unprepared_packed_forward_with_cache_leaks(arch):
    """The trap prepare_model closes: transformers' own attention on packed input attends across
    sequences once a cache exists (and only then). In eval mode, as in the reference pass and in
    generation: Gemma-2 of transformers 4.54 to 4.57 makes no cache in training mode."""
    model = make_model(arch).eval()
    batch = pack_batch(make_examples())
    ids, pos = batch.input_ids[None], batch.position_ids[None]
    cu = batch.cu_seqlens.tolist()
    s, e = cu[1], cu[2]  # the second sequence: it follows another one
    alone = model(batch.input_ids[s:e][None], use_cache=False).logits[0]
    leaked = model(input_ids=ids, position_ids=pos, use_cache=True).logits[0, s:e]
    assert (leaked - alone).abs().max() > 1e-3
    fine = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, s:e]
    assert_close(fine, alone, model_rtol(arch), f"{arch} without cache")


def test_lm_head_kwargs_per_architecture():
    gemma = lm_head_kwargs(make_model("gemma2"))
    assert gemma["softcap"] == 3.0 and gemma["temperature"] == 1.0 and gemma["bias"] is None
    granite = lm_head_kwargs(make_model("granite"))
    assert granite["softcap"] is None and granite["temperature"] == 2.0
    llama = make_model("llama")
    kw = lm_head_kwargs(llama)
    assert kw["weight"] is llama.lm_head.weight and kw["softcap"] is None and kw["temperature"] == 1.0


def test_lm_head_with_bias_is_used():
    reference = make_model("llama")
    reference.lm_head.bias = torch.nn.Parameter(torch.randn(VOCAB, dtype=torch.float64))
    model = prepare_model(copy.deepcopy(reference))
    assert lm_head_kwargs(model)["bias"] is model.lm_head.bias
    batch = pack_batch(make_examples())
    assert_close(sequence_logps(model, batch, impl="torch"), per_sequence_logps(reference, batch), model_rtol("llama"),
                 "bias")


def test_packed_hidden_states_shape_and_errors():
    model = make_model("llama")
    batch = pack_batch(make_examples())
    with pytest.raises(ValueError, match="prepare_model"):
        packed_hidden_states(model, batch)
    prepare_model(model)
    assert model.config.use_cache is False
    hidden = packed_hidden_states(model, batch)
    assert hidden.shape == (batch.num_tokens, 32) and hidden.dtype == torch.float64
    with pytest.raises(TypeError, match="PackedBatch"):
        packed_hidden_states(model, {"input_ids": batch.input_ids})
    with pytest.raises(ValueError, match="ref_logps"):
        packed_spin_loss(model, batch)


def test_three_reference_modes_agree_and_loss_matches():
    base = make_model("llama")
    frozen = prepare_model(copy.deepcopy(base)).requires_grad_(False)
    policy = prepare_model(lora_policy(copy.deepcopy(base)))
    policy.train()
    examples = make_examples(num_pairs=4)
    batch = pack_batch(examples)

    from_frozen = reference_logps(batch, ref_model=frozen, impl="torch")
    from_policy = reference_logps(batch, policy=policy, impl="torch")
    assert not from_frozen.is_inference() and not from_frozen.requires_grad
    assert_close(from_policy, from_frozen, 1e-12, "policy with adapter disabled vs frozen model")
    assert_close(from_frozen, per_sequence_logps(base, batch), model_rtol("llama"), "frozen vs transformers alone")

    values = from_frozen.tolist()
    for p, ex in enumerate(examples):
        ex.ref_logps = (values[2 * p], values[2 * p + 1])
    precomputed = pack_batch(examples)
    assert_close(reference_logps(precomputed), from_frozen.float(), 1e-6, "precomputed (float32) vs frozen")

    # The adapter is back on and the policy back in training mode after the reference pass.
    assert policy.training
    with_adapter = sequence_logps(policy, batch, impl="torch")
    assert (with_adapter - from_frozen).abs().max() > 1e-3

    loss, metrics = packed_spin_loss(policy, batch, beta=0.5, impl="torch", ref_logps=from_policy)
    want, _ = spin_loss(with_adapter[0::2], with_adapter[1::2], from_frozen[0::2], from_frozen[1::2], beta=0.5)
    assert_close(loss, want, model_rtol("llama"), "SPIN loss")
    assert set(metrics) >= {"rewards/margin", "rewards/accuracy"}
    loss.backward()
    lora_grads = [p.grad for n, p in policy.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and torch.isfinite(g).all() for g in lora_grads)
    assert any(g.abs().max() > 0 for g in lora_grads)
    assert all(p.grad is None for n, p in policy.named_parameters() if "lora_" not in n)


def test_reference_logps_argument_errors():
    model = prepare_model(make_model("llama"))
    batch = pack_batch(make_examples())
    with pytest.raises(ValueError, match="not both"):
        reference_logps(batch, ref_model=model, policy=model)
    with pytest.raises(ValueError, match="ref_logps is None"):
        reference_logps(batch)
    with pytest.raises(TypeError, match="peft"):
        reference_logps(batch, policy=model)


def test_prepared_model_still_generates_with_left_padding():
    """Generation goes through transformers' cache and padding mask; prepare_model must not break it.
    The oracle is each prompt generated alone, without padding (transformers' own eager attention
    turns the left padding's fully masked rows into NaN in float64, which then reaches every row)."""
    reference = make_model("llama")
    model = prepare_model(copy.deepcopy(reference))
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "use_cache": True}
    got = model.generate(ids, attention_mask=mask, **kwargs)[:, width:]
    want = torch.cat([reference.generate(torch.tensor([p]), **kwargs)[:, len(p):] for p in prompts])
    assert torch.equal(got, want)


@pytest.mark.parametrize("window,softcap,dtype", [(None, None, torch.float64), (3, None, torch.float64),
                                                  (4, 1.5, torch.float64), (None, None, torch.float32)])
def test_varlen_attention_matches_dense_block_mask(window, softcap, dtype):
    torch.manual_seed(0)
    lengths = [5, 1, 7, 0, 4]
    t, hq, hkv, d = sum(lengths), 4, 2, 8
    q, k, v = (torch.randn(t, h, d, dtype=dtype) for h in (hq, hkv, hkv))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    assert varlen_backend(q.device, q.dtype, softcap=softcap) == "sdpa_loop"
    got = varlen_attention(q, k, v, cu, max(lengths), scale=0.3, window=window, softcap=softcap)

    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(t) - cu[:-1].long()[seq]
    allowed = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        allowed &= pos[None, :] > pos[:, None] - window
    kk, vv = k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
    scores = torch.einsum("thd,shd->hts", q.double(), kk) * 0.3
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    want = torch.einsum("hts,shd->thd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), vv)
    assert_close(got, want, 1e-12 if dtype == torch.float64 else 1e-5, "varlen attention")
