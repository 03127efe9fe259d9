"""The memory planner: formulas against measured peaks, presets, recommend(), the CLI.

Measured: peak RSS growth of a fresh process (baseline taken after the imports, before the
model exists) running 2 training steps of 2 packed micro-batches each (fp32, CPU, the torch
fused loss, the "spin_varlen" SDPA loop), with a fixed glibc mmap threshold so that freed
tensors leave the resident set at once. Predicted: ``plan(..., num_gpus=1, fsdp=False,
mixed_precision=None, attention="sdpa_loop", loss_impl="torch")``.

Configurations: 3 single-process ones and one with 2 FSDP2 ranks (gloo; the larger of the
two ranks' peaks), which checks the sharded terms (sharded states, all-gathered copies,
gradients in flight). Tolerances: the total within 15%; the growth of the peak from T to 2T tokens (the
activations' per-token cost, the part of the formulas most likely to be wrong) within 25%.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from spin_kernels.memory import GiB, ModelSpec, PlanOptions, plan, recommend
from spin_kernels.memory.cli import main as plan_main

TOTAL_TOL = 0.15
SLOPE_TOL = 0.25

# (name, spec fields, optimizer, activation checkpointing, token budgets per micro-batch, FSDP2 ranks,
#  LoRA rank (0: full fine-tuning))
SMALL = {"num_layers": 4, "hidden": 256, "intermediate": 768, "num_heads": 8, "num_kv_heads": 4, "vocab": 8000}
WIDE = {"num_layers": 2, "hidden": 384, "intermediate": 1024, "num_heads": 6, "num_kv_heads": 6, "vocab": 32000}
CONFIGS = [
    ("gqa-adamw", SMALL, "adamw", False, (512, 1024), 1, 0),
    ("ac-rmsprop", SMALL, "rmsprop", True, (1024, 2048), 1, 0),
    ("wide-vocab", WIDE, "adamw", False, (512,), 1, 0),
    ("fsdp2-ac-adamw", SMALL, "adamw", True, (1024, 2048), 2, 0),
    ("lora-adamw", SMALL, "adamw", False, (512, 1024), 1, 16),
    ("fsdp2-lora-ac", SMALL, "adamw", True, (1024, 2048), 2, 32),
]
IDS = [c[0] for c in CONFIGS]
SEQ = 256      # sequence length of the measured batches (half prompt, half response)
PROMPT = 128


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Reset the process's high-water mark (VmHWM) to its current RSS (Linux: clear_refs 5), so
    that a peak reached before the baseline (imports, the warm-up) cannot mask the step's own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(spec: dict, optimizer: str, ac: bool, budgets: tuple[int, ...], lora: int = 0,
            sharded: bool = False) -> dict:
    """Run in a fresh process: peak RSS growth (bytes) of one step of 2 micro-batches, after
    the optimizer states exist, for each token budget in increasing order (the peak of a larger
    budget is above that of a smaller one, so one process measures them all).

    ``sharded``: this process is one of 2 gloo ranks and the model is sharded with apply_fsdp2
    (fp32, no mixed precision); each rank runs the same micro-batches. ``lora``: the trainer's LoRA
    adapters of that rank on every decoder linear map (spin_kernels.training.lora), base frozen."""

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from spin_kernels.distributed.fsdp import _wrap_with_checkpointing, decoder_layers
    from spin_kernels.models import packed_spin_loss, prepare_model
    from spin_kernels.packing.batch import pack_batch
    from spin_kernels.packing.example import SpinExample

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)

    def micro_batches(tokens):
        pairs, out = tokens // (2 * SEQ), []
        for mb in range(2):
            exs = [SpinExample(prompt_ids=torch.randint(0, spec["vocab"], (PROMPT,), generator=g).tolist(),
                               real_ids=torch.randint(0, spec["vocab"], (SEQ - PROMPT,), generator=g).tolist(),
                               synthetic_ids=torch.randint(0, spec["vocab"], (SEQ - PROMPT,), generator=g).tolist(),
                               ref_logps=[-1000.0, -1000.0], index=mb * pairs + i) for i in range(pairs)]
            out.append(pack_batch(exs))
        return out

    all_batches = [micro_batches(t) for t in sorted(budgets)]
    batches = all_batches[0]
    counted = sum(int((b.targets != -100).sum()) for b in batches) / sum(b.num_tokens for b in batches)
    cfg = LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                      num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
                      num_key_value_heads=spec["num_kv_heads"], tie_word_embeddings=False,
                      max_position_embeddings=SEQ)
    make_opt = {"adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}[optimizer]

    def build(c):
        model = prepare_model(AutoModelForCausalLM.from_config(c, dtype=torch.float32))
        if lora:
            from spin_kernels.training.config import TrainingConfig
            from spin_kernels.training.lora import add_adapters

            model = add_adapters(model, TrainingConfig(lora_rank=lora))
        if sharded:
            from spin_kernels.distributed import apply_fsdp2

            model = apply_fsdp2(model, mixed_precision=None, activation_checkpointing=ac)
        elif ac:
            _wrap_with_checkpointing(model, decoder_layers(model))
        return model, make_opt([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def loss_of(model, batch):
        if sharded:
            return model(lambda m, b: packed_spin_loss(m, b, impl="torch"), batch)
        return packed_spin_loss(model, batch, impl="torch")

    # Warm-up on a tiny copy: every lazy import and one-off buffer is in place before the baseline.
    tiny = LlamaConfig(**{**cfg.to_dict(), "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32})
    model, opt = build(tiny)
    loss_of(model, pack_batch([SpinExample([1, 2], [3, 4], [5, 6], [-1.0, -1.0], 0)]))[0].backward()
    opt.step()
    del model, opt
    base = _rss()
    _reset_peak_rss()
    model, opt = build(cfg)
    for p in model.parameters():  # the optimizer's states, as after a first step, without one
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    peaks = []
    for batches in all_batches:
        opt.zero_grad(set_to_none=True)
        for b in batches:  # one measured step: gradients of micro-batch 1 are alive during 2
            loss, _ = loss_of(model, b)
            (loss / 2).backward()
        opt.step()
        peaks.append(_peak_rss() - base)
    return {"peaks": dict(zip(sorted(budgets), peaks)), "counted_fraction": counted}


def _sharded_rank(rank: int, port: int, args: tuple, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = measure(*args, sharded=True)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def measure_sharded(spec: dict, optimizer: str, ac: bool, budgets: tuple[int, ...], lora: int = 0) -> dict:
    """``measure`` on 2 FSDP2 ranks; the larger of the two ranks' peaks per budget."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_sharded_rank, args=(port, (spec, optimizer, ac, budgets, lora), out_dir), nprocs=2, join=True)
        ranks = []
        for r in range(2):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    return {"peaks": {t: max(r["peaks"][str(t)] for r in ranks) for t in ranks[0]["peaks"]},
            "counted_fraction": ranks[0]["counted_fraction"]}


