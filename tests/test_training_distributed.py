"""The SPIN loop under torchrun with FSDP2 (2 processes, gloo, CPU, float32) against one process.

One iteration of ``spin-kernels iterate`` on a tiny Llama (tied embeddings): generation, reference log-probs and
training run on both ranks (each its share of the prompts and of every global batch: 25 pairs in
batches of 8, so the last step has one pair and one rank an empty micro-batch; 5 generation
batches over 2 ranks, so the last round has a padding repeat). The 2-process run must write the
same generated responses, the same reference log-probs and the same final weights as the
single-process run (within fp32 rounding); a 2-process run killed after a sharded checkpoint and
resumed must reach the same weights again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from spin_kernels.cli import main
from spin_kernels.demo.task import MarkovTask
from spin_kernels.demo.tiny import demo_tokenizer

ARGS = ["iterate", "--iterations", "1", "--global-batch-pairs", "8", "--token-budget", "120", "--save-every", "1",
        "--generation-batch-size", "5", "--device", "cpu", "--max-length", "40", "--max-prompt-length", "8",
        "--max-new-tokens", "12", "--learning-rate", "1e-3", "--epochs", "1"]
# The 2-process runs also recompute each decoder layer in the backward (apply_fsdp2's
# checkpoint_wrapper, also around generation and the reference pass): that must not change results.
DIST_EXTRA = ["--gradient-checkpointing"]
RTOL = 1e-5


def _tied_tiny_model(path: str) -> str:
    """2 decoder layers (2 FSDP units), lm_head tied to the embeddings (stored once in the checkpoint)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = demo_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spin-dist")
    model = _tied_tiny_model(str(tmp / "sft"))
    data = tmp / "data.jsonl"
    with open(data, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in MarkovTask().sample(25, seed=1))
    args = [*ARGS, "--model", model, "--data", str(data)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return tmp, args, env


def _torchrun(args, env, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           "-m", "spin_kernels.cli", *args, "--output-dir", str(out), *DIST_EXTRA, *extra]
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "iter0" / "model" / "model.safetensors"))


def _max_rel(a, b) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in a)


@pytest.fixture(scope="module")
def runs(setup):
    tmp, args, env = setup
    single, multi = tmp / "single", tmp / "multi"
    t0 = time.perf_counter()
    assert main([*args, "--output-dir", str(single)]) == 0
    t1 = time.perf_counter()
    res = _torchrun(args, env, multi)
    print(f"1 process {t1 - t0:.1f} s, torchrun x2 {time.perf_counter() - t1:.1f} s")
    return single, multi, res


def test_two_processes_match_one(runs, setup):
    single, multi, res = runs
    assert "SPIN after iteration 0" in res.stdout and res.stdout.count("SPIN after iteration 0") == 1  # rank 0
    # (1) generation: same responses, every prompt once, in order
    assert (multi / "iter0" / "generated.jsonl").read_text() == (single / "iter0" / "generated.jsonl").read_text()
    # (2) reference log-probs (scored on other micro-batches: 2-rank plan)
    p1, p2 = _jsonl(single / "iter0" / "pairs.jsonl"), _jsonl(multi / "iter0" / "pairs.jsonl")
    assert [r["index"] for r in p2] == [r["index"] for r in p1] == list(range(25))
    for a, b in zip(p1, p2):
        assert {k: v for k, v in a.items() if k != "ref_logps"} == {k: v for k, v in b.items() if k != "ref_logps"}
        assert b["ref_logps"] == pytest.approx(a["ref_logps"], rel=RTOL)
    # (3) training: same steps, losses and final weights; the weights did move
    m1, m2 = _jsonl(single / "iter0" / "metrics.jsonl"), _jsonl(multi / "iter0" / "metrics.jsonl")
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == [1, 2, 3, 4]
    assert [r["pairs"] for r in m2] == [8, 8, 8, 1]
    for a, b in zip(m1, m2):
        for key in ("loss", "grad_norm", "rewards/margin", "lr", "tokens"):
            assert b[key] == pytest.approx(a[key], rel=RTOL, abs=1e-7), key
    # one micro-batch per rank in the last step (one of them empty): each rank ran its own plan
    assert m2[-1]["micro_batches"] == 1
    w1, w2 = _weights(single), _weights(multi)
    assert _max_rel(w2, w1) <= RTOL
    from safetensors.torch import load_file

    start = load_file(str(setup[0] / "sft" / "model.safetensors"))
    assert _max_rel(w1, start) > 1e3 * RTOL
    # the exported model is one ordinary HF checkpoint (the next iteration's opponent), the tied
    # lm_head stored once as in the single-process export
    from transformers import AutoModelForCausalLM

    assert w2.keys() == w1.keys() and "lm_head.weight" not in w2
    reloaded = AutoModelForCausalLM.from_pretrained(str(multi / "iter0" / "model"))
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert not os.listdir(multi / "iter0" / "checkpoints")  # step checkpoints removed at the end


