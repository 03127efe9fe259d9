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
    ("noasst.jsonl", b'{"messages": [{"role": "user", "content": "0a"}]}\n',
     "noasst.jsonl:1: row 0: field 'messages': the last user turn (message 0) has no assistant turn after it"),
    ("lastuser.jsonl", b'{"messages": [{"role": "user", "content": "0a"}, {"role": "assistant", "content": "ab"}, '
                       b'{"role": "user", "content": "1b"}]}\n',
     "lastuser.jsonl:1: row 0: field 'messages': the last user turn (message 2) has no assistant turn after it"),
    ("nouser.jsonl", b'{"messages": [{"role": "system", "content": "be brief"}, {"role": "assistant", '
                     b'"content": "ab"}]}\n', "nouser.jsonl:1: row 0: field 'messages': no user turn"),
    ("surrogate.jsonl", b'{"prompt": "0a", "real": "ab"}\n{"prompt": "0a", "real": "a\\ud800b"}\n',
     "surrogate.jsonl:2: row 1: the real response (field 'real') holds a lone surrogate '\\ud800' at character 1"),
    ("msurrogate.jsonl", b'{"messages": [{"role": "user", "content": "\\udfff0a"}, {"role": "assistant", '
                         b'"content": "ab"}]}\n', "msurrogate.jsonl:1: row 0: field 'messages': the content of "
                                                  "message 0 holds a lone surrogate '\\udfff' at character 0"),
    ("wrapped.json", b'{\n  "data": [{"prompt": "0a", "real": "ab"}],\n  "version": 2\n}\n',
     "wrapped.json: holds one JSON object (keys ['data', 'version']), not rows: a .json data file holds an array "
     "of rows [{...}, ...], one row, or one row per line; its rows may be in 'data' (1 items): save that array alone"),
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