def _start_measure(spec, optimizer, ac, budgets, lora, sharded=False) -> subprocess.Popen:
    """A fresh process running ``measure``; glibc's mmap threshold is fixed so that every tensor
    above 64 KiB is its own mapping, returned to the system when freed (else the dynamic
    threshold keeps freed tensors in the heap and the resident set overstates the live bytes)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    fn = "measure_sharded" if sharded else "measure"
    code = (f"import json, test_planner; print(json.dumps(test_planner.{fn}({spec!r}, {optimizer!r}, {ac!r}, "
            f"{tuple(budgets)!r}, {lora!r})))")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _result(proc: subprocess.Popen) -> dict:
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _predict(spec, optimizer, ac, tokens, counted, ranks=1, lora=0) -> float:
    return plan(ModelSpec("measured", **spec), num_gpus=ranks, fsdp=ranks > 1, mixed_precision=None, param_bytes=4,
                optimizer=optimizer, activation_checkpointing=ac, token_budget=tokens,
                counted_fraction=counted, attention="sdpa_loop", loss_impl="torch", max_seqlen=SEQ,
                gen_batch=1, prompt_len=1, max_new_tokens=1, finetune="lora" if lora else "full",
                lora_rank=lora or 16).train_peak


@pytest.fixture(scope="module")
def measured():
    """{config name: {"peaks": {budget: bytes}, "counted_fraction": f}}: 3 fresh processes, run
    side by side (each one's resident set is its own; one thread each on the 2-core machine)."""
    procs = {name: _start_measure(spec, opt, ac, budgets, lora, ranks > 1)
             for name, spec, opt, ac, budgets, ranks, lora in CONFIGS}
    return {name: _result(p) for name, p in procs.items()}


def _report(name, t, got, want) -> str:
    return f"{name} T={t}: measured {got / 2**20:.1f} MiB, predicted {want / 2**20:.1f} MiB"


@pytest.mark.parametrize("name,spec,optimizer,ac,budgets,ranks,lora", CONFIGS, ids=IDS)
def test_planner_total_matches_measured_peak(measured, name, spec, optimizer, ac, budgets, ranks, lora):
    m = measured[name]
    for t in budgets:
        got, want = m["peaks"][str(t)], _predict(spec, optimizer, ac, t, m["counted_fraction"], ranks, lora)
        print(_report(name, t, got, want))
        assert abs(got - want) <= TOTAL_TOL * got, _report(name, t, got, want)


@pytest.mark.parametrize("name,spec,optimizer,ac,budgets,ranks,lora", [c for c in CONFIGS if len(c[4]) == 2],
                         ids=[c[0] for c in CONFIGS if len(c[4]) == 2])
def test_planner_activation_slope_matches_measured(measured, name, spec, optimizer, ac, budgets, ranks, lora):
    """Peak growth from T to 2T tokens: the per-token activation + loss cost alone."""
    m, (t1, t2), f = measured[name], budgets, measured[name]["counted_fraction"]
    got = m["peaks"][str(t2)] - m["peaks"][str(t1)]
    want = _predict(spec, optimizer, ac, t2, f, ranks, lora) - _predict(spec, optimizer, ac, t1, f, ranks, lora)
    assert got > 0
    assert abs(got - want) <= SLOPE_TOL * got, _report(name, f"{t1}->{t2} growth", got, want)


# -- shapes, recommend(), CLI --------------------------------------------------------------------

@pytest.mark.parametrize("preset,billions", [("llama3-8b", 8.03), ("llama3-70b", 70.55), ("qwen2.5-72b", 72.71),
                                             ("mistral-7b", 7.24)])
def test_preset_parameter_counts_match_published(preset, billions):
    assert plan(preset).model.num_params / 1e9 == pytest.approx(billions, abs=0.01)


@pytest.mark.parametrize("tied,kv,bias", [(False, 2, False), (True, 4, False), (False, 2, True)])
def test_parameter_count_equals_a_built_model(tmp_path, tied, kv, bias):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=kv, tie_word_embeddings=tied, attention_bias=bias)
    cfg.save_pretrained(tmp_path)
    spec = plan(str(tmp_path / "config.json")).model
    built = AutoModelForCausalLM.from_config(cfg)
    # attention_bias also puts a bias on o_proj in Llama; our shape counts q/k/v biases (Qwen2).
    extra = cfg.hidden_size * cfg.num_hidden_layers if bias else 0
    assert spec.num_params + extra == sum(p.numel() for p in built.parameters())


