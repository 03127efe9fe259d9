"""The bad-input catalogue: every input a user can get wrong, across the CLI, the data files, the
model directory, the stage files and the ops. Each case asserts an error that names the flag /
field / file (and line) before any work starts, or the documented handling; none ends with exit
0 and a wrong or non-finite model.
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

from cases import make_case
from spin_kernels import linear_logprobs, linear_spin_loss
from spin_kernels.cli import main
from spin_kernels.demo.task import MarkovTask
from spin_kernels.demo.tiny import demo_tokenizer, save_tiny_model

TRAIN = ["--device", "cpu", "--max-length", "40", "--max-prompt-length", "8", "--learning-rate", "1e-3", "--epochs",
         "1", "--global-batch-pairs", "4"]
TINY = [*TRAIN, "--max-new-tokens", "12"]
REFERENCE = ["--device", "cpu", "--max-length", "40", "--max-prompt-length", "8"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    model = save_tiny_model(str(tmp / "sft"))
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MarkovTask().sample(8, seed=1)))
    return tmp, model, str(data)


def _error(capsys, argv, code=2):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == code, err[-2000:]
    return " ".join(err.split())


def _iterate(env, *extra, out="run"):
    tmp, model, data = env
    return ["iterate", "--model", model, "--data", data, "--output-dir", str(tmp / out), *TINY, *extra]


# --------------------------------------------------------------------------- flags and YAML (parse time)

FLAGS = [
    (["--learning-rate", "inf"], "training.learning_rate: must be a finite number, got inf"),
    (["--learning-rate", "nan"], "training.learning_rate: must be a finite number, got nan"),
    (["--beta=-inf"], "training.beta: must be a finite number"),
    (["--temperature", "nan"], "generation.temperature: must be a finite number"),
    (["--max-grad-norm", "inf"], "training.max_grad_norm: must be a finite number"),
    (["--weight-decay", "-0.1"], "training.weight_decay: must be >= 0, got -0.1"),
    (["--save-every", "-1"], "training.save_every: must be >= 0, got -1"),
    (["--log-every", "0"], "training.log_every: must be > 0, got 0"),
    (["--epochs", "0"], "training.epochs: must be > 0"),
    (["--global-batch-pairs", "0"], "training.global_batch_pairs: must be > 0"),
    (["--token-budget", "-5"], "training.token_budget: must be > 0"),
    (["--max-length", "8"], "data.max_prompt_length (8) must be < data.max_length (8)"),
    (["--top-p", "1.5"], "generation.top_p: must be in (0, 1]"),
    (["--top-p", "0"], "generation.top_p: must be > 0"),
    (["--temperature", "0"], "generation.temperature: must be > 0"),
    (["--warmup-ratio", "1.0"], "training.warmup_ratio: must be in [0, 1)"),
    (["--iterations", "0"], "loop.iterations: must be > 0"),
    (["--max-examples", "0"], "data.max_examples: must be >= 1 or none"),
    (["--max-new-tokens", "40"], "generation.max_new_tokens (40): a prompt of up to data.max_prompt_length (8)"),
    (["--on-stale", "ignore"], "data.on_stale): expected one of 'regenerate', 'error'"),
    (["--dtype", "float16"], "model.dtype: float16 weights cannot be trained correctly"),
    (["--dtype", "bfloat16"], "model.dtype: bfloat16 weights cannot be trained correctly"),
    (["--mixed-precision", "fp16"], "distributed.mixed_precision: fp16 training needs loss scaling"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "model.device: 'cuda"),
    (["--device", "tpu"], "model.device"),
    (["--impl", "triton"], "training.impl: 'triton' needs a CUDA device"),
]


@pytest.mark.parametrize("flags,message", FLAGS, ids=[" ".join(f) for f, _ in FLAGS])
def test_bad_flag_names_it(capsys, env, flags, message, tmp_path):
    err = _error(capsys, _iterate(env, *flags, out=str(tmp_path / "r")))
    assert message in err
    assert not os.path.exists(tmp_path / "r" / "config.yaml")  # refused before the run directory is written


YAML = [
    ("training:\n  learning_rate: .inf\n", "training.learning_rate: must be a finite number, got inf"),
    ("training:\n  beta: .nan\n", "training.beta: must be a finite number, got nan"),
    ("generation:\n  top_p: -.inf\n", "generation.top_p: must be a finite number"),
]


@pytest.mark.parametrize("text,message", YAML, ids=["lr inf", "beta nan", "top_p -inf"])
def test_bad_yaml_value_names_it(capsys, env, tmp_path, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert message in _error(capsys, [*_iterate(env, out=str(tmp_path / "r")), "--config", str(cfg)])


def test_dtype_float16_is_fine_for_inference_stages(capsys, env, tmp_path):
    """Half-precision weights are refused for training only: generate/reference accept them."""
    tmp, model, data = env
    out = tmp_path / "g.jsonl"
    assert main(["generate", "--model", model, "--data", data, "--output", str(out), "--dtype", "bfloat16",
                 "--device", "cpu", "--max-new-tokens", "4", "--max-prompt-length", "8", "--max-length", "40"]) == 0
    assert len(out.read_text().splitlines()) == 8


def test_output_dir_that_is_a_file(capsys, env, tmp_path):
    (tmp_path / "f").write_text("x")
    assert "loop.output_dir: " in (err := _error(capsys, _iterate(env, out=str(tmp_path / "f"))))
    assert "is a file, not a directory" in err


def test_output_dir_that_cannot_be_created(capsys, env):
    err = _error(capsys, _iterate(env, out="/proc/spin-kernels-test/run"))
    assert "loop.output_dir: cannot create '/proc/spin-kernels-test/run'" in err


def test_generate_output_that_is_a_directory(capsys, env, tmp_path):
    tmp, model, data = env
    err = _error(capsys, ["generate", "--model", model, "--data", data, "--output", str(tmp_path), "--device", "cpu"])
    assert "--output: " in err and "is a directory; give a file name" in err


# --------------------------------------------------------------------------- data files


def _data_error(capsys, env, path, message):
    err = _error(capsys, ["iterate", "--model", env[1], "--data", str(path), "--output-dir", str(path) + ".run",
                          *TINY])
    assert message in err, err
    assert str(path) in err or "data.data" in err


DATA = [
    ("bad.jsonl", b'{"prompt": "0a", "real": "ab"}\n{"prompt": "\xff\xfe", "real": "a"}\n',
     "bad.jsonl:2: not UTF-8 text (byte 0xff"),
    ("list.jsonl", b'{"prompt": "0a", "real": "ab"}\n["0a", "ab"]\n', "list.jsonl:2: row 1: a row must be a JSON object"),
    ("str.jsonl", b'"0a"\n', "row 0: a row must be a JSON object, got str"),
    ("json.jsonl", b'{"prompt": "0a", "real": "ab"\n', "json.jsonl:1: not valid JSON"),
    ("fields.jsonl", b'{"question": "0a", "answer": "ab"}\n', "needs fields 'prompt' and 'real', or 'messages'"),
    ("arr.json", b'[{"prompt": "0a", "real": "ab"}, 3]\n', "arr.json: row 1: a row must be a JSON object, got int"),
    ("badarr.json", b'[{"prompt": "0a", "real": "ab"},\n', "badarr.json:2: not valid JSON"),
    ("msgs.jsonl", b'{"messages": "hello"}\n', "field 'messages': chat messages must be a non-empty list"),
    ("role.jsonl", b'{"messages": [{"content": "0a"}, {"role": "assistant", "content": "ab"}]}\n',
     "field 'messages': message 0 lacks ['role']"),
    ("content.jsonl", b'{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "ab"}]}\n',
     "message 0 needs a string 'role' and a string 'content'"),
    ("noasst.jsonl", b'{"messages": [{"role": "user", "content": "0a"}]}\n', "needs a user and an assistant turn"),
    ("pmsg.jsonl", b'{"prompt": [{"role": "user", "content": "0a"}, {"role": "assistant", "content": "a"}], '
                   b'"real": "ab"}\n', "the prompt's last message is the assistant's"),
    ("pempty.jsonl", b'{"prompt": [], "real": "ab"}\n', "chat messages must be a non-empty list"),
    ("prompt.jsonl", b'{"prompt": "", "real": "ab"}\n', "the prompt (field 'prompt') is empty"),
    ("space.jsonl", b'{"prompt": "   ", "real": "ab"}\n', "the prompt (field 'prompt') is empty"),
    ("num.jsonl", b'{"prompt": "0a", "real": 3}\n', "the real response (field 'real') must be a string, got int"),
    ("ptype.jsonl", b'{"prompt": 7, "real": "ab"}\n', "must be a string or chat messages, got int"),
    ("empty.jsonl", b"\n\n", "holds no examples"),
    ("d.csv", b"prompt,real\n0a,ab\n", "unsupported file type"),
    ("bad.parquet", b"not parquet", "is not a readable Parquet file"),
]


@pytest.mark.parametrize("name,content,message", DATA, ids=[d[0] for d in DATA])
def test_bad_data_file_names_file_line_and_field(capsys, env, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    _data_error(capsys, env, path, message)


def test_missing_data_file_and_non_dataset_directory(capsys, env, tmp_path):
    _data_error(capsys, env, tmp_path / "missing.jsonl", "neither a file, a directory nor a loadable datasets")
    (tmp_path / "dir").mkdir()
    _data_error(capsys, env, tmp_path / "dir", "is a directory but not one written by datasets.save_to_disk")


def test_json_array_is_read(tmp_path):
    """Documented handling: a .json file may hold one array of rows (as well as JSON lines)."""
    from spin_kernels.training.config import DataConfig
    from spin_kernels.training.data import load_sft_data

    rows = [{"prompt": "0a", "real": "ab"}, {"prompt": "1b", "real": "ba"}]
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    assert load_sft_data(DataConfig(data=str(tmp_path / "d.json"))) == [dict(r, index=i) for i, r in enumerate(rows)]


def test_duplicate_prompts_and_empty_responses_are_counted(capsys, tmp_path):
    """Documented handling: kept, with a warning that counts them."""
    from spin_kernels.training.config import DataConfig
    from spin_kernels.training.data import load_sft_data

    rows = [{"prompt": "0a", "real": "ab"}, {"prompt": "0a", "real": "b"}, {"prompt": "0a", "real": ""},
            {"prompt": "1b", "real": "a"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_sft_data(DataConfig(data=str(tmp_path / "d.jsonl")))) == 4
    err = capsys.readouterr().err
    assert "2 row(s) repeat an earlier row's prompt (1 distinct prompt(s)" in err
    assert "1 row(s) have an empty real response (e.g. rows [2])" in err


# --------------------------------------------------------------------------- the model directory


def test_model_dir_without_config_or_weights(capsys, env, tmp_path):
    (tmp_path / "m").mkdir()
    err = _error(capsys, ["iterate", "--model", str(tmp_path / "m"), "--data", env[2], *TINY])
    assert "model.model" in err and "no config.json" in err
    (tmp_path / "m" / "config.json").write_text("{}")
    err = _error(capsys, ["iterate", "--model", str(tmp_path / "m"), "--data", env[2], *TINY])
    assert "model.model" in err and "holds no weights (*.safetensors" in err


def _model_copy(env, tmp_path, keep=lambda name: True):
    import shutil

    dst = tmp_path / "copy"
    dst.mkdir()
    for name in os.listdir(env[1]):
        if keep(name):
            shutil.copy(os.path.join(env[1], name), dst / name)
    return str(dst)


def test_model_dir_without_tokenizer(capsys, env, tmp_path):
    model = _model_copy(env, tmp_path, keep=lambda n: n in ("config.json", "model.safetensors",
                                                            "generation_config.json"))
    err = _error(capsys, ["iterate", "--model", model, "--data", env[2], "--output-dir", str(tmp_path / "r"), *TINY])
    assert "model.model: no usable tokenizer in" in err and "pass --tokenizer DIR" in err


def test_tokenizer_larger_than_the_vocabulary(capsys, env, tmp_path):
    big = demo_tokenizer("abcdefghijklmnopqrstuvwxyz")
    big.save_pretrained(str(tmp_path / "tok"))
    err = _error(capsys, _iterate(env, "--tokenizer", str(tmp_path / "tok"), out=str(tmp_path / "r")))
    assert "model.tokenizer: the tokenizer at" in err and "tokens but the model's vocabulary has" in err


def test_tokenizer_without_chat_template_says_which_format(capsys, env, tmp_path):
    """Documented handling: the plain 'User: ...\\n\\nAssistant:' format, announced on stderr."""
    from spin_kernels.training.loading import load_tokenizer

    tok = demo_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(str(tmp_path / "plain"))
    load_tokenizer(str(tmp_path / "plain"))
    err = capsys.readouterr().err
    assert "has no chat template; prompts are formatted as 'User: {prompt}" in err


def test_model_with_nan_weights_is_refused(capsys, env, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model_copy(env, tmp_path)
    weights = load_file(os.path.join(model, "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, os.path.join(model, "model.safetensors"), metadata={"format": "pt"})
    err = _error(capsys, ["iterate", "--model", model, "--data", env[2], "--output-dir", str(tmp_path / "r"), *TINY])
    assert "the weights hold NaN/inf values" in err and "model.norm.weight" in err
    assert not os.path.exists(tmp_path / "r" / "iter0" / "model")


# --------------------------------------------------------------------------- stage files (train / reference --input)


@pytest.fixture(scope="module")
def pairs(env):
    """A valid pairs file (generate -> reference) to break line by line."""
    tmp, model, data = env
    gen, out = tmp / "gen.jsonl", tmp / "pairs.jsonl"
    assert main(["generate", "--model", model, "--data", data, "--output", str(gen), "--device", "cpu",
                 "--max-new-tokens", "6", "--max-prompt-length", "8", "--max-length", "40"]) == 0
    assert main(["reference", "--model", model, "--input", str(gen), "--output", str(out), "--device", "cpu",
                 "--max-length", "40", "--max-prompt-length", "8"]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


REF = [
    (None, "field 'ref_logps' must be a list of 2 numbers"),
    ("-3.0", "field 'ref_logps' must be a list of 2 numbers [log p(real), log p(synthetic)], got str"),
    (["-3.0", -2.0], "field 'ref_logps' must hold numbers, got str '-3.0'"),
    ([True, -2.0], "field 'ref_logps' must hold numbers, got bool"),
    ([-1.0], "got 1 values"),
    ([-1.0, -2.0, -3.0], "got 3 values"),
    ([float("nan"), -2.0], "field 'ref_logps' holds nan; log-probabilities must be finite"),
    ([-1.0, float("-inf")], "field 'ref_logps' holds -inf"),
    ([0.5, -2.0], "field 'ref_logps' holds 0.5 > 0; a log-probability is <= 0"),
]


@pytest.mark.parametrize("value,message", REF, ids=[f"ref_logps={v!r}" for v, _ in REF])
def test_bad_ref_logps_name_file_line_and_field(capsys, env, pairs, tmp_path, value, message):
    rows = [dict(r) for r in pairs]
    rows[2]["ref_logps"] = value
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json writes NaN/-Infinity literally
    err = _error(capsys, ["train", "--model", env[1], "--input", str(path), "--output-dir", str(tmp_path / "t"),
                          *TRAIN])
    assert f"--input: {path}:3: row 2: {message}" in err or (f"{path}:3: row 2:" in err and message in err)
    assert not os.path.exists(tmp_path / "t" / "model")


STAGE = [
    ("synthetic", "delete", "lacks ['synthetic']"),
    ("synthetic", 5, "field 'synthetic' must be a string, got int"),
    ("prompt", [{"role": "user", "content": "0a"}, {"role": "assistant", "content": "a"}],
     "the prompt's last message is the assistant's"),
    ("real", None, "the real response (field 'real') must be a string, got NoneType"),
]


@pytest.mark.parametrize("field,value,message", STAGE, ids=[f"{f}={v!r}" for f, v, _ in STAGE])
def test_bad_stage_rows_name_file_line_and_field(capsys, env, pairs, tmp_path, field, value, message):
    rows = [dict(r) for r in pairs]
    if value == "delete":
        del rows[1][field]
    else:
        rows[1][field] = value
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for cmd in (["train", "--output-dir", str(tmp_path / "t"), *TRAIN],
                ["reference", "--output", str(tmp_path / "o.jsonl"), *REFERENCE]):
        err = _error(capsys, [cmd[0], "--model", env[1], "--input", str(path), *cmd[1:]])
        assert f"{path}:2: row 1:" in err and message in err, err


def test_train_lengths_differ_from_the_reference(capsys, env, pairs, tmp_path):
    """The pairs' ref_logps were computed at --max-length 40: training at 30 recomputes them with the
    same (starting) model; with another model, or --on-stale error, it refuses."""
    tmp, model, _ = env
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    short = [a if a != "40" else "30" for a in TRAIN]
    other = save_tiny_model(str(tmp_path / "other"), seed=3)
    err = _error(capsys, ["train", "--model", other, "--input", str(path), "--output-dir", str(tmp_path / "a"),
                          *short])
    assert "ref_logps were computed with max_length 40 (training: 30)" in err
    assert "they come from another model" in err
    err = _error(capsys, ["train", "--model", model, "--input", str(path), "--output-dir", str(tmp_path / "b"),
                          "--on-stale", "error", *short])
    assert "ref_logps were computed with max_length 40 (training: 30)" in err
    assert main(["train", "--model", model, "--input", str(path), "--output-dir", str(tmp_path / "c"), *short]) == 0
    assert "they are recomputed with" in capsys.readouterr().err
    recomputed = [json.loads(line) for line in (tmp_path / "c" / "pairs.jsonl").read_text().splitlines()]
    assert all(r["reference"]["max_length"] == 30 for r in recomputed)


def test_reference_refuses_another_prompt_length_than_generation(capsys, env, pairs, tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("ref_logps", "reference")}) + "\n"
                            for r in pairs))
    err = _error(capsys, ["reference", "--model", env[1], "--input", str(path), "--output", str(tmp_path / "o.jsonl"),
                          "--max-length", "40", "--max-prompt-length", "6", "--device", "cpu"])
    assert "sampled from prompts cut to 8 tokens, but --max-prompt-length is 6" in err


# --------------------------------------------------------------------------- the ops (check_values=True)


@pytest.fixture
def case():
    return make_case([4, 5, 3, 6], 8, 20)


def _counted_row(case):
    return int(torch.nonzero(case.targets != -100)[0])


def _ignored_row(case):
    return int(torch.nonzero(case.targets == -100)[0])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_hidden_in_a_counted_row(case, value):
    hidden = case.hidden.detach().clone()
    row = _counted_row(case)
    hidden[row, 3] = value
    with pytest.raises(ValueError, match=re.escape(f"hidden holds NaN/inf in counted rows (rows with a target), "
                                                   f"e.g. rows [{row}]")):
        linear_spin_loss(hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps)
    with pytest.raises(ValueError, match="hidden holds NaN/inf"):
        linear_logprobs(hidden, case.weight, case.targets, case.cu_seqlens)


def test_nonfinite_hidden_in_an_ignored_row_is_harmless(case):
    """Documented: ignored rows take no part in the loss, so their values are not checked."""
    hidden = case.hidden.detach().clone()
    hidden[_ignored_row(case)] = float("nan")
    loss, _ = linear_spin_loss(hidden, case.weight, case.targets, case.cu_seqlens, case.ref_logps, impl="torch")
    want, _ = linear_spin_loss(case.hidden.detach(), case.weight, case.targets, case.cu_seqlens, case.ref_logps,
                               impl="torch")
    assert torch.equal(loss, want)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_ref_logps(case, value):
    ref = case.ref_logps.clone()
    ref[2] = value
    with pytest.raises(ValueError, match=re.escape("ref_logps must be finite, got NaN/inf at sequences [2]")):
        linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, ref)


def test_unchecked_values_are_not_read(case):
    """check_values=False skips the value checks (the documented opt-out): no error raised."""
    ref = case.ref_logps.clone()
    ref[0] = float("nan")
    loss, _ = linear_spin_loss(case.hidden, case.weight, case.targets, case.cu_seqlens, ref, check_values=False)
    assert math.isnan(loss.item())


def test_metrics_are_float64_for_float64_inputs():
    c = make_case([4, 5, 3, 6], 8, 20, dtype=torch.float64)
    loss, metrics = linear_spin_loss(c.hidden, c.weight, c.targets, c.cu_seqlens, c.ref_logps.double(), impl="torch")
    assert loss.dtype == torch.float64
    assert {v.dtype for v in metrics.values()} == {torch.float64}
    c32 = make_case([4, 5, 3, 6], 8, 20)
    _, metrics32 = linear_spin_loss(c32.hidden, c32.weight, c32.targets, c32.cu_seqlens, c32.ref_logps)
    assert {v.dtype for v in metrics32.values()} == {torch.float32}
