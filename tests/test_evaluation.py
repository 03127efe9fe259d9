"""Does SPIN help? Held-out evaluation, the stopping rule, per-iteration schedules, --include-previous K
and --eval-command (spin_kernels/training/evaluation.py and the loop)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from spin_kernels.cli import main
from spin_kernels.demo.task import MarkovTask
from spin_kernels.demo.tiny import save_tiny_model
from spin_kernels.training.evaluation import heldout_metrics, split_heldout, synthetic_stats

FLAGS = ["--device", "cpu", "--max-length", "40", "--max-prompt-length", "8", "--max-new-tokens", "12",
         "--global-batch-pairs", "4", "--generation-batch-size", "8", "--warmup-ratio", "0", "--save-every", "0"]


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_split_keeps_held_out_prompts_out_of_training():
    rows = [dict(r, index=i) for i, r in enumerate(MarkovTask().sample(60, seed=2))]
    train, held = split_heldout(rows, 0.25, seed=3)
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in held})
    assert len(train) + len(held) == 60 and held
    assert split_heldout(rows, 0.25, seed=3) == (train, held) and split_heldout(rows, 0.25, seed=4) != (train, held)
    assert split_heldout(rows, 0.0, seed=3) == (rows, [])
    with pytest.raises(ValueError, match="nothing to train on"):
        split_heldout(rows[:1], 0.9, seed=0)


def test_heldout_metrics_by_hand():
    pairs = [{"ref_logps": [-10.0, -12.0]}, {"ref_logps": [-5.0, -5.0]}, {"ref_logps": [-8.0, -9.0]}]
    policy = [(-9.0, -12.5), (-6.0, -4.0), (-8.0, -9.0)]
    m = heldout_metrics(policy, pairs, beta=0.5, real_tokens=[4, 3, 3])
    # margins: 0.5 * ((1) - (-0.5)) = 0.75; 0.5 * ((-1) - (1)) = -1; 0.5 * (0 - 0) = 0 (not > 0)
    assert m["heldout/accuracy"] == pytest.approx(1 / 3)
    assert m["heldout/margin"] == pytest.approx((0.75 - 1.0 + 0.0) / 3)
    assert m["heldout/logp_real_per_token"] == pytest.approx((-9.0 - 6.0 - 8.0) / 10)


def test_synthetic_stats():
    from spin_kernels.demo.tiny import demo_tokenizer

    rows = [{"synthetic": "abab", "synthetic_tokens": 4, "finished": True},
            {"synthetic": "abab", "synthetic_tokens": 4, "finished": False},
            {"synthetic": "cd", "synthetic_tokens": 2, "finished": True}]
    s = synthetic_stats(rows, demo_tokenizer())
    assert s["synthetic/mean_tokens"] == pytest.approx(10 / 3) and s["synthetic/finished"] == pytest.approx(2 / 3)
    assert s["synthetic/duplicates"] == pytest.approx(2 / 3)
    assert s["synthetic/distinct2"] == pytest.approx(3 / 7)  # ab, ba, cd among 3 + 3 + 1 bigrams


@pytest.fixture(scope="module")
def scheduled_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sched")
    model = save_tiny_model(str(tmp / "sft"), layers=2)
    data = tmp / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MarkovTask().sample(24, seed=1)))
    run = tmp / "run"
    command = f"{sys.executable} -c \"import sys; print('scored', sys.argv[1])\" {{model}}"
    assert main(["iterate", "--model", model, "--data", str(data), "--output-dir", str(run), "--iterations", "3",
                 "--learning-rate", "1e-3,5e-4,2e-4", "--beta", "0.1,0.5,2.0", "--epochs", "1,2,1",
                 "--include-previous", "2", "--eval-fraction", "0.25", "--eval-command", command, *FLAGS]) == 0
    return tmp, model, run


def test_schedules_apply_per_iteration(scheduled_run):
    _, _, run = scheduled_run
    for t, (lr, beta, epochs) in enumerate([(1e-3, 0.1, 1), (5e-4, 0.5, 2), (2e-4, 2.0, 1)]):
        rows = _jsonl(run / f"iter{t}" / "metrics.jsonl")
        assert rows[0]["lr"] == pytest.approx(lr) and {r["beta"] for r in rows} == {beta}
        pairs = len(_jsonl(run / f"iter{t}" / "pairs.jsonl"))
        assert len(rows) == epochs * -(-pairs // 4)


def test_include_previous_k_uses_exactly_the_previous_k_iterations(scheduled_run):
    _, _, run = scheduled_run
    n = len(_jsonl(run / "iter0" / "generated.jsonl"))
    for t, want in enumerate([{0}, {1, 0}, {2, 1, 0}]):
        pairs = _jsonl(run / f"iter{t}" / "pairs.jsonl")
        assert {p["source_iteration"] for p in pairs} == want and len(pairs) == n * len(want)
        for k in want:  # each one's rows are exactly that iteration's samples
            got = [(p["index"], p["synthetic"]) for p in pairs if p["source_iteration"] == k]
            assert got == [(g["index"], g["synthetic"]) for g in _jsonl(run / f"iter{k}" / "generated.jsonl")]


def test_heldout_metrics_are_the_trained_models_and_never_trained_on(scheduled_run):
    """Recompute iteration 1's held-out accuracy and margin by hand from its saved model and files."""
    import torch
    from transformers import AutoModelForCausalLM

    from spin_kernels.demo.tiny import demo_tokenizer
    from spin_kernels.models import prepare_model, reference_logps
    from spin_kernels.packing import pack_batch
    from spin_kernels.training.config import DataConfig
    from spin_kernels.training.reference import to_examples

    _, _, run = scheduled_run
    summary = json.loads((run / "summary.json").read_text())
    assert [s["iteration"] for s in summary] == [0, 1, 2]
    held = _jsonl(run / "iter1" / "heldout_pairs.jsonl")
    trained_on = {p["prompt"] for t in range(3) for p in _jsonl(run / f"iter{t}" / "pairs.jsonl")}
    assert held and trained_on.isdisjoint({p["prompt"] for p in held})
    model = prepare_model(AutoModelForCausalLM.from_pretrained(str(run / "iter1" / "model")))
    examples = to_examples(demo_tokenizer(), held, DataConfig(max_length=40, max_prompt_length=8))
    with torch.no_grad():
        logps = reference_logps(pack_batch(examples), ref_model=model, impl="torch").tolist()
    margins = [0.5 * ((logps[2 * i] - p["ref_logps"][0]) - (logps[2 * i + 1] - p["ref_logps"][1]))
               for i, p in enumerate(held)]
    s = summary[1]
    assert s["heldout/pairs"] == len(held)
    assert s["heldout/accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(held))
    assert s["heldout/margin"] == pytest.approx(sum(margins) / len(held), rel=1e-4, abs=1e-6)
    tokens = sum(len(ex.real_ids) for ex in examples)
    assert s["heldout/logp_real_per_token"] == pytest.approx(sum(logps[0::2]) / tokens, rel=1e-4)
    for key in ("synthetic/mean_tokens", "synthetic/finished", "synthetic/distinct2", "synthetic/duplicates"):
        assert key in s
    assert (run / "summary.png").stat().st_size > 1000


def test_eval_command_output_is_recorded(scheduled_run):
    _, _, run = scheduled_run
    summary = json.loads((run / "summary.json").read_text())
    for t, s in enumerate(summary):
        assert s["eval/exit_code"] == 0 and s["eval/last_line"] == f"scored {run / f'iter{t}' / 'model'}"
    assert "scored" in (run / "summary.md").read_text()


def test_the_stopping_rule_stops_and_stays_stopped_on_resume(tmp_path, capsys, monkeypatch):
    """The loop ends after the first iteration whose held-out accuracy is below X. The accuracies are
    scripted (0.8, then 0.45) so the decision does not hang on a tiny model's rounding; the metric itself
    is checked by hand above."""
    import spin_kernels.training.evaluation as evaluation

    real = evaluation.heldout_metrics
    scripted = iter([0.8, 0.45, 0.45])
    monkeypatch.setattr(evaluation, "heldout_metrics",
                        lambda *a, **k: {**real(*a, **k), "heldout/accuracy": next(scripted)})
    model = save_tiny_model(str(tmp_path / "sft"), layers=2)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MarkovTask().sample(24, seed=5)))
    args = ["iterate", "--model", model, "--data", str(data), "--output-dir", str(tmp_path / "run"), "--iterations",
            "4", "--eval-fraction", "0.5", "--learning-rate", "1e-3", "--epochs", "1", *FLAGS]
    assert main([*args, "--stop-below-accuracy", "0.5"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["heldout/accuracy"] for s in summary] == [0.8, 0.45] and "stopped" not in summary[0]
    assert "held-out accuracy 0.450 < 0.5" in summary[1]["stopped"]
    assert "the loop ends after iteration 1" in (tmp_path / "run" / "summary.md").read_text()
    assert not (tmp_path / "run" / "iter2").exists()
    # resumed: the files are current, so the recorded evaluation is read back, not recomputed
    assert main([*args, "--stop-below-accuracy", "0.5", "--resume"]) == 0
    assert len(json.loads((tmp_path / "run" / "summary.json").read_text())) == 2
    assert next(scripted) == 0.45  # heldout_metrics ran twice in all
    capsys.readouterr()
    # without held-out prompts the rule has nothing to read: refused before any work
    bare = [a for a in args if a not in ("--eval-fraction", "0.5")]
    assert main([*bare, "--stop-below-accuracy", "0.5", "--output-dir", str(tmp_path / "r2")]) == 2
    assert "loop.stop_below_accuracy: the stopping rule reads the held-out accuracy" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r2" / "config.yaml")