def test_70b_full_finetuning_on_8x80_needs_offload():
    opts = PlanOptions(num_gpus=8, gpu_memory_gib=80)
    assert not plan("llama3-70b", opts).fits  # 12 bytes/param of fp32 state: 106 GB per GPU
    best = recommend("llama3-70b", opts)
    assert best is not None and best.options.cpu_offload and best.options.num_gpus == 8
    assert best.peak <= best.usable
    # Without offload the fp32 state needs 2 nodes (16 GPUs), and recommend prefers that when
    # allowed, even at a smaller token budget.
    wider = recommend("llama3-70b", opts, max_gpus=32)
    assert not wider.options.cpu_offload and wider.options.num_gpus == 16


def test_recommend_picks_the_fewest_gpus_without_offload():
    best = recommend("llama3-8b", PlanOptions(num_gpus=8, gpu_memory_gib=80))
    assert best is not None and not best.options.cpu_offload
    fewer = best.options.num_gpus // 2
    if fewer >= 1:  # nothing at all fits on fewer GPUs without offload
        assert recommend("llama3-8b", PlanOptions(num_gpus=fewer, gpu_memory_gib=80), max_gpus=fewer) is None \
            or recommend("llama3-8b", PlanOptions(num_gpus=fewer, gpu_memory_gib=80), max_gpus=fewer).options.cpu_offload


def test_lora_70b_fits_without_offload():
    best = recommend("llama3-70b", PlanOptions(num_gpus=8, finetune="lora", reference_mode="lora-disabled"))
    assert best is not None and not best.options.cpu_offload


def test_options_are_validated():
    with pytest.raises(ValueError, match="lora-disabled"):
        plan("llama3-8b", reference_mode="lora-disabled")
    with pytest.raises(ValueError, match="unknown model"):
        plan("no-such-model")