def test_chat_rows_mean_what_they_say(tmp_path):
    """A ``messages`` row: the real response is the last assistant turn; the prompt is every
    message before it (system turn, earlier user and assistant turns, consecutive user turns),
    tokenised through the chat template as a whole; a single user turn stays its text."""
    from spin_kernels.packing import tokenize_prompt
    from spin_kernels.training.config import DataConfig
    from spin_kernels.training.data import load_sft_data

    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "0a"}, {"role": "assistant", "content": "ab"},
             {"role": "user", "content": "1b"}, {"role": "user", "content": "2c"}, {"role": "assistant", "content": "cd"}]
    rows = [{"messages": turns}, {"messages": turns[1:3]}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_sft_data(DataConfig(data=str(tmp_path / "c.jsonl")))
    assert got == [{"prompt": turns[:5], "real": "cd", "index": 0}, {"prompt": "0a", "real": "ab", "index": 1}]
    tok = demo_tokenizer()
    assert tokenize_prompt(tok, got[0]["prompt"], max_prompt_length=64) == \
        tok(tok.apply_chat_template(turns[:5], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False)["input_ids"]


def test_a_json_file_of_one_row_is_read(tmp_path):
    """Documented handling: a .json file may hold one row object (pretty-printed or not)."""
    from spin_kernels.training.config import DataConfig
    from spin_kernels.training.data import load_sft_data

    (tmp_path / "one.json").write_text(json.dumps({"prompt": "0a", "real": "ab"}, indent=2))
    assert load_sft_data(DataConfig(data=str(tmp_path / "one.json"))) == [{"prompt": "0a", "real": "ab", "index": 0}]


def test_whitespace_only_real_responses_say_what_is_trained(capsys, tmp_path):
    """A real response of whitespace only is not an empty answer: it trains as its whitespace's
    tokens followed by EOS, and the warning says exactly that (empty ones: EOS alone)."""
    from spin_kernels.packing import tokenize_response
    from spin_kernels.training.config import DataConfig
    from spin_kernels.training.data import load_sft_data

    rows = [{"prompt": "0a", "real": "ab"}, {"prompt": "1b", "real": "  \n"}, {"prompt": "2c", "real": ""}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    load_sft_data(DataConfig(data=str(tmp_path / "d.jsonl")))
    err = " ".join(capsys.readouterr().err.split())
    assert "1 row(s) have a real response of whitespace only (e.g. rows [1]); each is trained as its whitespace" in err
    assert "followed by EOS, not as an empty answer" in err
    assert "1 row(s) have an empty real response (e.g. rows [2]); each is trained as a response that ends at once" in err
    tok = demo_tokenizer()
    assert len(tokenize_response(tok, "  \n")) > 1 and tokenize_response(tok, "") == [tok.eos_token_id]


def test_real_responses_ending_with_the_eos_text_get_one_eos(capsys, env, tmp_path):
    """A real response that already ends with the tokenizer's EOS text is tokenised with one EOS,
    the tokens a synthetic response gets; the run says so once, with a count."""
    from spin_kernels.packing import tokenize_example

    tok = demo_tokenizer()
    plain = tokenize_example(tok, "0a", "abc", "abc", max_length=40, max_prompt_length=8)
    ended = tokenize_example(tok, "0a", "abc" + tok.eos_token, "abc", max_length=40, max_prompt_length=8)
    assert ended.real_ids == plain.real_ids == plain.synthetic_ids and ended.real_ids.count(tok.eos_token_id) == 1
    tmp, model, data = env
    rows = [json.loads(line) for line in open(data)]
    rows[0]["real"] += tok.eos_token
    rows[3]["real"] += tok.eos_token
    path = tmp_path / "eos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["iterate", "--model", model, "--data", str(path), "--output-dir", str(tmp_path / "r"),
                 "--iterations", "1", *TINY]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("real response(s) already end with the tokenizer's EOS text") == 1
    assert "2 real response(s) already end with the tokenizer's EOS text '<eos>' (e.g. data rows [0, 3]); it is not " \
           "added twice" in err


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


def _save(model, path):
    tok = demo_tokenizer()
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return str(path)


def test_gpt2_with_fewer_positions_than_max_length_is_refused_before_work(capsys, env, tmp_path):
    """GPT-2's learned positions stop at n_positions: a --max-length past them is refused naming
    both, before generation (no row written), instead of an index error mid-run."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = _save(GPT2LMHeadModel(GPT2Config(vocab_size=len(demo_tokenizer()), n_embd=16, n_layer=1, n_head=2,
                                             n_positions=32)), tmp_path / "gpt2")
    err = _error(capsys, ["iterate", "--model", model, "--data", env[2], "--output-dir", str(tmp_path / "r"), *TINY])
    assert f"model.model: '{model}': gpt2 has learned position embeddings for 32 positions (n_positions), fewer than " \
           f"--max-length 40" in err, err
    assert not (tmp_path / "r" / "iter0" / "generated.jsonl").exists()
    assert main(["iterate", "--model", model, "--data", env[2], "--output-dir", str(tmp_path / "ok"), *TINY,
                 "--max-length", "32", "--iterations", "1"]) == 0  # within its positions it runs


ARCHITECTURES = {
    "bloom": lambda T: T.BloomConfig(vocab_size=20, hidden_size=16, n_layer=1, n_head=2),
    "falcon-alibi": lambda T: T.FalconConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, alibi=True),
    "mpt": lambda T: T.MptConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2),
    "gpt-neo": lambda T: T.GPTNeoConfig(vocab_size=20, hidden_size=16, num_layers=1, num_heads=2,
                                        attention_types=[[["global"], 1]]),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_unsupported_architectures_are_refused_by_prepare_model_and_before_generation(capsys, env, tmp_path, name):
    """ALiBi (Bloom, MPT, Falcon with alibi) and attention outside transformers' AttentionInterface
    (GPT-Neo): the packed passes would compute wrong log-probs. prepare_model refuses them, and so
    does the run, before generation."""
    import transformers

    from spin_kernels.models import prepare_model

    config = ARCHITECTURES[name](transformers)
    why = "ALiBi position biases" if name != "gpt-neo" else "does not run its attention through transformers' " \
                                                            "AttentionInterface"
    config.vocab_size = len(demo_tokenizer())
    path = _save(transformers.AutoModelForCausalLM.from_config(config), tmp_path / name)
    err = _error(capsys, ["iterate", "--model", path, "--data", env[2], "--output-dir", str(tmp_path / "r"), *TINY])
    assert f"model.model: '{path}': " in err and why in err, err
    assert not (tmp_path / "r" / "iter0" / "generated.jsonl").exists()
    with pytest.raises(ValueError, match=why):
        prepare_model(transformers.AutoModelForCausalLM.from_config(config))
    from spin_kernels.models import check_supported

    with pytest.raises(ValueError, match=why):
        check_supported(config)


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


def _other_template(path):
    """The demo tokenizer with another chat template (same vocabulary): saved at ``path``."""
    tok = demo_tokenizer()
    tok.chat_template = "{% for message in messages %}{{ message['content'] }}>{% endfor %}" \
                        "{% if add_generation_prompt %}>{% endif %}"
    tok.save_pretrained(str(path))
    return str(path)


def test_train_pairs_scored_otherwise_are_recomputed_or_refused(capsys, env, pairs, tmp_path):
    """The pairs were scored by the SFT model at --max-length 40 with its tokenizer. Training with
    other lengths, from another model or with another tokenizer (chat template) recomputes the
    ref_logps with training's own model and tokenizer, or refuses with --on-stale error naming
    the difference, whatever the length limits: the result is the model trained on pairs scored
    the right way, never one trained on another model's log-probs."""
    tmp, model, _ = env
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    gen = tmp_path / "g.jsonl"
    generated = ("ref_logps", "reference", "row_digest")  # the generated rows the pairs were made from
    gen.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in generated}) + "\n"
                           for r in pairs))
    short = [a if a != "40" else "30" for a in TRAIN]
    other = save_tiny_model(str(tmp_path / "other"), seed=3)
    template = _other_template(tmp_path / "tok")
    cases = [("lengths", model, short, "ref_logps were computed with max_length 40 (training: 30)"),
             ("model", other, TRAIN, f"the model '{model}' (training starts from '{other}', other weights)"),
             ("tokenizer", model, [*TRAIN, "--tokenizer", template],
              "another tokenizer (vocabulary, special tokens or chat template) than training's")]
    for name, start, flags, difference in cases:
        err = _error(capsys, ["train", "--model", start, "--input", str(path), "--output-dir", str(tmp_path / f"e{name}"),
                              "--on-stale", "error", *flags])
        assert f"{path}:1: ref_logps were computed with" in err and difference in err, err
        assert not (tmp_path / f"e{name}" / "model").exists()
        assert main(["train", "--model", start, "--input", str(path), "--output-dir", str(tmp_path / name), *flags]) == 0
        assert difference in " ".join(capsys.readouterr().err.split())
        # the same training on pairs scored by spin-kernels reference with training's model, tokenizer, lengths
        scored = tmp_path / f"{name}-pairs.jsonl"
        reference_flags = flags[:6] + flags[flags.index("--tokenizer"):] if "--tokenizer" in flags else flags[:6]
        assert main(["reference", "--model", start, "--input", str(gen), "--output", str(scored),
                     *reference_flags]) == 0
        assert main(["train", "--model", start, "--input", str(scored), "--output-dir", str(tmp_path / f"{name}-ok"),
                     *flags]) == 0
        assert _same_weights(tmp_path / name / "model", tmp_path / f"{name}-ok" / "model")
        recomputed = [json.loads(line) for line in (tmp_path / name / "pairs.jsonl").read_text().splitlines()]
        assert [r["ref_logps"] for r in recomputed] == [json.loads(line)["ref_logps"]
                                                        for line in scored.read_text().splitlines()]


