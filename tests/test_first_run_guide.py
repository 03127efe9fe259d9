"""docs/first-run.md runs as written: its marked shell blocks, in order, in one bash session.

Markers (an HTML comment on the line before a ```bash block):

* ``<!-- first-run: run -->``: run as written;
* ``<!-- first-run: run, small -->``: run with SMALL appended to every ``spin-kernels iterate``
  command (the page's commands keep the paper's sizes; the tiny model needs the demo's);
* ``<!-- first-run: yours -->``: the reader's own paths; replaced by the tiny model's.

Every ```bash block of the page carries one of them, so no command of the guide goes untested.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "first-run.md"
BLOCK = re.compile(r"(?:<!-- first-run: ([a-z, ]+) -->\n)?```bash\n(.*?)```", flags=re.S)
#: The tiny model's sizes for the commands written for a real model (the demo's settings).
SMALL = ("--device cpu --optimizer adamw --learning-rate 1e-4 --beta 3 --epochs 1 --global-batch-pairs 32 "
         "--max-length 64 --max-prompt-length 8 --max-new-tokens 24 --max-examples 64")
#: What the test puts in place of the reader's paths (written by section 1 of the guide).
YOURS = {"SFT": "tiny/sft", "DATA": "tiny/train.jsonl"}


def guide_blocks() -> list[tuple[str, str]]:
    """(marker, shell text) of every ```bash block of the guide, in order."""
    return [(marker or "", body) for marker, body in BLOCK.findall(GUIDE.read_text())]


def with_small_sizes(body: str) -> str:
    lines = body.replace("\\\n", " ").splitlines()  # one line per command
    return "\n".join(f"{line} {SMALL}" if line.lstrip().startswith("spin-kernels iterate") else line
                     for line in lines)


def guide_script() -> str:
    parts = ["set -euo pipefail"]
    for marker, body in guide_blocks():
        if marker == "yours":
            names = re.findall(r"^(\w+)=", body, flags=re.M)
            assert sorted(names) == sorted(YOURS), f"the 'yours' block sets {names}; the test replaces {list(YOURS)}"
            body = "\n".join(f"{k}={v}" for k, v in YOURS.items())
        elif marker == "run, small":
            sized = with_small_sizes(body)
            assert sized.count(SMALL) == body.count("spin-kernels iterate") > 0, f"nothing to size in {body!r}"
            body = sized
        else:
            assert marker == "run", f"unknown marker {marker!r}"
        parts.append(body)
    return "\n".join(parts) + "\n"


def test_every_shell_block_of_the_guide_is_marked():
    blocks = guide_blocks()
    assert len(blocks) == GUIDE.read_text().count("```bash"), "an unmarked ```bash block would go untested"
    unmarked = [body.splitlines()[0] for marker, body in blocks if not marker]
    assert not unmarked, f"```bash blocks of docs/first-run.md without a first-run marker: {unmarked}"
    markers = {m for m, _ in blocks}
    assert markers <= {"run", "run, small", "yours"} and "yours" in markers, markers


def test_the_guide_script_is_built():
    script = guide_script()  # checks the markers' promises: sizes appended, the reader's paths replaced
    assert script.count(SMALL) == 2 and "SFT=tiny/sft" in script  # the run on "yours" and its resume


@pytest.mark.slow
def test_first_run_guide_commands_run(tmp_path):
    env = dict(os.environ, PATH=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS="1")  # a 77k-parameter model: one thread each, however busy the machine
    env.pop("SPIN_KERNELS_CPU_RULE", None)
    proc = subprocess.run(["bash", "-c", guide_script()], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    # Section 1: the tiny SFT model and its 3 iterations.
    assert (tmp_path / "tiny" / "sft" / "model.safetensors").is_file()
    assert [json.loads(line)["prompt"] for line in (tmp_path / "tiny" / "train.jsonl").open()][:1]
    assert (tmp_path / "runs" / "tiny" / "iter2" / "model" / "model.safetensors").is_file()
    # Sections 3-6: the run on "yours", its summary, and the final model the guide names.
    summary = json.loads((tmp_path / "runs" / "spin" / "summary.json").read_text())
    final = f"runs/spin/iter{summary[-1]['iteration']}/model"
    assert f"final model: {final}" in proc.stdout
    assert (tmp_path / final / "config.json").is_file()
    first_prompt = json.loads((tmp_path / "tiny" / "train.jsonl").open().readline())["prompt"]
    assert f"{first_prompt!r} -> " in proc.stdout  # the model answered the first prompt
    assert "command: spin-kernels iterate --model tiny/sft" in proc.stdout  # the planner filled in the paths


def test_tiny_sft_writes_a_checkpoint_and_its_data(tmp_path):
    """The guide's first command (small sizes): a loadable Hugging Face model with a chat
    template, and JSONL rows in the loop's data format; the same files again for the same seed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spin_kernels.demo.tiny_sft import make_tiny_sft
    from spin_kernels.training.data import read_jsonl

    paths = make_tiny_sft(str(tmp_path / "a"), examples=8, heldout=4, steps=2)
    assert paths == {"model": str(tmp_path / "a" / "sft"), "data": str(tmp_path / "a" / "train.jsonl"),
                     "eval_data": str(tmp_path / "a" / "heldout.jsonl")}
    tok = AutoTokenizer.from_pretrained(paths["model"])
    model = AutoModelForCausalLM.from_pretrained(paths["model"])
    assert tok.chat_template and tok.eos_token_id is not None and model.config.vocab_size == len(tok)
    rows = list(read_jsonl(paths["data"]))
    assert len(rows) == 8 and len(list(read_jsonl(paths["eval_data"]))) == 4
    assert all(set(r) == {"prompt", "real"} and r["prompt"] for r in rows)
    again = make_tiny_sft(str(tmp_path / "b"), examples=8, heldout=4, steps=2)
    for key in ("data", "eval_data"):
        assert pathlib.Path(again[key]).read_text() == pathlib.Path(paths[key]).read_text()
    assert (pathlib.Path(again["model"]) / "model.safetensors").read_bytes() == \
        (pathlib.Path(paths["model"]) / "model.safetensors").read_bytes()


def test_tiny_sft_refuses_a_bad_size(capsys):
    from spin_kernels.demo.tiny_sft import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", "unused", "--steps", "0"])
    assert exc.value.code == 2 and "--steps must be at least 1, got 0" in capsys.readouterr().err
