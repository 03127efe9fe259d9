"""spin_kernels.integrations.trl.SPINTrainer against TRL's own DPOTrainer (real TRL 1.16, CPU, fp32).

Same tiny Llama, same rows, same first micro-batch: TRL pads it and scores it with its chunked
lm-head kernel; SPINTrainer packs it and uses the fused SPIN loss. Loss, metrics and every
parameter gradient must agree within fp32 rounding, for loss_type sigmoid and hinge, with a live
reference model, with reference log-probs precomputed by each trainer, with precomputed ones
handed in as a dataset column, and for a LoRA policy whose reference is its adapter disabled.
Then a few optimizer steps of both trainers reach the same weights.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl_setup import as_dpo, dpo_config, policy_and_reference, spin_rows, tiny_llama, tokenizer  # noqa: E402
from trl import DPOTrainer  # noqa: E402

from spin_kernels.integrations.trl import SPINTrainer  # noqa: E402
from spin_kernels.packing import IGNORE_INDEX  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# fp32 rounding: TRL's padded SDPA attention and chunked log-softmax against packed varlen
# attention and the fused loss sum in different orders. Measured: up to ~2e-5 relative on the
# gradients; a wrong sequence, token mask or reference moves them by 1e-2 or more (one token
# more or less changes a log-prob by ~log V = 8.3).
RTOL, ATOL = 1e-4, 1e-7
# Rewards are beta * (policy - reference) of log-probs of ~ -400: differences of large sums, with
# an fp32 rounding of ~ 1e-7 of the sums (measured: 7e-5 absolute at beta 2). They are compared
# against that scale; accuracies and token counts must match exactly.
METRIC_RTOL = 2e-6
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "num_tokens")


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def models(tok):
    return policy_and_reference(tok)


def _first_step(trainer):
    """Loss, parameter gradients, metrics and per-sequence completion lengths of the first micro-batch."""
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {k: trainer._metrics["train"][k][-1] for k in METRICS}
    if "completion_mask" in inputs:  # TRL: [chosen_0..B-1, rejected_0..B-1]; counted rows exclude the first token
        counts = inputs["completion_mask"][:, 1:].sum(1)
        b = counts.shape[0] // 2
        lengths = torch.stack([counts[:b], counts[b:]], 1).flatten()
    else:
        counted = (inputs["targets"] != IGNORE_INDEX).long()
        cu = inputs["cu_seqlens"].long()
        lengths = torch.stack([counted[cu[i]:cu[i + 1]].sum() for i in range(cu.numel() - 1)])
    return {"loss": loss.detach(), "grads": grads, "metrics": metrics, "lengths": lengths, "inputs": inputs}


def _compare(dpo, spin, beta: float) -> dict:
    """Max abs / rel differences (rel: per tensor, against the tensor's largest entry)."""
    assert torch.equal(dpo["lengths"], spin["lengths"]), (dpo["lengths"], spin["lengths"])
    assert dpo["grads"].keys() == spin["grads"].keys()
    out = {"loss_abs": float((dpo["loss"] - spin["loss"]).abs()), "grad_abs": 0.0, "grad_rel": 0.0}
    for k, g in dpo["grads"].items():
        d = float((g - spin["grads"][k]).abs().max())
        out["grad_abs"] = max(out["grad_abs"], d)
        out["grad_rel"] = max(out["grad_rel"], d / max(float(g.abs().max()), ATOL))
    m, n = dpo["metrics"], spin["metrics"]
    logps = max(abs(m["logps/chosen"]), abs(m["logps/rejected"]))
    scale = {k: (beta * logps if k.startswith("rewards/") else logps) for k in METRICS}
    out["metric_rel"] = max(abs(m[k] - n[k]) / scale[k] for k in METRICS if k.startswith(("rewards/m", "rewards/c",
                                                                                            "rewards/r", "logps/")))
    out["exact"] = {k: (m[k], n[k]) for k in ("rewards/accuracies", "num_tokens") if m[k] != n[k]}
    return out


def _assert_parity(diff: dict, loss: float) -> None:
    print(diff)
    assert diff["loss_abs"] <= RTOL * abs(loss) + ATOL, diff
    assert diff["grad_rel"] <= RTOL, diff
    assert diff["metric_rel"] <= METRIC_RTOL and not diff["exact"], diff


def _spin_data(rows, **extra):
    return datasets.Dataset.from_list([{**r, **{k: v[i] for k, v in extra.items()}} for i, r in enumerate(rows)])


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize("reference", ["ref_model", "precomputed", "column"])
def test_loss_and_gradients_equal_trl_dpo(tmp_path, tok, models, loss_type, reference):
    policy, ref = models
    rows = spin_rows(8)
    precompute = reference != "ref_model"
    args = dpo_config(str(tmp_path / "dpo"), loss_type=loss_type, precompute_ref_log_probs=precompute)
    dpo = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
                     train_dataset=datasets.Dataset.from_list(as_dpo(rows)), processing_class=tok)
    want = _first_step(dpo)

    extra = {}
    if reference == "column":  # TRL's own precomputed values, handed to SPINTrainer as our pairs-file column
        ds = dpo.train_dataset
        extra = {"ref_logps": [[c, r] for c, r in zip(ds["ref_chosen_logps"], ds["ref_rejected_logps"])]}
    args = dpo_config(str(tmp_path / "spin"), loss_type=loss_type, precompute_ref_log_probs=precompute)
    spin = SPINTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
                       train_dataset=_spin_data(rows, **extra), processing_class=tok)
    got = _first_step(spin)

    if reference == "precomputed":  # each trainer computed its own: TRL padded, ours packed
        a, b = dpo.train_dataset, spin.train_dataset
        for col in ("ref_chosen_logps", "ref_rejected_logps"):
            d = (torch.tensor(a[col]) - torch.tensor(b[col])).abs().max()
            assert d <= RTOL * torch.tensor(a[col]).abs().max(), (col, d)
    # The setting must be discriminating: rewards of both signs, and for hinge some pairs beyond
    # the margin (zero gradient) and some inside it.
    assert 0.0 < want["metrics"]["rewards/accuracies"] < 1.0, want["metrics"]
    if loss_type == "hinge":
        batch = got["inputs"]
        from spin_kernels.integrations.trl import _as_packed

        packed = _as_packed(batch)
        pol = spin._reference_logps(spin.model, packed)
        refl = spin._reference_logps(spin.ref_model, packed)
        margin = spin.beta * ((pol[0::2] - refl[0::2]) - (pol[1::2] - refl[1::2]))
        assert (margin > 1).any() and (margin < 1).any(), margin
    _assert_parity(_compare(want, got, spin.beta), float(want["loss"]))