def _spawn_ranks(args, env, out, port):
    """The 2 ranks as torchrun starts them (RANK/WORLD_SIZE/... in the environment), killable."""
    procs = []
    for r in range(2):
        e = dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "spin_kernels.cli", *args, "--output-dir", str(out),
                                       *DIST_EXTRA],
                                      env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def test_killed_and_resumed_run_reaches_the_same_weights(runs, setup):
    tmp, args, env = setup
    _, multi, _ = runs
    run = tmp / "killed"
    ckpts = run / "iter0" / "checkpoints"
    procs = _spawn_ranks(args, env, run, _port())
    deadline = time.monotonic() + 240
    while not (ckpts / "index.json").exists():  # a complete checkpoint (the index names it)
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"a rank ended before it could be killed: {procs[0].stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the first checkpoint")
        time.sleep(0.005)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    assert not (run / "iter0" / "model").exists()
    saved = json.loads((ckpts / "index.json").read_text())
    assert saved["world_size"] == 2 and any(f.endswith(".distcp") for f in os.listdir(ckpts / saved["dir"]))
    _torchrun(args, env, run, "--resume")
    assert _max_rel(_weights(run), _weights(multi)) <= RTOL
    assert [r["step"] for r in _jsonl(run / "iter0" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (run / "iter0" / "generated.jsonl").read_text() == (multi / "iter0" / "generated.jsonl").read_text()


def test_fsdp_options_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["iterate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--fsdp", "--mixed-precision", "--cpu-offload", "--reshard-after-forward"):
        assert flag in out, flag


def test_no_fsdp_under_several_processes_is_refused(setup, monkeypatch, capsys):
    tmp, args, _ = setup
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*args, "--output-dir", str(tmp / "refused"), "--no-fsdp"]) == 2
    assert "multi-process runs shard the model with FSDP" in capsys.readouterr().err


def test_single_process_fsdp_matches_plain(runs, setup):
    """--fsdp in one process shards over a 1-rank group: the FSDP path, same results."""
    tmp, args, _ = setup
    single, _, _ = runs
    assert main([*args, "--output-dir", str(tmp / "fsdp1"), "--fsdp"]) == 0
    assert not torch.distributed.is_initialized()  # the group it created is gone
    assert _max_rel(_weights(tmp / "fsdp1"), _weights(single)) <= RTOL


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


