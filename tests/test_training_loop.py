"""The SPIN loop end to end on CPU: a 2-iteration run, and kill-and-resume reaching identical weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from spin_kernels.cli import main
from spin_kernels.demo.task import MarkovTask
from spin_kernels.demo.tiny import save_tiny_model

TINY_FLAGS = ["--device", "cpu", "--max-length", "40", "--max-prompt-length", "8", "--max-new-tokens", "12",
              "--learning-rate", "1e-3", "--epochs", "1"]


def _data(tmp_path, n):
    path = tmp_path / "data.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in MarkovTask().sample(n, seed=1))
    return str(path)


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_two_iterations_end_to_end(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = save_tiny_model(str(tmp_path / "sft"))
    run = tmp_path / "run"
    rc = main(["iterate", "--model", model, "--data", _data(tmp_path, 24), "--output-dir", str(run),
               "--iterations", "2", "--global-batch-pairs", "8", "--token-budget", "200", "--save-every", "0",
               "--include-previous", *TINY_FLAGS])
    assert rc == 0
    for t in range(2):
        it = run / f"iter{t}"
        loaded = AutoModelForCausalLM.from_pretrained(str(it / "model"))
        assert loaded.config.model_type == "llama"
        assert loaded.config.use_cache  # saved for ordinary use, although training ran without a cache
        assert any(f.endswith(".safetensors") for f in os.listdir(it / "model"))
        rows = _jsonl(it / "metrics.jsonl")
        steps = 3 if t == 0 else 6  # iteration 1 also trains on iteration 0's synthetic data
        assert [r["step"] for r in rows] == list(range(1, steps + 1))
        for key in ("loss", "rewards/real", "rewards/synthetic", "rewards/margin", "rewards/accuracy",
                    "logps/real", "logps/synthetic", "lr", "grad_norm", "tokens_per_s", "peak_mem_mib"):
            assert all(isinstance(r[key], float) for r in rows), key
        assert (it / "metrics.png").stat().st_size > 1000
        pairs = _jsonl(it / "pairs.jsonl")
        assert len(pairs) == (24 if t == 0 else 48) and all(len(p["ref_logps"]) == 2 for p in pairs)
        assert not (it / "checkpoints").exists() or not os.listdir(it / "checkpoints")
    # The first step starts at the opponent: policy == reference, so every reward is exactly 0.
    first = _jsonl(run / "iter0" / "metrics.jsonl")[0]
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-5) and first["loss"] == pytest.approx(0.6931, 1e-3)
    summary = json.loads((run / "summary.json").read_text())
    assert [s["iteration"] for s in summary] == [0, 1]
    assert "SPIN after iteration 1" in capsys.readouterr().out
    # A finished run is not silently overwritten.
    assert main(["iterate", "--model", model, "--data", str(tmp_path / "data.jsonl"), "--output-dir", str(run),
                 *TINY_FLAGS]) == 2
    assert "pass --resume" in capsys.readouterr().err


def _spawn(args, env):
    return subprocess.Popen([sys.executable, "-m", "spin_kernels.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _kill_when(proc, ready, what, timeout=240.0):
    """SIGKILL ``proc`` as soon as ``ready()``; fail if it ends first (nothing was interrupted)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting to kill {what}")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _lines(path):
    try:
        with open(path) as f:
            return sum(1 for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return 0


def test_kill_and_resume_reaches_identical_weights(tmp_path):
    from safetensors.torch import load_file

    model = save_tiny_model(str(tmp_path / "sft"))
    data = _data(tmp_path, 40)
    args = ["iterate", "--model", model, "--data", data, "--iterations", "2", "--global-batch-pairs", "4",
            "--generation-batch-size", "2", "--save-every", "1", *TINY_FLAGS]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    ref_dir, run = tmp_path / "uninterrupted", tmp_path / "interrupted"
    reference = _spawn([*args, "--output-dir", str(ref_dir)], env)

    # 1) killed while iteration 0 generates (a few batches written, maybe a torn line)
    gen0 = run / "iter0" / "generated.jsonl"
    proc = _spawn([*args, "--output-dir", str(run)], env)
    _kill_when(proc, lambda: _lines(gen0) >= 4, "during generation")
    assert _lines(gen0) < 40
    # 2) resumed, then killed while iteration 1 trains (after a step checkpoint)
    ckpts = run / "iter1" / "checkpoints"
    proc = _spawn([*args, "--output-dir", str(run), "--resume"], env)
    _kill_when(proc, lambda: ckpts.is_dir() and any(n.startswith("step-") for n in os.listdir(ckpts)),
               "during training")
    assert not (run / "iter1" / "model").exists()
    # 3) resumed to the end
    proc = _spawn([*args, "--output-dir", str(run), "--resume"], env)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]

    for t in range(2):
        assert (run / f"iter{t}" / "generated.jsonl").read_text() == (ref_dir / f"iter{t}" / "generated.jsonl").read_text()
        got = load_file(str(run / f"iter{t}" / "model" / "model.safetensors"))
        want = load_file(str(ref_dir / f"iter{t}" / "model" / "model.safetensors"))
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), f"iter{t} {k}"
    steps = [r["step"] for r in _jsonl(run / "iter1" / "metrics.jsonl")]
    assert steps == list(range(1, 11))  # no step logged twice across the kill