def test_peft_policy_reference_is_the_adapter_disabled(tmp_path, tok):
    from peft import LoraConfig

    rows = spin_rows(8)
    # init_lora_weights=False: non-zero adapters, so the policy differs from its base (the reference).
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                      init_lora_weights=False)
    dpo = DPOTrainer(model=tiny_llama(tok), args=dpo_config(str(tmp_path / "dpo")), peft_config=lora,
                     train_dataset=datasets.Dataset.from_list(as_dpo(rows)), processing_class=tok)
    spin = SPINTrainer(model=tiny_llama(tok), args=dpo_config(str(tmp_path / "spin")), peft_config=lora,
                       train_dataset=_spin_data(rows), processing_class=tok)
    assert dpo.ref_model is None and spin.ref_model is None
    want, got = _first_step(dpo), _first_step(spin)
    assert got["grads"] and all("lora_" in k for k in got["grads"]), sorted(got["grads"])
    assert abs(want["metrics"]["rewards/margins"]) > 1e-3, want["metrics"]  # adapter on != adapter off
    _assert_parity(_compare(want, got, spin.beta), float(want["loss"]))


def test_training_steps_reach_the_same_weights(tmp_path, tok, models):
    policy, ref = models
    rows = spin_rows(8)
    runs = {}
    for name, cls, data in (("dpo", DPOTrainer, as_dpo(rows)), ("spin", SPINTrainer, rows)):
        model = copy.deepcopy(policy)
        # SGD: Adam's normalisation would turn rounding-level differences of near-zero gradients
        # into full-size steps; SGD keeps the difference of the weights proportional to theirs.
        args = dpo_config(str(tmp_path / name), max_steps=3, optim="sgd", learning_rate=0.05, max_grad_norm=1.0,
                          lr_scheduler_type="constant")
        trainer = cls(model=model, ref_model=copy.deepcopy(ref), args=args,
                      train_dataset=datasets.Dataset.from_list(data), processing_class=tok)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[name] = (losses, {n: p.detach().clone() for n, p in model.named_parameters()})
    (l_dpo, w_dpo), (l_spin, w_spin) = runs["dpo"], runs["spin"]
    assert len(l_dpo) == len(l_spin) == 3
    assert max(abs(a - b) / abs(a) for a, b in zip(l_dpo, l_spin)) < RTOL, (l_dpo, l_spin)
    start = dict(policy.named_parameters())
    moved = max(float((w_dpo[k] - start[k]).abs().max()) for k in w_dpo)
    diff = max(float((w_dpo[k] - w_spin[k]).abs().max()) for k in w_dpo)
    print({"moved": moved, "weights_abs": diff, "losses": (l_dpo, l_spin)})
    assert moved > 1e-3 and diff < RTOL * moved, (moved, diff)


