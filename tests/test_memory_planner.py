"""The memory planner (spin_kernels.memory): an upper bound checked against measured peaks, its
terms, recommend(), the time estimate, the reference estimators, the CLI and its printed commands.

The measured bound: three configurations of the planner suite's grid (benchmarks/planner.py; the
whole grid of 14 is ``python -m benchmarks run --suite planner --device cpu``): one process on the
wide-vocabulary model (AdamW), 2 FSDP2 ranks on it (the root unit's all-gather and reduce-scatter
transients, gloo's copies), and through the suite's runner QLoRA on the narrow model. Each runs
the trainer's step in fresh processes; predicted / measured peak must lie in 1.00-1.15.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from spin_kernels.memory import GiB, ModelSpec, PlanOptions, plan, recommend, trainer_flags
from spin_kernels.memory.cli import main as plan_main
from spin_kernels.memory.cost import DEVICES, DataSize, estimate_time
from spin_kernels.memory.peers import accelerate_adam, deepspeed_zero3, reference_rows
from spin_kernels.memory.terms import optimizer_step_copy

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` puts tests/ on sys.path, not the repository root
    sys.path.insert(0, str(ROOT))


# -- the bound, measured --------------------------------------------------------------------------

MEASURED = ["wide-full-adamw", "fsdp2-wide-full-rmsprop"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from benchmarks.planner import model_dirs as make

    return make(tmp_path_factory.mktemp("planner-models"))


@pytest.mark.slow
@pytest.mark.parametrize("name", MEASURED)
def test_bound_holds_on_measured_configurations(model_dirs, name):
    from benchmarks.planner import BOUND, GRID, compare, measure

    if "qlora" in name:
        pytest.importorskip("bitsandbytes")
    case = next(c for c in GRID if c.name == name)
    result = compare(case, measure(case, model_dirs))
    print(name, f"{result['ratio']:.3f}", result["peak"], result["measured"], result["predicted"])
    assert BOUND[0] <= result["ratio"] <= BOUND[1], result


@pytest.mark.slow
def test_planner_suite_writes_its_table(tmp_path):
    """``python -m benchmarks run --suite planner`` on one configuration (QLoRA): JSON and Markdown
    under <out>/<cpu-slug>/planner.*, the configuration within the bound."""
    pytest.importorskip("bitsandbytes")
    from benchmarks.__main__ import main
    from benchmarks.planner import BOUND

    assert main(["run", "--suite", "planner", "--device", "cpu", "--planner-cases", "narrow-qlora-adamw",
                 "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]) == 0
    (folder,) = (tmp_path / "out").iterdir()
    record = json.loads((folder / "planner.json").read_text())
    (case,) = record["cases"]
    assert case["status"] == "ok" and BOUND[0] <= case["ratio"] <= BOUND[1], case
    assert "narrow-qlora-adamw" in (folder / "planner.md").read_text()


STEP_SCRIPT = textwrap.dedent(r"""
    import json, sys, torch
    name, impl, layers, hidden, vocab = sys.argv[1], sys.argv[2], 2, 256, 8000
    torch.set_num_threads(1)
    def status(f):
        for line in open('/proc/self/status'):
            if line.startswith(f + ':'):
                return int(line.split()[1]) * 1024
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=768,
                                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4))
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    kw = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    opt = {"rmsprop": torch.optim.RMSprop, "adamw": torch.optim.AdamW}[name](params, lr=1e-3, **kw)
    opt.step()  # the states exist
    base = status('VmRSS')
    open('/proc/self/clear_refs', 'w').write('5')
    opt.step()
    print(json.dumps({"extra": status('VmHWM') - base}))