def test_fused_loss_and_checkpointing_save_what_they_should():
    base = plan("llama3-8b", num_gpus=8, token_budget=16384)
    naive = plan("llama3-8b", num_gpus=8, token_budget=16384, loss_impl="naive")
    # Naive: fp32 logits + their gradient at the start of backward, 2 * 4 * rows * V = 8.4 GB at
    # 8192 counted rows (spin-math.md); ours holds no [rows, V] buffer at that point.
    rows, v = 8192, 128256
    assert naive.train_peak - base.train_peak == pytest.approx(8 * rows * v, rel=0.02)
    no_ac = plan("llama3-8b", num_gpus=8, token_budget=16384, activation_checkpointing=False)
    assert no_ac.train_peak > base.train_peak + 40 * GiB


def test_cli_prints_the_breakdown_and_a_recommendation(capsys):
    assert plan_main(["llama3-70b", "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "requested configuration" in out and "fits: NO" in out
    assert "recommended" in out and "CPU offload on" in out and "fits: YES" in out
    assert "optimizer states (rmsprop: 1)" in out
    assert plan_main(["llama3-8b", "--gpus", "1", "--gpu-memory", "8", "--no-recommend"]) == 1
    assert plan_main(["nope"]) == 2


def _run_printed(command: str, extra: list[str]) -> subprocess.CompletedProcess:
    """Run a command line the planner printed, with this interpreter (and a free torchrun port)."""
    import shlex
    import socket

    argv = shlex.split(command)
    if argv[0] == "spin-kernels":
        argv = [sys.executable, "-m", "spin_kernels.cli", *argv[1:]]
    else:
        assert argv[0] == "torchrun"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv = [sys.executable, "-m", "torch.distributed.run", "--master_port", str(port), *argv[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.run([*argv, *extra], capture_output=True, text=True, env=env, timeout=600)


def test_the_printed_commands_run(tmp_path, capsys):
    """The planner prints the trainer command of each configuration that fits; both run as printed (a tiny
    model on CPU: the requested 2-GPU LoRA configuration through torchrun and the recommended 1-GPU one)."""
    from spin_kernels.demo.task import MarkovTask
    from spin_kernels.demo.tiny import save_tiny_model

    model = save_tiny_model(str(tmp_path / "sft"), layers=2)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MarkovTask().sample(8, seed=1)))
    argv = [model, "--gpus", "2", "--gpu-memory", "4", "--no-mixed-precision", "--attention", "sdpa_loop",
            "--loss-impl", "torch", "--max-seqlen", "40", "--prompt-len", "8", "--max-new-tokens", "12",
            "--token-budget", "256", "--gen-batch", "4", "--lora", "--lora-rank", "4", "--data", str(data),
            "--output-dir", str(tmp_path / "planned")]
    assert plan_main(argv) == 0
    commands = [line[len("command: "):] for line in capsys.readouterr().out.splitlines()
                if line.startswith("command: ")]
    assert len(commands) == 2 and commands[0].startswith("torchrun --nproc_per_node 2 -m spin_kernels.cli iterate")
    assert commands[1].startswith("spin-kernels iterate") and "--lora-rank 4" in commands[1]
    # Hyper-parameters outside the planner's scope keep the run short.
    extra = ["--iterations", "1", "--epochs", "1", "--global-batch-pairs", "4", "--learning-rate", "1e-3"]
    for i, command in enumerate(commands):
        res = _run_printed(command.replace(str(tmp_path / "planned"), str(tmp_path / f"planned{i}")), extra)
        assert res.returncode == 0, (command, res.stderr[-3000:])
        assert (tmp_path / f"planned{i}" / "iter0" / "model" / "adapter" / "adapter_config.json").exists()


def test_configurations_the_trainer_cannot_run_print_why(capsys):
    from spin_kernels.memory.estimate import trainer_flags

    flags, why = trainer_flags(PlanOptions(reference_mode="frozen-model"))
    assert flags is None and "a frozen reference model" in why
    assert trainer_flags(PlanOptions(optimizer="sgd"))[0] is None
    assert trainer_flags(PlanOptions(loss_impl="naive"))[0] is None
    flags, _ = trainer_flags(PlanOptions(num_gpus=8, finetune="lora", reference_mode="lora-disabled", cpu_offload=True))
    assert flags[flags.index("--lora-rank") + 1] == "16" and "--cpu-offload" in flags and "bfloat16" in flags
    assert plan_main(["llama3-8b", "--gpus", "8", "--reference", "frozen-model", "--no-recommend"]) == 0
    assert "command: none: not a trainer configuration (a frozen reference model" in capsys.readouterr().out