def test_stage_subcommands_chain(tmp_path):
    """generate -> reference -> train, each from the command line, as the loop runs them."""
    from transformers import AutoModelForCausalLM

    model = save_tiny_model(str(tmp_path / "sft"))
    gen, pairs, out = tmp_path / "gen.jsonl", tmp_path / "pairs.jsonl", tmp_path / "train"
    assert main(["generate", "--model", model, "--data", _data(tmp_path, 12), "--output", str(gen),
                 "--device", "cpu", "--max-new-tokens", "8", "--max-prompt-length", "8"]) == 0
    rows = _jsonl(gen)
    assert [r["index"] for r in rows] == list(range(12)) and all("synthetic" in r for r in rows)
    assert main(["reference", "--model", model, "--input", str(gen), "--output", str(pairs), "--device", "cpu",
                 "--max-length", "40", "--max-prompt-length", "8"]) == 0
    assert all(len(r["ref_logps"]) == 2 and r["ref_logps"][0] < 0 for r in _jsonl(pairs))
    assert main(["train", "--model", model, "--input", str(pairs), "--output-dir", str(out), "--global-batch-pairs",
                 "4", "--epochs", "1", "--learning-rate", "1e-3", "--device", "cpu", "--max-length", "40",
                 "--max-prompt-length", "8"]) == 0
    assert len(_jsonl(out / "metrics.jsonl")) == 3
    AutoModelForCausalLM.from_pretrained(str(out / "model"))
    # the pairs file lacks ref_logps -> a clear error naming the field
    assert main(["train", "--model", model, "--input", str(gen), "--output-dir", str(tmp_path / "t2")]) == 2


def test_share_prompt_flag_gives_the_two_sequence_results(tmp_path, monkeypatch):
    """--share-prompt (reference, train and the loop's held-out pass) packs each prompt once; the
    log-probs, the losses and the trained weights equal the two-sequence layout's up to rounding."""
    from safetensors.torch import load_file

    model = save_tiny_model(str(tmp_path / "sft"))
    gen = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", model, "--data", _data(tmp_path, 12), "--output", str(gen),
                 "--device", "cpu", "--max-new-tokens", "8", "--max-prompt-length", "8"]) == 0
    lengths = ["--device", "cpu", "--max-length", "40", "--max-prompt-length", "8", "--token-budget", "90"]
    import spin_kernels.packing as packing

    layouts, pack = [], packing.pack_batch
    monkeypatch.setattr(packing, "pack_batch", lambda ex, **kw: layouts.append(kw.get("share_prompt")) or pack(ex, **kw))
    runs = {}
    for name, flag in (("two", []), ("shared", ["--share-prompt"])):
        layouts.clear()
        pairs, out = tmp_path / f"pairs-{name}.jsonl", tmp_path / f"train-{name}"
        assert main(["reference", "--model", model, "--input", str(gen), "--output", str(pairs), *lengths,
                     *flag]) == 0
        assert main(["train", "--model", model, "--input", str(pairs), "--output-dir", str(out),
                     "--global-batch-pairs", "4", "--epochs", "1", "--learning-rate", "1e-3", *lengths, *flag]) == 0
        assert set(layouts) == {bool(flag)}  # every batch of both passes in the asked layout
        runs[name] = ([r["ref_logps"] for r in _jsonl(pairs)], [r["loss"] for r in _jsonl(out / "metrics.jsonl")],
                      load_file(str(out / "model" / "model.safetensors")))
    (ref2, loss2, w2), (ref1, loss1, w1) = runs["two"], runs["shared"]
    torch.testing.assert_close(torch.tensor(ref1), torch.tensor(ref2), rtol=1e-5, atol=1e-4)
    assert loss1 == pytest.approx(loss2, rel=1e-4) and len(loss1) == 3
    assert w1.keys() == w2.keys()
    for k in w2:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)
    # the whole loop with the flag, held-out pass included
    run = tmp_path / "run"
    assert main(["iterate", "--model", model, "--data", str(tmp_path / "data.jsonl"), "--output-dir", str(run),
                 "--iterations", "1", "--global-batch-pairs", "4", "--token-budget", "90", "--save-every", "0",
                 "--eval-fraction", "0.25", "--share-prompt", *TINY_FLAGS]) == 0
    assert (run / "iter0" / "heldout_eval.json").exists()