""")


@pytest.mark.parametrize("optimizer,step_impl", [("rmsprop", "foreach"), ("rmsprop", "for-loop"), ("adamw", "foreach"),
                                            ("adamw", "for-loop"), ("adamw", "fused")])
def test_optimizer_step_temporaries_match_torch(optimizer, step_impl):
    """The step's own memory, measured in a fresh process for each optimizer and implementation."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", STEP_SCRIPT, optimizer, step_impl], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["extra"]
    spec = ModelSpec("step", 2, 256, 768, 8, 4, 8000)
    predicted = optimizer_step_copy(spec, PlanOptions(num_gpus=1, fsdp=False, mixed_precision=None, device="cpu",
                                                      optimizer=optimizer, optimizer_impl=step_impl))
    print(optimizer, step_impl, measured / 2**20, predicted / 2**20)
    assert predicted >= measured - 2**20 and predicted <= 1.1 * measured + 2**20, (measured, predicted)


# -- shapes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,billions", [("llama3-8b", 8.03), ("llama3-70b", 70.55), ("qwen2.5-72b", 72.71),
                                             ("mistral-7b", 7.24), ("llama2-7b", 6.74), ("llama2-70b", 68.98)])
def test_preset_parameter_counts_match_published(preset, billions):
    m = plan(preset).model
    assert m.num_params / 1e9 == pytest.approx(billions, abs=0.01)
    assert sum(m.tensor_sizes()) == m.num_params


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
    if not bias:  # the trainable tensors in the order torch's optimizer sees them
        assert spec.tensor_sizes() == [p.numel() for p in built.parameters()]


def test_lora_tensor_sizes_equal_peft_adapters():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from spin_kernels.training.config import TrainingConfig
    from spin_kernels.training.lora import add_adapters

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = add_adapters(AutoModelForCausalLM.from_config(cfg), TrainingConfig(lora_rank=4))
    spec = ModelSpec("t", 2, 64, 96, 4, 2, 300)
    assert spec.tensor_sizes(4) == [p.numel() for p in model.parameters() if p.requires_grad]


# -- what the plans say at scale -------------------------------------------------------------------

def test_70b_full_on_8x141_is_set_by_the_optimizer_step():
    """The foreach step's fp32 copy of the shard puts the step above the usable memory at any token
    budget: 4 x 32.85 GiB of model states + 1.5 GiB of process."""
    p = plan("llama3-70b", num_gpus=8, gpu_memory_gib=141, token_budget=4096)
    assert p.peak_point.moment == "optimizer step" and not p.fits
    assert p.peak / GiB == pytest.approx(132.9, abs=0.1)
    term, value = p.peak_point.set_by()
    assert term.startswith("optimizer step temporaries (foreach)") and value / GiB == pytest.approx(32.85, abs=0.01)
    fused = plan("llama3-70b", num_gpus=8, gpu_memory_gib=141, token_budget=4096, optimizer="adamw",
                 optimizer_impl="fused")
    assert fused.moment("optimizer step").terms["optimizer step temporaries (fused)"] == 0
    best = recommend("llama3-70b", PlanOptions(num_gpus=8, gpu_memory_gib=141))
    assert best.options.cpu_offload and best.fits
    wider = recommend("llama3-70b", PlanOptions(num_gpus=8, gpu_memory_gib=141), max_gpus=16)
    assert not wider.options.cpu_offload and wider.options.num_gpus == 16


def test_fsdp_root_transients_are_priced():
    """LoRA: the root's flat all-gather buffer beside its unsharded parameters (and the first layer's);
    full: at the end of backward the root's reduce-scatter input, gloo's copy of it on CPU, and the
    loss's dW still held by its autograd node."""
    m = ModelSpec("wide", 2, 384, 1024, 6, 6, 32000)
    lora = plan(m, num_gpus=2, device="cpu", fsdp=True, mixed_precision=None, finetune="lora")
    start = next(pt for pt in lora.points if pt.where == "root and first layer all-gathered")
    assert start.terms["root all-gather buffer"] == start.terms["root unit (embeddings, lm_head; unsharded)"]
    full_cpu = plan(m, num_gpus=2, device="cpu", fsdp=True, mixed_precision=None)
    end = next(pt for pt in full_cpu.points if pt.where.startswith("end of backward"))
    rs = end.terms["reduce-scatter input (root)"]
    assert rs == m.root_params * 4 and end.terms["gloo's copy of the reduce-scatter input"] == rs
    full_gpu = plan(m, num_gpus=2, fsdp=True, mixed_precision=None)
    end = next(pt for pt in full_gpu.points if pt.where.startswith("end of backward"))
    assert "gloo's copy of the reduce-scatter input" not in end.terms  # NCCL reduces in place


