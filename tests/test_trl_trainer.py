"""spin_kernels.integrations.trl.SPINTrainer against TRL's own DPOTrainer (real TRL 1.16, CPU, fp32).

Same tiny Llama, same rows, same first micro-batch: TRL pads it and scores it with its chunked
lm-head kernel; SPINTrainer packs it and uses the fused ops. Loss, metrics and every parameter
gradient must agree within fp32 rounding: for every loss_type of TRL's DPOTrainer (and lists of
them with loss_weights, the f-divergences, ld_alpha), with a live reference model, with reference
log-probs precomputed by each trainer, with precomputed ones handed in as a dataset column, and for
a LoRA policy whose reference is its adapter disabled. Then a few optimizer steps of both trainers
reach the same weights. TRL's corners: bf16 autocast on an fp32 model, ``evaluate(eval_dataset=...)``
with SPIN's columns, TRL's padding collator.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl_setup import (  # noqa: E402
    LOSS_CASES, METRIC_RTOL, REFERENCE_CASES, RTOL, SORTING, TOKEN_METRICS, as_dpo, dpo_config, loss_case, parity_case,
    policy_and_reference, spin_rows, tiny_llama, tokenizer, trained_policy_and_reference)
from trl import DPOTrainer  # noqa: E402

from spin_kernels.integrations.dpo_losses import LOSS_TYPES  # noqa: E402
from spin_kernels.integrations.trl import SPINTrainer, _as_packed  # noqa: E402

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
        packed = _as_packed(got["inputs"])
        pol = spin._reference_logps(spin.model, packed)
        refl = spin._reference_logps(spin.ref_model, packed)
        margin = spin.beta * ((pol[0::2] - refl[0::2]) - (pol[1::2] - refl[1::2]))
        assert (margin > 1).any() and (margin < 1).any(), margin
    _assert_parity(case["diff"], float(case["dpo"]["loss"]))


def _case_id(case) -> str:
    loss_type, config = case
    name = "+".join(loss_type) if isinstance(loss_type, list) else loss_type
    return "-".join([name] + [f"{k}={v}" for k, v in config.items() if k not in ("loss_weights", "label_smoothing")])


def test_loss_cases_cover_every_trl_loss_type():
    import inspect

    from trl.trainer.dpo_trainer import DPOTrainer as TRLDPOTrainer

    trl_types = set(re.findall(r'loss_type == "(\w+)"', inspect.getsource(TRLDPOTrainer._compute_loss)))
    covered = {t for lt, _ in LOSS_CASES for t in ([lt] if isinstance(lt, str) else lt)}
    assert trl_types == set(LOSS_TYPES) == covered, (trl_types ^ set(LOSS_TYPES), set(LOSS_TYPES) ^ covered)


@pytest.mark.parametrize("case", LOSS_CASES, ids=_case_id)
def test_every_trl_loss_type_equals_trl_dpo(tmp_path, tok, models, case):
    loss_type, config = case
    sorting = loss_type in SORTING
    result = loss_case(str(tmp_path), tok, models, case)
    dpo, spin = result["trainers"]
    assert dpo.loss_types == list(spin.dpo_loss.loss_types) == ([loss_type] if isinstance(loss_type, str) else loss_type)
    # Discriminating settings: the batch's sort orders differ between policy and reference (aot's
    # sorting matters), or the two completions of each pair differ in length (per-token averages
    # and LD-DPO's split matter).
    packed = _as_packed(result["spin"]["inputs"])
    if sorting:
        pol, ref = spin._reference_logps(spin.model, packed), spin._reference_logps(spin.ref_model, packed)
        gaps, ref_gaps = pol[0::2] - pol[1::2], ref[0::2] - ref[1::2]
        assert not torch.equal(gaps.argsort(), ref_gaps.argsort()), (gaps, ref_gaps)
        assert not torch.equal((pol - ref)[0::2].argsort(), (pol - ref)[1::2].argsort()), pol - ref
    else:
        lengths = result["spin"]["inputs"]["completion_lengths"].view(-1, 2)
        assert (lengths[:, 0] != lengths[:, 1]).all(), lengths
    _assert_parity(result["diff"], float(result["dpo"]["loss"]))


@pytest.mark.parametrize("case, reference", REFERENCE_CASES, ids=lambda c: _case_id(c) if isinstance(c, tuple) else c)
def test_loss_types_with_every_reference(tmp_path, tok, models, case, reference):
    result = loss_case(str(tmp_path), tok, models, case, reference)
    _assert_parity(result["diff"], float(result["dpo"]["loss"]))


def test_dpo_loss_refuses_what_trl_refuses():
    from spin_kernels.integrations.dpo_losses import DPOLoss

    with pytest.raises(ValueError, match=r"applies to loss types .* not \['aot'\]"):
        DPOLoss(loss_types=("sigmoid", "aot"), loss_weights=(1.0, 1.0), f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="one weight per loss_type"):
        DPOLoss(loss_types=("sigmoid", "sft"), loss_weights=(1.0,))
    with pytest.raises(ValueError, match="f_divergence_type='kl'"):
        DPOLoss(f_divergence_type="kl")


def test_ld_alpha_refuses_reference_columns_computed_elsewhere(tmp_path, tok, models):
    policy, ref = models
    rows = [{**r, "ref_logps": [-100.0, -90.0]} for r in spin_rows(4)]
    with pytest.raises(ValueError, match="ld_alpha=0.5 with reference log-probs"):
        SPINTrainer(model=copy.deepcopy(policy), args=dpo_config(str(tmp_path), ld_alpha=0.5,
                                                                 precompute_ref_log_probs=True),
                    train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)


def test_ld_segments_split_each_sequence_at_the_shorter_completion():
    from spin_kernels.integrations.trl import ld_segments
    from spin_kernels.packing import SpinExample, pack_batch

    # prompt 3, chosen 4, rejected 2 (shared 2); prompt 1, chosen 1, rejected 3 (shared 1)
    batch = pack_batch([SpinExample([1, 2, 3], [4, 5, 6, 7], [8, 9]), SpinExample([1], [2], [3, 4, 5])])
    seg = ld_segments(batch.cu_seqlens, batch.targets).tolist()
    # sequences: rows [0, 7) [7, 12) [12, 14) [14, 18); scored rows: 2..5, 9..10, 12, 14..16
    assert batch.cu_seqlens.tolist() == [0, 7, 12, 14, 18]
    assert seg == [0, 4, 7, 11, 12, 13, 14, 15, 18], seg


def test_trl_token_metrics_equal_trl_dpo(tmp_path, tok):
    """TRL's entropy, logits/chosen, logits/rejected and mean_token_accuracy, computed by the fused
    op beside its log-sum-exp (``linear_spin_loss(token_metrics=True)``, docs/ops.md), on a model
    that has learned the rows (the metrics are far from a fresh model's ~log V, 0, 0)."""
    case = parity_case(str(tmp_path), tok, trained_policy_and_reference(tok), "sigmoid", "ref_model")
    want, got = case["dpo"]["metrics"], case["spin"]["metrics"]
    print({k: (want[k], got[k]) for k in TOKEN_METRICS})
    assert 0.2 < want["mean_token_accuracy"] < 0.9 and want["entropy"] < 7.0, want  # log 4096 = 8.3
    assert abs(want["logits/chosen"] - want["logits/rejected"]) > 1e-3, want
    for k in ("entropy", "logits/chosen", "logits/rejected"):
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), (k, want[k], got[k])
    assert got["mean_token_accuracy"] == want["mean_token_accuracy"], (want, got)
    _assert_parity(case["diff"], float(case["dpo"]["loss"]))


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
    ({"use_weighting": True}, "use_weighting=True .*squared probabilities"),
    ({"loss_type": "simpo"}, r"loss_type \['simpo'\] unknown; the loss types on sequence log-probs are"),
    ({"loss_type": ["sigmoid", "dpop"], "loss_weights": [1.0, 1.0]}, r"loss_type \['dpop'\] unknown"),
    ({"truncation_mode": "keep_end"}, "truncation_mode='keep_end' is not supported"),
])
def test_unsupported_options_are_refused_before_any_work(tmp_path, tok, overrides, message):
    with pytest.raises(ValueError, match=message):
        SPINTrainer(model=tiny_llama(tok), args=dpo_config(str(tmp_path), **overrides),
                    train_dataset=_spin_data(spin_rows(2)), processing_class=tok)


