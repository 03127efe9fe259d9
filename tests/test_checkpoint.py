"""The one checkpoint format (spin_kernels.training.checkpoint) in one process: every state of a run
through the Checkpointer bit for bit, its index, stale and foreign checkpoints, no unrestricted
unpickling; and the Hugging Face export (save_model_dir). Two processes: tests/test_fsdp2.py (a
2-rank checkpoint resumed under FSDP and in one process) and tests/test_training_distributed.py
(kill -9 and resume)."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from spin_kernels.demo.tiny import demo_tokenizer, tiny_llama
from spin_kernels.training.checkpoint import (
    INDEX_FILE,
    Checkpointer,
    latest_checkpoint,
    load_states,
    run_states,
    save_states,
    seed_everything,
)
from spin_kernels.training.config import ConfigError
from spin_kernels.training.provenance import text_digest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from corruption_check import damage  # noqa: E402  (the damages of scripts/corruption_check.py)

VOCAB = 48
BATCH = torch.tensor([[3, 7, 11, 5, 9, 2]])


def _run(seed: int, steps: int):
    """A model, AdamW and a warm-up schedule after ``steps`` optimizer steps."""
    from transformers import get_linear_schedule_with_warmup

    model = tiny_llama(VOCAB, hidden_size=16, layers=1, intermediate_size=32, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = get_linear_schedule_with_warmup(opt, 2, 10)
    for _ in range(steps):
        _step(model, opt, sched)
    return model, opt, sched


def _step(model, opt, sched) -> None:
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.dropout(model(BATCH).logits, 0.5).pow(2).mean().backward()  # draws from torch's RNG
    opt.step()
    sched.step()


def _draws():
    return random.random(), torch.rand(3), np.random.rand()


def _same_model(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_every_state_of_a_run_comes_back_bit_for_bit(tmp_path):
    model, opt, sched = _run(0, 2)
    seed_everything(5)
    _draws()
    Checkpointer(run_states(model, opt, sched), str(tmp_path), key="k", num_steps=10, save_every=2).save(2)
    after_save = _draws()
    _step(model, opt, sched)

    other, other_opt, other_sched = _run(1, 1)  # other weights, optimizer moments, schedule position
    seed_everything(7)
    ckpt = Checkpointer(run_states(other, other_opt, other_sched), str(tmp_path), key="k", num_steps=10, save_every=2)
    assert ckpt.load() == 2
    again = _draws()
    assert again[0] == after_save[0] and torch.equal(again[1], after_save[1]) and again[2] == after_save[2]
    _step(other, other_opt, other_sched)  # the same step from the same states: the same weights
    assert _same_model(model, other)
    assert other_sched.state_dict() == sched.state_dict()
    for k, state in opt.state_dict()["state"].items():
        assert all(torch.equal(v, other_opt.state_dict()["state"][k][n]) for n, v in state.items())


def test_the_index_names_the_latest_checkpoint_not_the_directory_names(tmp_path):
    model, opt, sched = _run(0, 1)
    ckpt = Checkpointer(run_states(model, opt, sched), str(tmp_path), key="k", num_steps=10, save_every=2)
    ckpt.save(1)  # not a multiple of save_every
    assert ckpt.latest() is None and not os.path.exists(ckpt.root)
    ckpt.save(2)
    ckpt.save(4)
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == [INDEX_FILE, "step-4"]
    (root / "step-9").mkdir()  # a save killed before the index named it: a later-looking name, not a checkpoint
    (root / "step-9" / "__0_0.distcp").write_bytes(b"torn")
    entry = latest_checkpoint(str(root))
    assert (entry.step, entry.path, entry.training_key, entry.num_steps, entry.world_size) == \
        (4, str(root / "step-4"), "k", 10, 1)
    ckpt.save(6)
    assert sorted(os.listdir(root)) == [INDEX_FILE, "step-6"]  # the torn directory went with the old one
    json.loads((root / INDEX_FILE).read_text())  # complete JSON: written to a temporary file, then renamed
    ckpt.export(model, None, {"steps": 10})
    assert os.listdir(root) == [] and Checkpointer.finished(str(tmp_path), "k")
    assert not Checkpointer.finished(str(tmp_path), "other")


def test_a_broken_index_is_named_and_never_used(tmp_path, capsys):
    """An index that is not JSON, or names a checkpoint without its .metadata: refused naming it
    and what to delete (--on-stale error), or discarded with a warning (training starts over)."""
    model, opt, sched = _run(0, 1)
    states = run_states(model, opt, sched)
    index = tmp_path / "checkpoints" / INDEX_FILE
    for breaks, named in ((lambda: index.write_text("{"), f"{index} is unreadable"),
                          (lambda: damage(tmp_path / "checkpoints" / "step-2" / ".metadata", "remove"),
                           f"{tmp_path / 'checkpoints' / 'step-2' / '.metadata'} is missing")):
        Checkpointer(states, str(tmp_path), key="k", num_steps=10, save_every=2).save(2)
        breaks()
        with pytest.raises(ConfigError, match=re.escape(named) + r".*delete .*checkpoints to train from the start"):
            Checkpointer(states, str(tmp_path), key="k", num_steps=10, on_stale="error").load()
        assert Checkpointer(states, str(tmp_path), key="k", num_steps=10).load() == 0
        err = " ".join(capsys.readouterr().err.split())
        assert named in err and "the checkpoint is not used and training starts over from step 0" in err
        assert not os.path.exists(index)


DAMAGE = {"flip": "has other bytes than when it was written", "truncate": "is truncated", "zero": "is empty",
          "remove": "is missing"}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_checkpoint_file_is_never_loaded(tmp_path, capsys, how):
    """Every file of a step checkpoint is checked against the index before it is loaded: a damaged
    one is named, and the checkpoint refused or discarded (never loaded: the model keeps the
    weights it had), whichever file it is."""
    model, opt, sched = _run(0, 2)
    Checkpointer(run_states(model, opt, sched), str(tmp_path), key="k", num_steps=10, save_every=2).save(2)
    step = tmp_path / "checkpoints" / "step-2"
    for name in sorted(os.listdir(step)):
        shutil.copytree(step, tmp_path / "kept")
        damage(step / name, how)
        fresh, fresh_opt, fresh_sched = _run(1, 0)
        states = run_states(fresh, fresh_opt, fresh_sched)
        with pytest.raises(ConfigError, match=re.escape(f"{step / name} {DAMAGE[how]}")):
            Checkpointer(states, str(tmp_path), key="k", num_steps=10, on_stale="error").load()
        assert Checkpointer(states, str(tmp_path), key="k", num_steps=10).load() == 0
        assert f"{step / name} {DAMAGE[how]}" in " ".join(capsys.readouterr().err.split())
        assert _same_model(fresh, _run(1, 0)[0])  # nothing was loaded into it
        shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)
        os.makedirs(tmp_path / "checkpoints")
        shutil.copytree(tmp_path / "kept", step)  # the undamaged checkpoint, without its index: write it again
        shutil.rmtree(tmp_path / "kept")
        Checkpointer(run_states(model, opt, sched), str(tmp_path), key="k", num_steps=10, save_every=2).save(2)


def test_a_changed_index_is_never_used(tmp_path, capsys):
    """The index carries a digest of its own content: a byte changed in it (here the step it
    names, which would still read as JSON) is seen."""
    model, opt, sched = _run(0, 2)
    Checkpointer(run_states(model, opt, sched), str(tmp_path), key="k", num_steps=10, save_every=2).save(2)
    index = tmp_path / "checkpoints" / INDEX_FILE
    index.write_text(index.read_text().replace('"step": 2', '"step": 3'))
    assert Checkpointer(run_states(model, opt, sched), str(tmp_path), key="k", num_steps=10).load() == 0
    assert f"{index} has other content than when it was written" in " ".join(capsys.readouterr().err.split())


def test_old_format_checkpoints_are_discarded_with_a_warning(tmp_path, capsys):
    """Step checkpoints of the earlier format (Hugging Face directories with trainer_state.pt, no
    index) cannot be resumed: training starts from step 0, saying what is discarded."""
    old = tmp_path / "checkpoints" / "step-3"
    old.mkdir(parents=True)
    (old / "trainer_state.pt").write_bytes(b"old")
    (old / "model.safetensors").write_bytes(b"old")
    model, opt, sched = _run(0, 0)
    assert Checkpointer(run_states(model, opt, sched), str(tmp_path), key="k", num_steps=10).load() == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "holds step checkpoints of an earlier version (step-3: Hugging Face directories with a trainer_state.pt, " \
           "no index), which cannot be resumed; training starts over from step 0" in err
    assert not old.exists()
    # and those of the first DCP format, whose index records no digests
    Checkpointer(run_states(model, opt, sched), str(tmp_path), key="k", num_steps=10, save_every=2).save(2)
    index = tmp_path / "checkpoints" / INDEX_FILE
    data = {k: v for k, v in json.loads(index.read_text()).items() if k not in ("digest", "files", "tokenizer")}
    index.write_text(json.dumps({**data, "format": "spin_kernels.checkpoint/1"}))
    assert Checkpointer(run_states(model, opt, sched), str(tmp_path), key="k", num_steps=10,
                        on_stale="error").load() == 0
    assert "a checkpoint of an earlier version (format 'spin_kernels.checkpoint/1', without digests of its files), " \
           "which cannot be resumed; training starts over from step 0" in " ".join(capsys.readouterr().err.split())


def test_checkpoints_of_other_inputs_or_schedules_are_not_resumed(tmp_path, capsys):
    model, opt, sched = _run(0, 2)
    Checkpointer(run_states(model, opt, sched), str(tmp_path), key="k", num_steps=10, save_every=2).save(2)
    fresh, fresh_opt, fresh_sched = _run(1, 0)
    states = run_states(fresh, fresh_opt, fresh_sched)
    with pytest.raises(RuntimeError, match="it planned 10 steps, this run 12"):
        Checkpointer(states, str(tmp_path), key="k", num_steps=12).load()
    with pytest.raises(ConfigError, match="--resume: .*step-2 was trained from other inputs"):
        Checkpointer(states, str(tmp_path), key="other", num_steps=10, on_stale="error").load()
    assert Checkpointer(states, str(tmp_path), key="other", num_steps=10).load() == 0
    assert "training starts over" in capsys.readouterr().err
    assert os.listdir(tmp_path / "checkpoints") == [] and _same_model(fresh, _run(1, 0)[0])


def test_rng_states_of_another_number_of_ranks_are_left_out(tmp_path, capsys):
    model, opt, sched = _run(0, 2)
    ckpt = Checkpointer(run_states(model, opt, sched), str(tmp_path), key="k", num_steps=10, save_every=2)
    ckpt.save(2)
    index = tmp_path / "checkpoints" / INDEX_FILE
    data = {k: v for k, v in json.loads(index.read_text()).items() if k != "digest"}
    data["world_size"] = 2  # as if 2 ranks wrote it (the index's own digest written again)
    index.write_text(json.dumps({**data, "digest": text_digest(data)}))
    seed_everything(3)
    before = _draws()
    seed_everything(3)
    other, other_opt, other_sched = _run(1, 0)
    seed_everything(3)
    assert Checkpointer(run_states(other, other_opt, other_sched), str(tmp_path), key="k", num_steps=10).load() == 2
    assert _same_model(model, other) and _draws()[0] == before[0]  # weights loaded, generators untouched
    assert "written by 2 process(es), this run has 1" in capsys.readouterr().err


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_nothing_in_a_checkpoint_is_unpickled_without_restriction(tmp_path):
    """A non-tensor entry loads with weights_only=True, DCP's .metadata through an allow-list: a
    pickled call is refused before it runs."""
    ran = tmp_path / "ran"
    save_states({"x": {"payload": _Payload(str(ran))}}, str(tmp_path / "entry"))
    with pytest.raises(RuntimeError, match="failed: rank 0: UnpicklingError: entry 'x.payload' .*refused, not unpickled .*posix.system"):
        load_states({"x": {"payload": None}}, str(tmp_path / "entry"))
    model, opt, sched = _run(0, 1)
    Checkpointer(run_states(model, opt, sched), str(tmp_path), num_steps=10, save_every=2).save(2)
    metadata = tmp_path / "checkpoints" / "step-2" / ".metadata"
    metadata.write_bytes(pickle.dumps(_Payload(str(ran))))
    with pytest.raises(RuntimeError, match="posix.system is not part of a checkpoint's metadata"):
        load_states(run_states(model, opt, sched), str(tmp_path / "checkpoints" / "step-2"))
    # the Checkpointer does not even read it: the file differs from the index's record
    with pytest.raises(ConfigError, match=re.escape(str(metadata))):
        Checkpointer(run_states(model, opt, sched), str(tmp_path), num_steps=10, on_stale="error").load()
    assert not ran.exists()


def test_save_model_dir_is_atomic_and_replaces(tmp_path):
    from spin_kernels.distributed import read_safetensors, save_model_dir
    from spin_kernels.distributed.export import read_info

    tok = demo_tokenizer()
    model = tiny_llama(len(tok), hidden_size=16, layers=1, intermediate_size=32)
    path = tmp_path / "model"
    os.makedirs(tmp_path / ".tmp-model")  # a save killed halfway
    save_model_dir(model, tok, str(path), extra={"training_key": "k"})
    assert read_info(str(path)) == {"training_key": "k"} and not (tmp_path / ".tmp-model").exists()
    with torch.no_grad():
        next(model.parameters()).add_(1)
    save_model_dir(model, tok, str(path))  # replaced in place
    saved = read_safetensors(str(path))
    assert all(torch.equal(saved[n], p) for n, p in model.state_dict().items())
    assert sorted(os.listdir(tmp_path)) == ["model"]