def test_qlora_prices_nf4_one_process_and_fsdp():
    one = plan("llama3-70b", num_gpus=1, finetune="lora", quantize="nf4", reference_mode="lora-disabled")
    assert not one.options.sharded and trainer_flags(one.options)[0] is not None
    m = one.model
    linear = m.num_layers * m.layer_linear_params
    assert one.moment("optimizer step").terms["parameters"] == pytest.approx(
        linear * 0.5 + (m.num_params - linear) * 2 + m.lora_params(16) * 4)
    assert one.moment("optimizer step").terms["NF4 absmax (replicated)"] == pytest.approx(linear * 4 / 64)
    sharded = plan("llama3-70b", num_gpus=2, finetune="lora", quantize="nf4", reference_mode="lora-disabled")
    assert sharded.options.sharded and trainer_flags(sharded.options)[0] is None
    assert "one process" in trainer_flags(sharded.options)[1]
    with pytest.raises(ValueError, match="finetune='lora'"):
        PlanOptions(quantize="nf4")


def test_lora_70b_fits_without_offload():
    best = recommend("llama3-70b", PlanOptions(num_gpus=8, finetune="lora", reference_mode="lora-disabled"))
    assert best is not None and not best.options.cpu_offload


def test_offload_host_memory_has_pinned_rounding_and_rank0_copy():
    p = plan("llama3-70b", num_gpus=8, cpu_offload=True)
    shard = 70.55e9 * 4 / 8
    pinned = p.host["offloaded parameters (pinned, per rank x GPUs)"] / 8
    assert 1.05 * shard < pinned < 1.2 * shard  # powers of two, per tensor
    assert p.host["rank 0's full copy (load / export)"] == p.model.num_params * 4
    assert not plan("llama3-70b", num_gpus=8, cpu_offload=True, host_memory_gib=1024).fits  # 1.09 TiB
    assert p.fits


def test_fused_loss_and_checkpointing_save_what_they_should():
    base = plan("llama3-8b", num_gpus=8, token_budget=16384)
    naive = plan("llama3-8b", num_gpus=8, token_budget=16384, loss_impl="naive")
    # Naive: fp32 logits + their gradient at the start of backward, 2 * 4 * rows * V = 8.4 GB at
    # 8192 counted rows (spin-math.md); ours holds no [rows, V] buffer at that point.
    rows, v = 8192, 128256

    def handed(p):
        return next(pt for pt in p.points if pt.where.startswith("start")).terms

    assert handed(naive)["loss dh/dW (naive) -> lm_head gradient"] == 4 * rows * v
    assert handed(naive)["naive loss: its log-probs' gradient"] == 4 * rows * v
    assert handed(base)["loss dh/dW (fused) -> lm_head gradient"] < 4 * rows * v / 3  # dh and a bf16 dW
    assert sum(handed(naive).values()) - sum(handed(base).values()) > 6.5 * GiB
    no_ac = plan("llama3-8b", num_gpus=8, token_budget=16384, activation_checkpointing=False)
    assert no_ac.train_peak > base.train_peak + 40 * GiB


def test_options_are_validated():
    with pytest.raises(ValueError, match="lora-disabled"):
        plan("llama3-8b", reference_mode="lora-disabled")
    with pytest.raises(ValueError, match="unknown model"):
        plan("no-such-model")
    with pytest.raises(ValueError, match="no fused rmsprop"):
        PlanOptions(optimizer_impl="fused")
    with pytest.raises(ValueError, match="CPUOffloadPolicy"):
        PlanOptions(num_gpus=1, fsdp=False, cpu_offload=True)