def test_bf16_autocast_on_an_fp32_model_trains_as_dpo_trainer(tmp_path, tok, models):
    """DPOConfig(bf16=True, use_cpu=True) on an fp32 model: TRL trains under CPU bf16 autocast. The
    varlen attention's SDPA returned the autocast dtype into an fp32 output (index_put dtype
    error); now both trainers train, with the same losses to bf16 rounding."""
    policy, ref = models
    rows = spin_rows(8)
    runs = {}
    for name, cls, data in (("dpo", DPOTrainer, as_dpo(rows)), ("spin", SPINTrainer, rows)):
        model = copy.deepcopy(policy)
        trainer = cls(model=model, ref_model=copy.deepcopy(ref), args=dpo_config(str(tmp_path / name), bf16=True),
                      train_dataset=datasets.Dataset.from_list(data), processing_class=tok)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert next(model.parameters()).dtype == torch.float32
        assert all(torch.isfinite(p).all() for p in model.parameters())
        runs[name] = losses
    assert len(runs["dpo"]) == len(runs["spin"]) == 2, runs
    # bf16 logits and attention on both sides, summed in different orders: ~1e-2 relative.
    assert max(abs(a - b) / abs(a) for a, b in zip(runs["dpo"], runs["spin"])) < 3e-2, runs