def test_ranks_end_with_their_launcher(setup):
    """kill -9 of the torchrun launcher alone: its ranks must not live on (and keep writing the run)."""
    from spin_kernels.training.rundir import LOCK_FILE

    tmp, args, env = setup
    run = tmp / "orphaned"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           "-m", "spin_kernels.cli", *args, "--output-dir", str(run)]
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        lock = run / LOCK_FILE
        deadline = time.monotonic() + 240
        while not (lock.exists() and lock.stat().st_size > 0):
            assert launcher.poll() is None and time.monotonic() < deadline, "the run never took its lock"
            time.sleep(0.01)
        rank0 = json.loads(lock.read_text())["pid"]
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 15
        while _alive(rank0):
            assert time.monotonic() < deadline, "rank 0 outlived its launcher by 15 s"
            time.sleep(0.05)
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_failing_rank_is_the_root_cause_of_torchrun_summary(setup, tmp_path):
    tmp, args, env = setup
    bad = [a if not a.endswith("data.jsonl") else str(tmp_path / "missing.jsonl") for a in args]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           "-m", "spin_kernels.cli", *bad, "--output-dir", str(tmp_path / "r")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    summary = res.stderr[res.stderr.index("Root Cause"):]
    assert "traceback : spin-kernels iterate: error: data.data:" in summary and "missing.jsonl" in summary


def test_lora_two_processes_kill_resume_and_merge(setup):
    """LoRA under FSDP2 (frozen base sharded, adapters trained): a 2-process run killed after a sharded
    checkpoint and resumed ends bit-equal to an uninterrupted one; the merged model loads, differs from the
    SFT model; the reference log-probs (adapter disabled = the base) equal a frozen copy's."""
    from transformers import AutoModelForCausalLM

    from spin_kernels.models import prepare_model, reference_logps
    from spin_kernels.packing import pack_batch
    from spin_kernels.training.config import DataConfig
    from spin_kernels.training.reference import to_examples

    tmp, args, env = setup
    lora = ["--lora-rank", "4", "--lora-alpha", "8", "--optimizer", "adamw"]
    whole, run = tmp / "lora-whole", tmp / "lora-killed"
    _torchrun(args, env, whole, *lora)
    procs = _spawn_ranks([*args, *lora], env, run, _port())
    ckpts = run / "iter0" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (ckpts / "index.json").exists() or json.loads((ckpts / "index.json").read_text())["step"] < 2:
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, procs[0].stderr.read()[-2000:]
        time.sleep(0.005)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    _torchrun(args, env, run, *lora, "--resume")
    a, b = _weights(run), _weights(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    merged = AutoModelForCausalLM.from_pretrained(str(whole / "iter0" / "model"))
    from safetensors.torch import load_file

    sft = load_file(str(tmp / "sft" / "model.safetensors"))
    assert _max_rel(b, sft) > 1e3 * RTOL and (whole / "iter0" / "model" / "adapter" / "adapter_config.json").exists()
    assert merged.config.model_type == "llama"
    frozen = prepare_model(AutoModelForCausalLM.from_pretrained(str(tmp / "sft")))
    pairs = _jsonl(whole / "iter0" / "pairs.jsonl")
    examples = to_examples(demo_tokenizer(), pairs, DataConfig(max_length=40, max_prompt_length=8))
    ref = reference_logps(pack_batch(examples), ref_model=frozen, impl="torch")
    assert ref.tolist() == pytest.approx([v for p in pairs for v in p["ref_logps"]], rel=RTOL)


def test_continuous_generation_under_two_processes_writes_the_one_process_rows(setup):
    """--backend continuous, prompts sorted by length, 5 chunks of 5 dealt to 2 ranks (the last
    round a padding repeat): the ranks step together until both are done (every forward all-
    gathers the layers) and write the rows one process writes."""
    tmp, args, env = setup
    at = {a: args[args.index(a) + 1] for a in ("--model", "--data")}
    gen = ["generate", "--model", at["--model"], "--data", at["--data"], "--device", "cpu", "--max-length", "40",
           "--max-prompt-length", "8", "--max-new-tokens", "12", "--backend", "continuous", "--generation-order",
           "length", "--generation-batch-size", "2", "--generation-chunk-size", "5"]
    one, two = tmp / "continuous-1.jsonl", tmp / "continuous-2.jsonl"
    assert main([*gen, "--output", str(one)]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           "-m", "spin_kernels.cli", *gen, "--output", str(two)]
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _jsonl(one)
    assert [r["index"] for r in rows] == list(range(25)) and rows[0]["source"]["sampling"]["backend"] == "continuous"
    assert two.read_text() == one.read_text()
