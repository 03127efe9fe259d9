"""Runs that refuse to go silently wrong: the finite guard, provenance of every reused row, one
writer per run directory, and resume that forgives paths (tests/test_bad_inputs.py has the
catalogue of bad inputs)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from spin_kernels.cli import main
from spin_kernels.demo.task import MarkovTask
from spin_kernels.demo.tiny import save_tiny_model
from spin_kernels.training.rundir import LOCK_FILE

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from corruption_check import damage  # noqa: E402  (the damages of scripts/corruption_check.py)

FLAGS = ["--device", "cpu", "--max-length", "40", "--max-prompt-length", "8", "--max-new-tokens", "12",
         "--learning-rate", "1e-3", "--epochs", "1", "--global-batch-pairs", "4", "--generation-batch-size", "4",
         "--generation-chunk-size", "4", "--save-every", "1"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trust")
    model = save_tiny_model(str(tmp / "sft"))
    rows = MarkovTask().sample(12, seed=1)
    return tmp, model, rows


def _iterate(model, data, out, *extra):
    return ["iterate", "--model", model, "--data", data, "--output-dir", str(out), "--iterations", "1", *FLAGS, *extra]


# --------------------------------------------------------------------------- finite or stop


def test_nonfinite_step_stops_the_run_naming_step_examples_and_cause(base, tmp_path, capsys):
    tmp, model, rows = base
    data = _write(tmp_path / "d.jsonl", rows)
    rc = main(_iterate(model, data, tmp_path / "run", "--learning-rate", "1e38", "--max-grad-norm", "none",
                        "--warmup-ratio", "0"))
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 1, err
    assert "iter0 train (iteration 0): optimizer step 1 of 3 stopped before it was saved: non-finite parameters" in err
    assert "'model.embed_tokens.weight'" in err
    assert "pairs at " in err and "pairs.jsonl lines [" in err and "(data rows [" in err
    assert "Likely cause: the optimizer step overflowed the weights: --learning-rate 1e+38 is too large" in err
    assert not (tmp_path / "run" / "iter0" / "model").exists()
    assert not (tmp_path / "run" / "iter0" / "checkpoints").exists()  # nothing saved from the failed step


def test_nonfinite_loss_names_the_micro_batch(base, tmp_path):
    """A loss that turns NaN in one micro-batch: the step is not applied and the error names exactly
    that micro-batch's examples (train_step, one process)."""
    from spin_kernels.distributed import NonFiniteError, ModelRunner, train_step

    model = torch.nn.Linear(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Batch:
        def __init__(self, ids, x):
            self.example_index, self.num_pairs, self.x = torch.tensor(ids), len(ids), x

    def loss_fn(m, b):
        return m(b.x).sum(), {}

    good, bad = Batch([0, 1], torch.ones(2, 3)), Batch([5, 7], torch.tensor([[1.0, float("nan"), 0.0]] * 2))
    with pytest.raises(NonFiniteError) as info:
        train_step(ModelRunner(model), opt, [good, bad], loss_fn=loss_fn, max_grad_norm=1.0)
    assert info.value.quantity == "loss" and info.value.examples == [5, 7]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing applied


# --------------------------------------------------------------------------- provenance


def test_generate_onto_a_file_of_another_dataset_regenerates(base, tmp_path, capsys):
    tmp, model, rows = base
    gen = ["generate", "--model", model, "--output", str(tmp_path / "g.jsonl"), "--device", "cpu",
           "--max-new-tokens", "6", "--max-prompt-length", "8", "--max-length", "40", "--generation-batch-size", "4"]
    other = _write(tmp_path / "other.jsonl", MarkovTask().sample(12, seed=9))
    assert main([*gen, "--data", other]) == 0
    data = _write(tmp_path / "d.jsonl", rows)
    assert main([*gen, "--data", data, "--on-stale", "error"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "g.jsonl: 12 row(s) cannot be reused (index 0: its prompt/response text differs" in err
    assert main([*gen, "--data", data]) == 0
    assert "g.jsonl: 12 row(s) cannot be reused" in capsys.readouterr().err
    fresh = ["generate", *gen[1:4], str(tmp_path / "fresh.jsonl"), *gen[5:], "--data", data]
    assert main(fresh) == 0
    assert (tmp_path / "g.jsonl").read_text() == (tmp_path / "fresh.jsonl").read_text()
    # other sampling settings make rows stale too (here: the seed)
    assert main([*gen, "--data", data, "--generation-seed", "5", "--on-stale", "error"]) == 2
    assert "sampling was {" in capsys.readouterr().err


def test_a_run_of_the_original_sampler_continues_under_its_one_flag(base, tmp_path, capsys):
    """Per-example seeds became the default: a run started before (its config.yaml says hf, file
    order, ``generation_seeding: auto``) is refused on --resume with the new defaults, naming the
    flag that continues it, and continues under ``--generation-seeding batch`` with every row and
    model kept (the rows record the same settings by construction); a generate onto such rows
    with the new defaults samples them again, with a warning."""
    import yaml

    tmp, model, rows = base
    data = _write(tmp_path / "d.jsonl", rows)
    run = tmp_path / "run"
    assert main(_iterate(model, data, run, "--generation-seeding", "batch")) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["generation"].update(backend="hf", generation_order="input", generation_seeding="auto")  # as 0.1 wrote
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    final = run / "iter0" / "model" / "model.safetensors"
    stamp = final.stat().st_mtime_ns
    capsys.readouterr()
    assert main(_iterate(model, data, run, "--resume")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "generation.backend ('hf' -> 'continuous')" in err and "pass --generation-seeding batch to continue" in err
    assert main(_iterate(model, data, run, "--resume", "--generation-seeding", "batch")) == 0
    assert final.stat().st_mtime_ns == stamp  # nothing redone
    old = run / "iter0" / "generated.jsonl"
    shutil.copy(old, tmp_path / "g.jsonl")
    gen = ["generate", "--model", model, "--data", data, "--output", str(tmp_path / "g.jsonl"), *FLAGS[:8],
           "--generation-seed", "1234"]
    assert main(gen) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "g.jsonl: 12 row(s) cannot be reused" in err and "sampling was {" in err
    assert all(r["source"]["sampling"]["backend"] == "continuous" for r in _jsonl(tmp_path / "g.jsonl"))


def test_resume_after_the_data_file_changed_trains_on_the_new_data(base, tmp_path, capsys):
    """An edited data file: --resume regenerates what was made from the old rows, and the run ends
    bit-equal to a fresh run on the new data (never trained on stale pairs)."""
    tmp, model, rows = base
    data = tmp_path / "d.jsonl"
    _write(data, rows)
    assert main(_iterate(model, str(data), tmp_path / "run")) == 0
    edited = [dict(r) for r in rows]
    edited[5]["real"] = "hgfedcba"
    _write(data, edited)
    assert main(_iterate(model, str(data), tmp_path / "run", "--resume")) == 0
    err = capsys.readouterr().err
    assert "generated.jsonl: 4 row(s) cannot be reused (index 5: its prompt/response text differs" in err
    _write(tmp_path / "d2.jsonl", edited)
    assert main(_iterate(model, str(tmp_path / "d2.jsonl"), tmp_path / "fresh")) == 0
    assert _same_weights(tmp_path / "run" / "iter0" / "model", tmp_path / "fresh" / "iter0" / "model")
    pairs = _jsonl(tmp_path / "run" / "iter0" / "pairs.jsonl")
    assert pairs[5]["real"] == "hgfedcba"
    assert pairs == _jsonl(tmp_path / "fresh" / "iter0" / "pairs.jsonl")


def test_stray_files_of_another_run_are_not_trained_on(base, tmp_path):
    tmp, model, rows = base
    other = _write(tmp_path / "other.jsonl", MarkovTask().sample(12, seed=4))
    assert main(_iterate(model, other, tmp_path / "a")) == 0
    run = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "iter0", run / "iter0")  # another run's files, no config.yaml
    data = _write(tmp_path / "d.jsonl", rows)
    assert main(_iterate(model, data, run)) == 0
    assert main(_iterate(model, data, tmp_path / "clean")) == 0
    assert _same_weights(run / "iter0" / "model", tmp_path / "clean" / "iter0" / "model")
    assert (run / "iter0" / "generated.jsonl").read_text() == (tmp_path / "clean" / "iter0" / "generated.jsonl").read_text()


def test_checkpoints_of_other_inputs_are_not_resumed(base, tmp_path, capsys):
    """A step checkpoint written from other pairs is discarded on --resume (or refused)."""
    tmp, model, rows = base
    data = tmp_path / "d.jsonl"
    _write(data, rows)
    args = _iterate(model, str(data), tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "spin_kernels.cli", *args[0:]], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, env=dict(os.environ, TQDM_DISABLE="1"))
    ckpts = tmp_path / "run" / "iter0" / "checkpoints"
    _wait_for(lambda: ckpts.is_dir() and any(n.startswith("step-") for n in os.listdir(ckpts)), proc,
              "a step checkpoint", timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    edited = [dict(r) for r in rows]
    edited[0]["real"] = "abab"
    _write(data, edited)
    assert main([*args, "--resume", "--on-stale", "error"]) == 2
    assert "cannot be reused" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    _write(tmp_path / "d2.jsonl", edited)
    assert main(_iterate(model, str(tmp_path / "d2.jsonl"), tmp_path / "fresh")) == 0
    assert _same_weights(tmp_path / "run" / "iter0" / "model", tmp_path / "fresh" / "iter0" / "model")


# --------------------------------------------------------------------------- resume that forgives paths


def test_resume_forgives_trailing_slash_relative_and_moved_dirs(base, tmp_path, monkeypatch):
    tmp, model, rows = base
    monkeypatch.chdir(tmp_path)
    data = _write(tmp_path / "d.jsonl", rows)
    assert main(_iterate(model, "d.jsonl", "run")) == 0
    final = tmp_path / "run" / "iter0" / "model" / "model.safetensors"
    stamp = final.stat().st_mtime_ns
    for out in ("run/", str(tmp_path / "run"), "./run//"):
        assert main(_iterate(model, data, out, "--resume")) == 0, out
    os.rename(tmp_path / "run", tmp_path / "moved")
    assert main(_iterate(model, data, "moved", "--resume")) == 0
    assert (tmp_path / "moved" / "iter0" / "model" / "model.safetensors").stat().st_mtime_ns == stamp  # not redone


def test_a_start_that_did_no_work_can_be_restarted_with_other_settings(base, tmp_path, capsys):
    tmp, model, rows = base
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "0a"}\n')
    assert main(_iterate(model, str(bad), tmp_path / "run")) == 2
    assert not (tmp_path / "run" / "config.yaml").exists()  # bad data is found before anything is written
    # a config left by an older start that did no work does not block a corrected start
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "config.yaml").write_text("training:\n  beta: 0.5\n")
    data = _write(tmp_path / "d.jsonl", rows)
    assert main(_iterate(model, data, tmp_path / "run", "--beta", "0.2")) == 0
    assert "beta: 0.2" in (tmp_path / "run" / "config.yaml").read_text()
    # once work was done, another configuration is refused, naming the field and both values
    capsys.readouterr()
    assert main(_iterate(model, data, tmp_path / "run", "--beta", "0.3", "--resume")) == 2
    assert "training.beta (0.2 -> 0.3)" in capsys.readouterr().err


# --------------------------------------------------------------------------- one writer per run directory


def _spawn(args):
    return subprocess.Popen([sys.executable, "-m", "spin_kernels.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, TQDM_DISABLE="1",
                                                                        OMP_NUM_THREADS="1"))


def _wait_for(cond, proc, what, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_a_second_writer_is_refused_and_no_row_is_written_twice(base, tmp_path, capsys):
    tmp, model, rows = base
    data = _write(tmp_path / "d.jsonl", rows)
    run = tmp_path / "run"
    first = _spawn(_iterate(model, data, run, "--iterations", "2"))
    _wait_for(lambda: (run / LOCK_FILE).exists() and (run / LOCK_FILE).stat().st_size > 0, first, "it locked")
    for extra in ((), ("--resume",)):
        assert main(_iterate(model, data, run, "--iterations", "2", *extra)) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"loop.output_dir: '{run}' is in use by another run (pid {first.pid} on host" in err
        assert " iterate --model " in err  # the holder's command
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    for t in range(2):
        gen = _jsonl(run / f"iter{t}" / "generated.jsonl")
        assert [r["index"] for r in gen] == list(range(12))
        assert [r["step"] for r in _jsonl(run / f"iter{t}" / "metrics.jsonl")] == [1, 2, 3]
    assert not (run / LOCK_FILE).exists()  # released at the end


def test_a_killed_writer_leaves_no_lock(base, tmp_path):
    tmp, model, rows = base
    data = _write(tmp_path / "d.jsonl", rows)
    run = tmp_path / "run"
    proc = _spawn(_iterate(model, data, run))
    _wait_for(lambda: (run / "iter0" / "generated.jsonl").exists(), proc, "it generated")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / LOCK_FILE).exists()  # the file stays, but the kernel released the lock with the process
    assert main(_iterate(model, data, run, "--resume")) == 0


def test_run_lock_unit(tmp_path):
    from spin_kernels.training.config import ConfigError
    from spin_kernels.training.runlock import RunLock

    path = str(tmp_path / "x.lock")
    with RunLock(path, what="--output-dir"):
        code = ("import sys\nfrom spin_kernels.training.runlock import RunLock\n"
                f"RunLock({path!r}, what='--output-dir').acquire()\n")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert res.returncode != 0 and f"is in use by another run (pid {os.getpid()}" in res.stderr
    with RunLock(path, what="--output-dir"):  # released and taken again
        pass
    lock = RunLock(path, what="x").acquire()
    with pytest.raises(ConfigError, match="in use by another run"):
        # flock is per open file: a second acquire in the same process is refused as well
        RunLock(path, what="x").acquire()
    lock.release()


# --------------------------------------------------------------------------- digest what is written, check what is read
# (issue 25 item 1: every saved model and step checkpoint records the digest of its files and of the
# tokenizer; --resume and train verify them before reuse; a damaged one is rebuilt or refused, never used)


NAMED = {"flip": "has other bytes than when it was written", "truncate": "is truncated", "zero": "is empty"}


@pytest.fixture(scope="module")
def finished_run(base, tmp_path_factory):
    """A finished 1-iteration run: (model, data, run directory)."""
    tmp, model, rows = base
    root = tmp_path_factory.mktemp("finished")
    data = _write(root / "d.jsonl", rows)
    assert main(_iterate(model, data, root / "run")) == 0
    return model, data, root / "run"


@pytest.mark.parametrize("name,how", [("model.safetensors", "flip"), ("model.safetensors", "truncate"),
                                      ("model.safetensors", "zero"), ("config.json", "flip"),
                                      ("tokenizer.json", "flip"), ("spin_info.json", "flip")])
def test_a_damaged_final_model_is_refused_or_rebuilt_never_used(finished_run, tmp_path, capsys, name, how):
    """One file of iter0/model damaged: --resume --on-stale error refuses, naming the file and what
    to delete; --resume trains the iteration again from its pairs (a warning names the file) and
    ends with the weights of the undamaged run."""
    model, data, run = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    target = copy / "iter0" / "model" / name
    damage(target, how)
    assert main([*_iterate(model, data, copy), "--resume", "--on-stale", "error"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert str(target) in err and f"delete {copy / 'iter0' / 'model'} to train it again" in err, err
    assert main([*_iterate(model, data, copy), "--resume"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert str(target) in err and "is not used; its training runs again" in err, err
    if name != "spin_info.json":
        assert NAMED[how] in err
    assert _same_weights(copy / "iter0" / "model", run / "iter0" / "model")
    assert (copy / "iter0" / "model" / name).read_bytes() == (run / "iter0" / "model" / name).read_bytes()


@pytest.mark.parametrize("name", ["generated.jsonl", "pairs.jsonl"])
def test_a_changed_row_of_a_run_file_is_made_again_never_used(finished_run, tmp_path, capsys, name):
    """Each row generate and reference write carries the digest of its fields: a row edited on
    disk (a response's letter, a log-prob's digit; JSON still valid) or a line that is no longer
    JSON is made again (or refused), and the run ends as the undamaged one did."""
    model, data, run = finished_run
    for how in ("edit", "break"):
        copy = tmp_path / how
        shutil.copytree(run, copy)
        path = copy / "iter0" / name
        lines = path.read_text().splitlines(keepends=True)
        row = json.loads(lines[2])
        if how == "edit" and name == "pairs.jsonl":
            row["ref_logps"][0] += 0.5
        elif how == "edit":
            row["synthetic"] = row["synthetic"][::-1] + "a"
        lines[2] = json.dumps(row) + "\n" if how == "edit" else lines[2][:10] + "\n"
        path.write_text("".join(lines))
        assert main([*_iterate(model, data, copy), "--resume", "--on-stale", "error"]) == 2
        err = " ".join(capsys.readouterr().err.split())
        why = "it changed after it was written" if how == "edit" else "line 3 is not valid JSON"
        assert str(path) in err and why in err, err
        assert main([*_iterate(model, data, copy), "--resume"]) == 0
        assert why in " ".join(capsys.readouterr().err.split())
        assert path.read_text() == (run / "iter0" / name).read_text()
        assert _same_weights(copy / "iter0" / "model", run / "iter0" / "model")


def test_a_changed_pairs_row_given_to_train_is_refused(finished_run, tmp_path, capsys):
    model, data, run = finished_run
    lines = (run / "iter0" / "pairs.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["ref_logps"][1] -= 1.0
    lines[1] = json.dumps(row)
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    assert main(["train", "--model", model, "--input", str(pairs), "--output-dir", str(tmp_path / "t"), *FLAGS[:6]]) == 2
    assert f"--input: {pairs}:2: row 1: it changed after it was written (its row_digest does not match its fields)" \
        in " ".join(capsys.readouterr().err.split())


def test_a_damaged_step_checkpoint_is_refused_or_rebuilt_never_used(base, tmp_path, capsys):
    """A run killed after a step checkpoint; one byte of the checkpoint's weights flipped (size and
    mtime kept): --resume --on-stale error refuses naming the file; --resume trains from the
    start and ends bit-equal to an uninterrupted run (the damaged state never loaded)."""
    tmp, model, rows = base
    data = _write(tmp_path / "d.jsonl", rows)
    args = _iterate(model, data, tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "spin_kernels.cli", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, env=dict(os.environ, TQDM_DISABLE="1"))
    index = tmp_path / "run" / "iter0" / "checkpoints" / "index.json"
    _wait_for(index.exists, proc, "a step checkpoint", timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = index.parent / json.loads(index.read_text())["dir"]
    shard = next(p for p in step.iterdir() if p.name.endswith(".distcp"))
    damage(shard, "flip")
    assert main([*args, "--resume", "--on-stale", "error"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{shard} has other bytes than when it was written" in err and "delete " in err, err
    assert main([*args, "--resume"]) == 0
    assert f"{shard} has other bytes than when it was written" in " ".join(capsys.readouterr().err.split())
    assert main(_iterate(model, data, tmp_path / "fresh")) == 0
    assert _same_weights(tmp_path / "run" / "iter0" / "model", tmp_path / "fresh" / "iter0" / "model")


def test_a_chat_template_changed_before_resume_invalidates_its_rows(base, tmp_path, capsys):
    """The starting model's chat template edited between a run and its --resume: the rows it
    produced (generated, pairs) and the trained model are made again (or refused with --on-stale
    error), and the run ends exactly as a fresh run with the new template."""
    tmp, _, rows = base
    model = shutil.copytree(tmp / "sft", tmp_path / "sft")
    data = _write(tmp_path / "d.jsonl", rows)
    assert main(_iterate(str(model), data, tmp_path / "run")) == 0
    config = json.loads((model / "tokenizer_config.json").read_text())
    template = (model / "chat_template.jinja").read_text() if (model / "chat_template.jinja").exists() else None
    new = "{% for message in messages %}{{ message['content'] }}>{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    if template is not None:
        (model / "chat_template.jinja").write_text(new)
    else:
        (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": new}))
    assert main([*_iterate(str(model), data, tmp_path / "run"), "--resume", "--on-stale", "error"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "generated.jsonl: 12 row(s) cannot be reused (index 0: it was tokenised by another tokenizer" in err, err
    assert main([*_iterate(str(model), data, tmp_path / "run"), "--resume"]) == 0
    assert main(_iterate(str(model), data, tmp_path / "fresh")) == 0
    for name in ("generated.jsonl", "pairs.jsonl"):
        assert (tmp_path / "run" / "iter0" / name).read_text() == (tmp_path / "fresh" / "iter0" / name).read_text()
    assert _same_weights(tmp_path / "run" / "iter0" / "model", tmp_path / "fresh" / "iter0" / "model")


# --------------------------------------------------------------------------- no silent no-op iterations (item 3)


@pytest.mark.parametrize("flags,batch,pairs", [(("--global-batch-pairs", "64"), 64, 12),
                                               (("--max-examples", "3"), 4, 3)],
                         ids=["global batch above the pairs", "max-examples below the global batch"])
def test_a_global_batch_of_every_pair_still_trains(base, tmp_path, capsys, flags, batch, pairs):
    """--global-batch-pairs >= the pairs (or --max-examples below it) and one epoch: one optimizer
    step, which warm-up must not leave at lr 0 (it would train nothing); the note says so and the
    model moves."""
    tmp, model, rows = base
    data = _write(tmp_path / "d.jsonl", rows)
    assert main([*_iterate(model, data, tmp_path / "run"), *flags]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"--global-batch-pairs {batch} >= the {pairs} pairs: each epoch is one optimizer step of {pairs} pairs " \
           f"(1 step(s) in all); the warm-up of ceil(0.1 x 1) = 1 step is dropped" in err, err
    metrics = _jsonl(tmp_path / "run" / "iter0" / "metrics.jsonl")
    assert [m["lr"] for m in metrics] == [1e-3] and metrics[0]["pairs"] == pairs
    assert not _same_weights(tmp_path / "run" / "iter0" / "model", model)


def test_an_iteration_that_changes_no_weight_is_an_error(base, tmp_path, capsys):
    """Updates below the weights' resolution (lr 1e-30): the trained weights come out bit-identical
    to the start, which is an error naming the schedule, not a model to continue from."""
    tmp, model, rows = base
    data = _write(tmp_path / "d.jsonl", rows)
    args = [*_iterate(model, data, tmp_path / "run"), "--learning-rate", "1e-30"]
    assert main(args) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "iter0 train: the trained weights are bit-identical to the starting model" in err
    assert "after 3 optimizer step(s) on 12 pair(s): the iteration learned nothing" in err
    assert "--learning-rate 1e-30, 1 warm-up step(s)" in err
    assert not (tmp_path / "run" / "iter0" / "model").exists()
    assert main([*args, "--resume"]) == 1  # and never taken for a finished iteration


# --------------------------------------------------------------------------- held out means held out (item 4)


def test_eval_data_overlapping_the_training_prompts_is_counted(base, tmp_path, capsys):
    """--eval-data sharing prompts with --data: a warning counts those held-out rows and says what
    their metrics then measure (the run goes on: a toy task with few prompts overlaps by design)."""
    tmp, model, rows = base
    data = _write(tmp_path / "d.jsonl", rows)
    held = [rows[1], {"prompt": "9z", "real": "abc"}, rows[4]]
    evals = _write(tmp_path / "e.jsonl", held)
    assert main([*_iterate(model, data, tmp_path / "run"), "--eval-data", evals]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"--eval-data {evals}: 2 of its 3 row(s) (2 distinct prompt(s), e.g. rows [0, 2]) have a prompt that is " \
           f"also in the training data {data}; the held-out metrics on them score prompts the model trains on" in err, err
    assert len(_jsonl(tmp_path / "run" / "iter0" / "heldout_pairs.jsonl")) == 3


# --------------------------------------------------------------------------- never overwrite inputs (item 5)


@pytest.mark.parametrize("link", ["same path", "symbolic link", "hard link"])
def test_an_output_that_is_an_input_is_refused(base, tmp_path, capsys, link):
    """generate --output that is --data (the same path, a symbolic link to it, a hard link of it),
    and reference --output that is --input: refused before anything is written."""
    tmp, model, rows = base

    def output_for(source):
        if link == "same path":
            return source
        out = source.with_name("out-" + source.name)
        (os.symlink if link == "symbolic link" else os.link)(source, out)
        return out

    data, gen = tmp_path / "d.jsonl", tmp_path / "g.jsonl"
    _write(data, rows)
    _write(gen, [dict(r, synthetic="ab") for r in rows])
    before = data.read_bytes(), gen.read_bytes()
    how = {"same path": "is", "symbolic link": "is a symbolic link to", "hard link": "is a hard link of"}[link]
    flags = ["--device", "cpu", "--max-prompt-length", "8", "--max-length", "40"]
    out = output_for(data)
    assert main(["generate", "--model", model, "--data", str(data), "--output", str(out), "--max-new-tokens", "6",
                 *flags]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--output: '{out}' {how} the input file --data '{data}'; writing it would overwrite the input" in err, err
    out = output_for(gen)
    assert main(["reference", "--model", model, "--input", str(gen), "--output", str(out), *flags]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--output: '{out}' {how} the input file --input '{gen}'" in err, err
    assert (data.read_bytes(), gen.read_bytes()) == before


def test_train_never_writes_over_its_input(base, tmp_path, capsys):
    """train --input OUT/pairs.jsonl would recompute the ref_logps into OUT/pairs.jsonl: refused."""
    tmp, model, rows = base
    out = tmp_path / "t"
    out.mkdir()
    pairs = _write(out / "pairs.jsonl", [dict(r, synthetic="ab", ref_logps=[-1.0, -2.0]) for r in rows])
    before = open(pairs).read()
    assert main(["train", "--model", model, "--input", pairs, "--output-dir", str(out), *FLAGS[:6]]) == 2
    assert "--output-dir: " in capsys.readouterr().err and open(pairs).read() == before
