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

from trl_setup import (  # noqa: E402
    METRIC_RTOL, RTOL, as_dpo, dpo_config, parity_case, policy_and_reference, spin_rows, tiny_llama, tokenizer)
from trl import DPOTrainer  # noqa: E402

from spin_kernels.integrations.trl import SPINTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def models(tok):
    return policy_and_reference(tok)


def _assert_parity(diff: dict, loss: float) -> None:
    print(diff)
    assert diff["loss_abs"] <= RTOL * abs(loss), diff
    assert diff["grad_rel"] <= RTOL, diff
    assert diff["metric_rel"] <= METRIC_RTOL and not diff["exact"], diff


def _spin_data(rows, **extra):
    return datasets.Dataset.from_list([{**r, **{k: v[i] for k, v in extra.items()}} for i, r in enumerate(rows)])


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize("reference", ["ref_model", "precomputed", "column"])
def test_loss_and_gradients_equal_trl_dpo(tmp_path, tok, models, loss_type, reference):
    case = parity_case(str(tmp_path), tok, models, loss_type, reference)
    want, got = case["dpo"], case["spin"]
    dpo, spin = case["trainers"]
    if reference == "precomputed":  # each trainer computed its own: TRL padded, ours packed
        a, b = dpo.train_dataset, spin.train_dataset
        for col in ("ref_chosen_logps", "ref_rejected_logps"):
            d = (torch.tensor(a[col]) - torch.tensor(b[col])).abs().max()
            assert d <= RTOL * torch.tensor(a[col]).abs().max(), (col, d)
    # The setting must be discriminating: rewards of both signs, and for hinge some pairs beyond
    # the margin (zero gradient) and some inside it.
    assert 0.0 < want["metrics"]["rewards/accuracies"] < 1.0, want["metrics"]
    if loss_type == "hinge":
        from spin_kernels.integrations.trl import _as_packed

        packed = _as_packed(got["inputs"])
        pol = spin._reference_logps(spin.model, packed)
        refl = spin._reference_logps(spin.ref_model, packed)
        margin = spin.beta * ((pol[0::2] - refl[0::2]) - (pol[1::2] - refl[1::2]))
        assert (margin > 1).any() and (margin < 1).any(), margin
    _assert_parity(case["diff"], float(want["loss"]))


def test_peft_policy_reference_is_the_adapter_disabled(tmp_path, tok):
    case = parity_case(str(tmp_path), tok, None, "sigmoid", "peft")
    dpo, spin = case["trainers"]
    assert dpo.ref_model is None and spin.ref_model is None
    assert case["spin"]["grads"] and all("lora_" in k for k in case["spin"]["grads"]), sorted(case["spin"]["grads"])
    assert abs(case["dpo"]["metrics"]["rewards/margins"]) > 1e-3, case["dpo"]["metrics"]  # adapter on != off
    _assert_parity(case["diff"], float(case["dpo"]["loss"]))


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
