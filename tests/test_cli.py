"""The `spin-kernels` command: --help and clear errors for bad configurations."""

from __future__ import annotations

import json

import pytest

from spin_kernels.cli import main


def _help(capsys, *argv):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_top_level_help_lists_subcommands(capsys):
    text = _help(capsys)
    for cmd in ("generate", "reference", "train", "iterate", "demo", "ops-demo", "plan"):
        assert cmd in text


@pytest.mark.parametrize("flag, default", [
    ("--beta X", "(paper: 0.1) (default: 0.1)"),
    ("--learning-rate X", "(default: 5e-07)"),
    ("--optimizer {rmsprop,adamw}", "(default: rmsprop)"),
    ("--warmup-ratio X", "(paper: 0.1) (default: 0.1)"),
    ("--global-batch-pairs N", "(paper: global batch 64) (default: 64)"),
    ("--max-length N", "(default: 1024)"),
    ("--max-prompt-length N", "(default: 512)"),
    ("--temperature X", "(default: 1.0)"),
    ("--top-p X", "(default: 1.0)"),
    ("--max-new-tokens N", "(default: 256)"),
    ("--resume,", "(default: False)"),
])
def test_iterate_help_documents_paper_defaults(capsys, flag, default):
    text = _help(capsys, "iterate")
    options = text[text.index("show this help"):]  # past the usage line
    entry = options[options.index(flag + " "):]
    entry = entry[:entry.index(")", entry.index("(default:")) + 1]  # up to this option's default
    assert entry.endswith(default)


def test_every_subcommand_has_help(capsys):
    for cmd in ("generate", "reference", "train", "demo"):
        assert "--config YAML" in _help(capsys, cmd)
    assert "--input INPUT" in _help(capsys, "train")
    assert "(default: 3)" in _help(capsys, "demo")  # the demo's own defaults are shown


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "0a", "real": "ab"}) + "\n")
    return str(path)


def _error(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_missing_files_are_named(capsys, tmp_path, data):
    err = _error(capsys, ["iterate", "--model", str(tmp_path / "nope"), "--data", data])
    assert "model.model" in err and "not a model directory" in err
    from spin_kernels.demo.tiny import save_tiny_model

    model = save_tiny_model(str(tmp_path / "m"))
    err = _error(capsys, ["iterate", "--model", model, "--data", str(tmp_path / "missing.jsonl"),
                          "--output-dir", str(tmp_path / "r")])
    assert "data.data" in err and "missing.jsonl" in err
    err = _error(capsys, ["train", "--model", model, "--input", str(tmp_path / "pairs.jsonl")])
    assert "--input: file not found" in err
    err = _error(capsys, ["iterate", "--config", str(tmp_path / "c.yaml")])
    assert "--config: file not found" in err
    err = _error(capsys, ["iterate", "--data", data])
    assert "model.model: required" in err


def test_bad_values_name_the_field(capsys, tmp_path):
    err = _error(capsys, ["iterate", "--beta", "abc"])
    assert "--beta (training.beta): expected float, got str 'abc'" in err
    err = _error(capsys, ["iterate", "--epochs", "2.5"])
    assert "--epochs (training.epochs): expected int" in err
    err = _error(capsys, ["iterate", "--warmup-ratio", "1.5"])
    assert "training.warmup_ratio: must be in [0, 1)" in err
    with pytest.raises(SystemExit):  # choices and unknown flags: argparse's own errors
        main(["iterate", "--betta", "0.1"])
    assert "unrecognized arguments: --betta" in capsys.readouterr().err


@pytest.mark.parametrize("yaml_text, message", [
    ("training:\n  betta: 0.1\n", "training.betta: unknown field (did you mean 'beta'?)"),
    ("training:\n  beta: high\n", "training.beta: expected float, got str 'high'"),
    ("trainig:\n  beta: 0.1\n", "trainig: unknown field (did you mean 'training'?)"),
    ("training: [1, 2]\n", "training: expected a mapping"),
    ("training: {beta: 0.1\n", "is not valid YAML"),
])
def test_bad_yaml_names_the_field(capsys, tmp_path, yaml_text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    assert message in _error(capsys, ["iterate", "--config", str(cfg)])


def test_yaml_then_flags(tmp_path):
    from spin_kernels.training.flags import SectionParser

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("training:\n  beta: 0.5\n  learning_rate: 1e-6\n  epochs: 3\n")
    parser = SectionParser({"training": None})
    cfg, _ = parser.parse_args_and_config(["--config", str(cfg_file), "--epochs", "4", "--no-bf16"])
    t = cfg.training
    assert (t.beta, t.learning_rate, t.epochs, t.bf16, t.optimizer) == (0.5, 1e-6, 4, False, "rmsprop")


def test_ops_demo_still_reachable(capsys):
    assert main(["ops-demo", "--pairs", "1", "--seq-len", "16", "--prompt-len", "4", "--hidden", "8",
                 "--vocab", "32", "--impl", "torch"]) == 0
    assert "loss" in capsys.readouterr().out


def test_plan_is_dispatched_to_the_planner(capsys):
    assert main(["plan", "llama3-8b", "--gpus", "1", "--no-recommend"]) in (0, 1)
    assert "requested configuration" in capsys.readouterr().out