# -- reference estimators ---------------------------------------------------------------------------

def test_deepspeed_formula_equals_deepspeed():
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    for offload in (False, True):
        for nodes in (1, 2):
            cpu, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(
                70_553_706_496, 1_050_673_152, num_gpus_per_node=8, num_nodes=nodes, cpu_offload=offload,
                cpu_offload_params=offload, zero_init=True)
            assert deepspeed_zero3(70_553_706_496, 1_050_673_152, gpus_per_node=8, nodes=nodes,
                                   offload=offload) == (gpu, cpu)


def test_accelerate_arithmetic_equals_accelerate():
    estimate = pytest.importorskip("accelerate.commands.estimate")
    for dtype in ("float32", "bfloat16"):
        assert accelerate_adam(8_030_261_248, dtype) == max(
            estimate.estimate_training_usage(4 * 8_030_261_248, dtype).values())


def test_reference_table_rows():
    rows = reference_rows()
    assert len(rows) >= 8 and all(r["why"] for r in rows)
    assert {r["model"] for r in rows} >= {"llama3-8b", "llama3-70b", "mistral-7b"}
    assert all(r["source"] for r in rows if r["published"])


# -- time and cost ----------------------------------------------------------------------------------

def test_time_estimate_by_stage():
    p = plan("llama3-70b", num_gpus=8, gpu_memory_gib=80, cpu_offload=True)
    data = DataSize(prompts=50_000)
    est = estimate_time(p, data, "h100")
    assert [s.stage.split(" ")[0] for s in est.stages] == ["generation", "reference", "training"]
    assert all(s.seconds > 0 and s.gpu_hours == pytest.approx(s.seconds * 8 / 3600) for s in est.stages)
    gen = est.stages[0]
    assert gen.bound == "communication"  # every layer all-gathered per decoding step under FSDP
    twice = estimate_time(p, DataSize(prompts=100_000), "h100")
    assert twice.seconds == pytest.approx(2 * est.seconds, rel=0.02)
    faster = estimate_time(p, data, "h100", mfu=0.8)
    assert faster.stages[2].parts["compute"] == pytest.approx(est.stages[2].parts["compute"] / 2)
    assert DEVICES["h200"].hbm > DEVICES["h100"].hbm > DEVICES["a100"].hbm
    text = est.table()
    assert "assumptions:" in text and "989 TFLOP/s" in text


# -- the CLI and the commands it prints -------------------------------------------------------------

def test_cli_prints_moments_peak_and_a_recommendation(capsys):
    assert plan_main(["llama3-70b", "--gpus", "8", "--gpu-memory", "80", "--output-dir", "runs/x"]) == 0
    out = capsys.readouterr().out
    assert "requested configuration" in out and "fits: NO" in out
    assert "peak: optimizer step, at update" in out and "set by optimizer step temporaries (foreach)" in out
    assert "recommended" in out and "CPU offload on" in out and "fits: YES" in out
    commands = [line for line in out.splitlines() if line.startswith("command: ")]
    assert len(commands) == 1 and "--output-dir runs/x-recommended" in commands[0]
    assert plan_main(["llama3-8b", "--gpus", "1", "--gpu-memory", "8", "--no-recommend"]) == 1
    assert plan_main(["nope"]) == 2
    assert plan_main(["llama3-8b", "--gpus", "8", "--time", "--prompts", "1000", "--no-recommend"]) == 0
    assert "time of one iteration" in capsys.readouterr().out


