"""The stages as plans (spin_kernels.training.stages) and the samplers' registry
(spin_kernels.training.samplers): what a plan says about a run's files, that a current stage
loads no model, and that each backend/seeding pair has its one sampler."""

from __future__ import annotations

import json
import os

import pytest
from cases import tiny_model_and_data

from spin_kernels.cli import main
from spin_kernels.training import config_from_dict
from spin_kernels.training.config import ConfigError, SamplingOptions
from spin_kernels.training.loading import Loader

FLAGS = ["--device", "cpu", "--max-length", "40", "--max-prompt-length", "8", "--max-new-tokens", "12",
         "--learning-rate", "1e-3", "--epochs", "1", "--global-batch-pairs", "4", "--generation-batch-size", "4",
         "--save-every", "0"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-iteration run with held-out pairs: (model, data, run directory)."""
    tmp = tmp_path_factory.mktemp("stages")
    model, data = tiny_model_and_data(tmp, 16)
    run = tmp / "run"
    assert main(["iterate", "--model", model, "--data", data, "--output-dir", str(run), "--iterations", "1",
                 "--eval-fraction", "0.25", *FLAGS]) == 0
    return model, data, run


@pytest.fixture
def loads(monkeypatch):
    """The model directories Loader.runner loads during the test."""
    seen = []
    runner = Loader.runner
    monkeypatch.setattr(Loader, "runner", lambda self, path: seen.append(os.path.basename(path)) or runner(self, path))
    return seen


def _plans(model, data, run):
    """Iteration 0's plans of the run, as the loop makes them (no model loaded)."""
    from spin_kernels.training.data import load_sft_data
    from spin_kernels.training.evaluation import split_heldout
    from spin_kernels.training.loop import iteration_stages
    from spin_kernels.training.parallel import session

    cfg = config_from_dict({"model": {"model": model, "device": "cpu"}, "data": {"data": data, "max_length": 40,
                                                                                "max_prompt_length": 8},
                            "generation": {"max_new_tokens": 12, "generation_batch_size": 4},
                            "training": {"learning_rate": 1e-3, "epochs": 1, "global_batch_pairs": 4,
                                         "save_every": 0},
                            "loop": {"output_dir": str(run), "iterations": 1, "eval_fraction": 0.25}}).validate()
    train, heldout = split_heldout(load_sft_data(cfg.data), cfg.loop.eval_fraction, cfg.training.seed)
    with session(cfg) as sess:
        return iteration_stages(cfg, Loader(cfg, sess), 0, train, heldout, model)


def test_a_finished_iteration_plans_current_without_loading_a_model(finished, loads):
    plans = _plans(*finished)
    assert [p.stage for p in plans] == ["generate", "generate", "reference", "reference", "train", "evaluate"]
    assert all(p.current and p.left == "" and p.output is not None for p in plans)
    assert all(isinstance(p.key, str) and len(p.key) >= 32 for p in plans)
    assert plans[4].output.model_dir.endswith(os.path.join("iter0", "model"))
    assert loads == []


def test_plans_say_what_is_left_and_what_waits(finished, loads, tmp_path):
    import shutil

    model, data, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    os.remove(copy / "iter0" / "heldout_eval.json")
    plans = _plans(model, data, copy)
    assert [p.current for p in plans] == [True] * 5 + [False]
    assert plans[5].left.startswith(f"score {len(plans[1].records)} held-out pair(s) with ")
    os.remove(copy / "iter0" / "pairs.jsonl")
    plans = _plans(model, data, copy)
    assert [p.current for p in plans] == [True, True, False, True, False, False]
    assert plans[2].left.startswith(f"score {len(plans[0].records)} pair(s) with ")
    assert plans[4].stage == "train" and plans[4].key is None and "waits for" in plans[4].left  # Pending
    assert loads == []


def test_resume_runs_only_what_is_left_and_loads_only_what_it_needs(finished, loads, tmp_path, capsys):
    """Only the held-out evaluation is missing: the trained model is loaded, never the opponent,
    and the other files are not rewritten."""
    import shutil

    model, data, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    want = json.loads((copy / "iter0" / "heldout_eval.json").read_text())
    os.remove(copy / "iter0" / "heldout_eval.json")
    stamps = {n: os.stat(copy / "iter0" / n).st_mtime_ns for n in ("generated.jsonl", "pairs.jsonl")}
    assert main(["iterate", "--model", model, "--data", data, "--output-dir", str(copy), "--iterations", "1",
                 "--eval-fraction", "0.25", "--resume", *FLAGS]) == 0
    assert loads == ["model"]  # iter0/model, not the starting model "sft"
    assert json.loads((copy / "iter0" / "heldout_eval.json").read_text()) == want
    assert {n: os.stat(copy / "iter0" / n).st_mtime_ns for n in stamps} == stamps


def test_single_stage_commands_load_no_model_when_their_output_is_current(finished, loads, tmp_path):
    model, data, run = finished
    gen, pairs, out = tmp_path / "g.jsonl", tmp_path / "p.jsonl", tmp_path / "train"
    lengths = ["--device", "cpu", "--max-length", "40", "--max-prompt-length", "8"]
    assert main(["generate", "--model", model, "--data", data, "--output", str(gen), "--max-new-tokens", "8",
                 *lengths]) == 0
    assert main(["reference", "--model", model, "--input", str(gen), "--output", str(pairs), *lengths]) == 0
    train = ["train", "--model", model, "--input", str(pairs), "--output-dir", str(out), "--global-batch-pairs", "4",
             "--epochs", "1", "--learning-rate", "1e-3", *lengths]
    assert main(train) == 0
    assert loads == ["sft", "sft", "sft"]
    before = (out / "model" / "model.safetensors").stat().st_mtime_ns
    assert main(["generate", "--model", model, "--data", data, "--output", str(gen), "--max-new-tokens", "8",
                 *lengths]) == 0
    assert main(["reference", "--model", model, "--input", str(gen), "--output", str(pairs), *lengths]) == 0
    assert main([*train, "--resume"]) == 0
    assert loads == ["sft", "sft", "sft"]  # nothing loaded again: every output was current
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == before


# --------------------------------------------------------------------------- the samplers' registry


@pytest.mark.parametrize("settings, name, static, uses_model", [
    ({"generation_seeding": "batch"}, "HfSampler", True, True),
    ({"backend": "hf"}, "HfExampleSampler", True, True),
    ({}, "ContinuousSampler", False, True),
    ({"backend": "vllm"}, "VllmSampler", False, False),
])
def test_each_backend_and_seeding_has_one_sampler(settings, name, static, uses_model):
    from spin_kernels.training.samplers import check_processes, choose

    cfg = SamplingOptions(**settings)
    cls = choose(cfg)
    assert (cls.__name__, cls.static_batches, cls.uses_model) == (name, static, uses_model)
    check_processes(cfg, sharded=False)
    if cls.one_process:
        with pytest.raises(ConfigError, match="generation.backend: 'vllm' runs in one process"):
            check_processes(cfg, sharded=True)
    else:
        check_processes(cfg, sharded=True)


def test_vllm_under_fsdp_is_refused_before_work_by_the_same_rule():
    from spin_kernels.training.parallel import resolve_fsdp

    cfg = config_from_dict({"generation": {"backend": "vllm"}, "distributed": {"fsdp": True}})
    with pytest.raises(ConfigError, match="generation.backend: 'vllm' runs in one process; use 'hf' or 'continuous'"):
        resolve_fsdp(cfg)