def test_evaluate_takes_spin_rows_as_dpo_trainer_takes_dpo_rows(tmp_path, tok, models):
    policy, ref = models
    held_out = spin_rows(4, offset=20)
    results = {}
    for name, cls, data in (("dpo", DPOTrainer, as_dpo), ("spin", SPINTrainer, lambda r: r)):
        trainer = cls(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref),
                      args=dpo_config(str(tmp_path / name), per_device_eval_batch_size=4),
                      train_dataset=datasets.Dataset.from_list(data(spin_rows(4))), processing_class=tok)
        results[name] = trainer.evaluate(eval_dataset=datasets.Dataset.from_list(data(held_out)))
        split = trainer.evaluate(eval_dataset={"held": datasets.Dataset.from_list(data(held_out))})
        assert split["eval_held_loss"] == pytest.approx(results[name]["eval_loss"], rel=1e-6), split
    want, got = results["dpo"], results["spin"]
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=RTOL), (want, got)
    assert got["eval_rewards/margins"] == pytest.approx(want["eval_rewards/margins"], rel=1e-4, abs=1e-4), (want, got)


def test_trl_padding_collator_is_refused_naming_what_spin_trainer_needs(tmp_path, tok):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    with pytest.raises(ValueError, match=r"data_collator=DataCollatorForPreference\(...\) pads .* Leave "
                                         "data_collator=None"):
        SPINTrainer(model=tiny_llama(tok), args=dpo_config(str(tmp_path)), processing_class=tok,
                    train_dataset=_spin_data(spin_rows(2)),
                    data_collator=DataCollatorForPreference(pad_token_id=tok.pad_token_id))
    # Any other collator is used as given; one that does not pack is named at the first batch.
    trainer = SPINTrainer(model=tiny_llama(tok), args=dpo_config(str(tmp_path)), processing_class=tok,
                          train_dataset=_spin_data(spin_rows(2)),
                          data_collator=lambda rows: {"input_ids": torch.tensor([r["prompt_ids"] for r in rows[:1]])})
    with pytest.raises(ValueError, match=r"data_collator: SPINTrainer needs packed batches .* without \['position_ids'"):
        trainer.train()


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