def test_no_logits_are_formed_and_evaluation_reports_the_loss(tmp_path, tok, models):
    policy, ref = models
    rows = spin_rows(8)
    model = copy.deepcopy(policy)
    trainer = SPINTrainer(model=model, ref_model=copy.deepcopy(ref), args=dpo_config(str(tmp_path), max_steps=1),
                          train_dataset=_spin_data(rows), eval_dataset=_spin_data(spin_rows(4, offset=20)),
                          processing_class=tok)
    rows_seen = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: rows_seen.append(out.shape[:-1].numel()))
    try:
        trainer.train()
        result = trainer.evaluate()
    finally:
        handle.remove()
    assert rows_seen and set(rows_seen) == {0}, rows_seen  # the lm_head module only ever sees zero rows
    assert torch.isfinite(torch.tensor(result["eval_loss"])) and "eval_rewards/margins" in result, result
    assert "rewards/chosen" in trainer.state.log_history[0], trainer.state.log_history[0]


@pytest.mark.parametrize("overrides, message", [
    ({"loss_type": "ipo"}, "loss_type 'sigmoid'"),
    ({"loss_type": ["sigmoid", "hinge"]}, "one at a time"),
    ({"loss_weights": [0.5]}, "loss_weights"),
    ({"ld_alpha": 0.5}, "ld_alpha"),
    ({"use_weighting": True}, "use_weighting"),
    ({"f_divergence_type": "forward_kl"}, "f_divergence_type"),
])
def test_unsupported_options_are_refused_before_any_work(tmp_path, tok, overrides, message):
    with pytest.raises(ValueError, match=message):
        SPINTrainer(model=tiny_llama(tok), args=dpo_config(str(tmp_path), **overrides),
                    train_dataset=_spin_data(spin_rows(2)), processing_class=tok)


def test_bad_data_and_compute_metrics_are_refused(tmp_path, tok):
    rows = spin_rows(2)
    with pytest.raises(ValueError, match="both 'real' and 'chosen'"):
        SPINTrainer(model=tiny_llama(tok), args=dpo_config(str(tmp_path)), processing_class=tok,
                    train_dataset=_spin_data(rows, chosen=["a", "b"]))
    with pytest.raises(ValueError, match=r"ref_logps must be \[real, synthetic\]"):
        SPINTrainer(model=tiny_llama(tok), args=dpo_config(str(tmp_path), precompute_ref_log_probs=True),
                    processing_class=tok, train_dataset=_spin_data(rows, ref_logps=[[-1.0], [-2.0]]))
    with pytest.raises(ValueError, match="compute_metrics needs logits"):
        SPINTrainer(model=tiny_llama(tok), args=dpo_config(str(tmp_path)), processing_class=tok,
                    train_dataset=_spin_data(rows), compute_metrics=lambda p: {})


def test_spin_kernels_imports_without_trl():
    code = ("import sys; sys.modules['trl'] = None\n"
            "import spin_kernels, spin_kernels.integrations, spin_kernels.distributed, spin_kernels.training\n"
            "try:\n    import spin_kernels.integrations.trl\n"
            "except ImportError as e:\n    assert 'pip install trl' in str(e), e; print('guarded')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0 and "guarded" in res.stdout, res.stderr[-2000:]