def _same_weights(a, b) -> bool:
    from safetensors.torch import load_file

    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_reference_refuses_another_prompt_length_than_generation(capsys, env, pairs, tmp_path):
    path = tmp_path / "g.jsonl"
    generated = ("ref_logps", "reference", "row_digest")
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in generated}) + "\n"
                            for r in pairs))
    err = _error(capsys, ["reference", "--model", env[1], "--input", str(path), "--output", str(tmp_path / "o.jsonl"),
                          "--max-length", "40", "--max-prompt-length", "6", "--device", "cpu"])
    assert "sampled from prompts cut to 8 tokens, but --max-prompt-length is 6" in err


# --------------------------------------------------------------------------- budgets, held-out fraction, LoRA targets, plan


def test_token_budget_below_one_pair_is_refused_before_work(capsys, env, tmp_path):
    """--token-budget below a pair: refused naming the longest pair, before generation when the
    prompt and real response already exceed it, else at the reference pass, naming the pair of
    the pairs file; never an over-budget micro-batch."""
    err = _error(capsys, _iterate(env, "--token-budget", "10", out=str(tmp_path / "r")))
    assert "training.token_budget (10) is below one pair: the longest pair, data row " in err
    assert "(before sampling: its synthetic response counted as one token), packs to" in err, err
    assert not (tmp_path / "r" / "iter0" / "generated.jsonl").exists()
    tmp, model, data = env
    from spin_kernels.packing import tokenize_example

    tok = demo_tokenizer()
    rows = [json.loads(line) for line in open(data)]
    known = max(len(tokenize_example(tok, r["prompt"], r["real"], "", max_length=40, max_prompt_length=8).prompt_ids) * 2
                + len(tokenize_example(tok, r["prompt"], r["real"], "", max_length=40, max_prompt_length=8).real_ids)
                + 1 for r in rows)
    err = _error(capsys, _iterate(env, "--token-budget", str(known), "--max-new-tokens", "20",
                                  out=str(tmp_path / "r2")))
    assert f"training.token_budget ({known}) is below one pair: the longest pair, pairs at " in err, err
    assert "pairs.jsonl lines [" in err
    assert not (tmp_path / "r2" / "iter0" / "pairs.jsonl").exists()


