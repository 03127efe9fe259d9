"""The flags of the config sections (spin_kernels.training.flags): every flag reads as its YAML
field does, booleans have three states, and the parser stays on HfArgumentParser's public API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spin_kernels.training.config import ConfigError, config_from_dict
from spin_kernels.training.flags import SectionParser

ALL = {"model": None, "data": None, "generation": None, "training": None, "loop": None, "distributed": None}


def _parse(*argv):
    return SectionParser(ALL).parse_args_and_config(list(argv))[0]


def test_flags_read_as_the_yaml_fields_do():
    """Lists per iteration, comma lists, none, a bare optional-value flag: the same config as YAML."""
    flags = _parse("--learning-rate", "1e-4,5e-5", "--beta", "0.1,5", "--epochs", "2", "--lora-targets",
                   "q_proj,v_proj", "--max-grad-norm", "none", "--include-previous", "--iterations", "2")
    yaml = config_from_dict({"training": {"learning_rate": [1e-4, 5e-5], "beta": [0.1, 5.0], "epochs": 2,
                                          "lora_targets": ["q_proj", "v_proj"], "max_grad_norm": None},
                             "loop": {"include_previous": 1, "iterations": 2}})
    assert flags == yaml
    assert flags.training.lora_targets == ["q_proj", "v_proj"] and flags.training.beta == [0.1, 5.0]
    assert _parse("--lora-targets", "q_proj").training.lora_targets == ["q_proj"]


@pytest.mark.parametrize("argv, fsdp", [([], None), (["--fsdp"], True), (["--no-fsdp"], False)])
def test_optional_bool_has_three_states(argv, fsdp):
    assert _parse(*argv).distributed.fsdp is fsdp


def test_yaml_below_flags_and_unset_flags_keep_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  bf16: false\n  beta: 0.5\ndistributed:\n  fsdp: true\n")
    cfg = _parse("--config", str(path), "--beta", "0.2")
    assert (cfg.training.bf16, cfg.training.beta, cfg.distributed.fsdp) == (False, 0.2, True)
    assert _parse("--config", str(path), "--bf16", "--no-fsdp").training.bf16 is True


def test_parse_args_and_config_returns_the_config_extra_sections_and_other_arguments():
    from spin_kernels.demo.run import DemoConfig

    parser = SectionParser({"training": ("beta", "epochs")}, extra=(DemoConfig(seeds=2),))
    parser.add_argument("--output", required=True)
    cfg, demo, other = parser.parse_args_and_config(["--beta", "0.3", "--epochs", "1,2", "--output", "o.jsonl",
                                                     "--threads", "1"])
    assert (cfg.training.beta, cfg.training.epochs) == (0.3, [1, 2]) and cfg.data == config_from_dict({}).data
    assert (demo.threads, demo.seeds) == (1, 2) and (other.output, other.config) == ("o.jsonl", None)


@pytest.mark.parametrize("argv, message", [
    (["--beta", "0.1,x"], "--beta (training.beta)[1]: expected float, got str 'x'"),
    (["--fsdp", "--max-examples", "many"], "--max-examples (data.max_examples): expected int or none"),
    (["--learning-rate", "1e-4,nan"], "training.learning_rate[1]: must be a finite number, got nan"),
    (["--optimizer", "sgd"], "--optimizer (training.optimizer): expected one of 'rmsprop', 'adamw'"),
])
def test_bad_text_names_flag_and_field(argv, message):
    with pytest.raises(ConfigError) as err:
        _parse(*argv)
    assert message in str(err.value)


@pytest.mark.parametrize("typo, meant", [("--betta", "--beta"), ("--max_length", "--max-length"),
                                         ("--no-bf61", "--no-bf16")])
def test_mistyped_flag_gets_did_you_mean(capsys, typo, meant):
    with pytest.raises(SystemExit):
        _parse(typo, "1")
    assert f"{typo} (did you mean {meant}?)" in capsys.readouterr().err


def test_only_public_argparse_and_hf_api():
    """No private argparse tables or HfArgumentParser methods are read, overridden or edited."""
    root = Path(__file__).resolve().parents[1] / "spin_kernels" / "training"
    for name in ("flags.py", "config.py"):
        text = (root / name).read_text()
        assert not re.findall(r"\._(?:actions|option_string_actions|parse_|add_dataclass|registr|get_)\w*|"
                              r"def _(?:parse|add|get)_\w+|_SubParsersAction|_StoreAction", text), name