def _run_printed(command: str, extra: list[str]) -> subprocess.CompletedProcess:
    """Run a command line the planner printed, with this interpreter (and a free torchrun port)."""
    from cases import free_port

    argv = shlex.split(command)
    if argv[0] == "spin-kernels":
        argv = [sys.executable, "-m", "spin_kernels.cli", *argv[1:]]
    else:
        assert argv[0] == "torchrun"
        argv = [sys.executable, "-m", "torch.distributed.run", "--master_port", str(free_port()), *argv[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.run([*argv, *extra], capture_output=True, text=True, env=env, timeout=600)


def _printed(capsys, argv: list[str]) -> list[str]:
    assert plan_main(argv) == 0
    return [line[len("command: "):] for line in capsys.readouterr().out.splitlines() if line.startswith("command: ")]


@pytest.mark.slow
def test_the_printed_commands_run(tmp_path, capsys):
    """Every kind of command the planner prints runs as printed on a tiny model (CPU): torchrun x2
    with LoRA (requested) and its one-process recommendation, full fine-tuning under torchrun, and
    QLoRA (one process). The requested and recommended commands write to different directories."""
    from cases import tiny_model_and_data

    model, data = tiny_model_and_data(tmp_path, rows=8, seed=1, layers=2)
    common = [model, "--device", "cpu", "--gpu-memory", "4", "--no-mixed-precision", "--attention", "sdpa_loop",
              "--loss-impl", "torch", "--max-seqlen", "40", "--prompt-len", "8", "--max-new-tokens", "12",
              "--token-budget", "256", "--gen-batch", "4", "--data", data]
    lora = _printed(capsys, [*common, "--gpus", "2", "--lora", "--lora-rank", "4", "--output-dir",
                             str(tmp_path / "lora")])
    assert len(lora) == 2 and lora[0].startswith("torchrun --nproc_per_node 2 -m spin_kernels.cli iterate")
    assert lora[1].startswith("spin-kernels iterate") and f"--output-dir {tmp_path / 'lora'}-recommended" in lora[1]
    full = _printed(capsys, [*common, "--gpus", "2", "--no-recommend", "--output-dir", str(tmp_path / "full")])
    qlora = []
    try:
        import bitsandbytes  # noqa: F401

        qlora = _printed(capsys, [*common, "--gpus", "1", "--lora", "--lora-rank", "4", "--quantize", "nf4",
                                  "--no-recommend", "--output-dir", str(tmp_path / "qlora")])
        assert "--quantize nf4" in qlora[0] and qlora[0].startswith("spin-kernels iterate")
    except ImportError:
        print("bitsandbytes missing: the QLoRA command is not run")
    # Hyper-parameters outside the planner's scope keep the runs short.
    extra = ["--iterations", "1", "--epochs", "1", "--global-batch-pairs", "4", "--learning-rate", "1e-3"]
    for command in [*lora, *full, *qlora]:
        res = _run_printed(command, extra)
        assert res.returncode == 0, (command, res.stderr[-3000:])
        out = Path(shlex.split(command)[shlex.split(command).index("--output-dir") + 1])
        assert (out / "iter0" / "model" / "config.json").exists(), command
    assert (tmp_path / "lora" / "iter0" / "model" / "adapter" / "adapter_config.json").exists()


def test_configurations_the_trainer_cannot_run_print_why(capsys):
    flags, why = trainer_flags(PlanOptions(reference_mode="frozen-model"))
    assert flags is None and "a frozen reference model" in why
    assert trainer_flags(PlanOptions(optimizer="sgd"))[0] is None
    assert trainer_flags(PlanOptions(loss_impl="naive"))[0] is None
    assert "foreach" in trainer_flags(PlanOptions(optimizer="adamw", optimizer_impl="fused"))[1]
    flags, _ = trainer_flags(PlanOptions(num_gpus=8, finetune="lora", reference_mode="lora-disabled", cpu_offload=True))
    assert flags[flags.index("--lora-rank") + 1] == "16" and "--cpu-offload" in flags and "bfloat16" in flags
    assert plan_main(["llama3-8b", "--gpus", "8", "--reference", "frozen-model", "--no-recommend"]) == 0
    assert "command: none: not a trainer configuration (a frozen reference model" in capsys.readouterr().out