def test_generation_token_budget_below_one_sequence_is_refused(capsys, env, tmp_path):
    err = _error(capsys, _iterate(env, "--generation-token-budget", "10", out=str(tmp_path / "r")))
    assert "generation.generation_token_budget (10) is below one sequence: the longest prompt (data row " in err, err
    assert "plus --max-new-tokens (12) is" in err
    assert not (tmp_path / "r" / "iter0" / "generated.jsonl").exists()


def test_eval_fraction_leaving_no_training_rows_is_refused_before_loading_a_model(capsys, env, tmp_path, monkeypatch):
    from spin_kernels.training.loading import Loader

    loaded = []
    monkeypatch.setattr(Loader, "runner", lambda self, path: loaded.append(path))
    monkeypatch.setattr(Loader, "tokenizer", lambda self, path: loaded.append(path))
    err = _error(capsys, _iterate(env, "--eval-fraction", "0.99", out=str(tmp_path / "r")))
    assert "loop.eval_fraction: --eval-fraction 0.99 holds out all" in err and "nothing to train on" in err
    assert loaded == [] and not (tmp_path / "r" / "config.yaml").exists()


def test_lora_targets_on_the_command_line_work_as_in_yaml(env, tmp_path):
    """--lora-targets q_proj,v_proj adapts exactly those modules, as the YAML list does: the same
    adapter and the same trained weights."""
    cfg = tmp_path / "lora.yaml"
    cfg.write_text("training:\n  lora_rank: 2\n  lora_targets: [q_proj, v_proj]\n")
    assert main(_iterate(env, "--iterations", "1", "--lora-rank", "2", "--lora-targets", "q_proj,v_proj",
                         out=str(tmp_path / "flag"))) == 0
    assert main([*_iterate(env, "--iterations", "1", out=str(tmp_path / "yaml")), "--config", str(cfg)]) == 0
    adapters = [json.loads((tmp_path / r / "iter0" / "model" / "adapter" / "adapter_config.json").read_text())
                for r in ("flag", "yaml")]
    assert [sorted(a["target_modules"]) for a in adapters] == [["q_proj", "v_proj"]] * 2
    assert _same_weights(tmp_path / "flag" / "iter0" / "model", tmp_path / "yaml" / "iter0" / "model")


def test_plan_given_a_jsonl_file_says_what_it_expects(capsys, env):
    rc = main(["plan", env[2]])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and f"model '{env[2]}' is not a config.json: not one JSON object" in err, err
    assert "(a JSONL data file? data goes to --data)" in err


def test_pack_batch_ids_outside_the_vocabulary_are_named():
    from spin_kernels.packing import SpinExample, pack_batch

    good = SpinExample([2, 3], [4, 1], [5, 1], index=7)
    bad = SpinExample([2, 3], [4, 48, 1], [5, 1], index=9)
    assert pack_batch([good, bad]).num_pairs == 2  # without a vocabulary only negative ids are refused
    with pytest.raises(ValueError, match=re.escape("examples[1] (index 9): real_ids holds token id 48 outside the "
                                                   "vocabulary ([0, 48); 1 such id(s))")):
        pack_batch([good, bad], vocab_size=48)
    with pytest.raises(ValueError, match=re.escape("examples[0] (index 3): prompt_ids holds token id -1")):
        pack_batch([SpinExample([-1, 3], [4, 1], [5, 1], index=3)])


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
