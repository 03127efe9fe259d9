"""The time estimate's method (``spin_kernels.memory.cost``) checked on CPU against the iteration suite.

The iteration suite (``benchmarks/iteration.py``) times the stages of one SPIN iteration of a
9.4M-parameter Llama on the UltraChat sample. This check estimates the same stages with the same
FLOP and byte counts the GPU estimates use, from rates of *this* CPU measured here beforehand with
micro-benchmarks (no stage time enters them):

* ``flops``: a [4096, 384] x [384, 1024] fp32 matrix product (the model's MLP shape), best of 10;
* ``hbm``: a 256 MiB tensor copy (read + write), best of 10;
* ``decode_overhead_s``: one decoding step of a random model of the same shape at the run's
  generation batch (16) after prompts of its prompt limit (256 tokens), divided by its layers, on
  one thread, best of 5: the per-layer cost of transformers' ``generate`` there (its FLOPs are a
  few percent of it at this size).

The machine is shared with other jobs, so time is counted in **process CPU seconds**, for the
rates (``time.process_time`` around each micro-benchmark) and for the stages (the iteration suite
records each stage's CPU seconds beside its wall time): a process that waits for the CPU
accumulates no CPU time. Utilisations are 1 (the micro-benchmarks are what this CPU reaches); the
estimate is compared with the ``before`` case (transformers generate, batches of 16: the trainer's
default backend) of an iteration-suite result of the same CPU model and thread count when there is
one, else with whatever result file is given, flagged as another machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def _best(fn, repeats: int = 5) -> float:
    """The smallest process CPU time of ``fn`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def cpu_rates(model_dir: str | None = None, batch: int = 16, prompt: int = 256):
    """DeviceRates of this CPU at torch's current thread count, measured now (the decoding step of
    ``batch`` sequences after ``prompt`` tokens: the generation batch and prompt limit of the run
    it is compared with)."""
    from spin_kernels.memory.cost import DeviceRates

    a, b = torch.randn(4096, 384), torch.randn(384, 1024)
    flops = 2 * 4096 * 384 * 1024 / _best(lambda: a @ b, 10)
    src = torch.empty(64 * 2**20)
    src.fill_(1.0)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _best(lambda: dst.copy_(src), 10)
    overhead = _decode_overhead(model_dir, batch, prompt) if model_dir else 0.0
    return DeviceRates(f"CPU ({torch.get_num_threads()} threads, per CPU second)", flops, bandwidth, link=float("inf"),
                       pcie=float("inf"), mfu=1.0, mem_util=1.0, link_util=1.0, decode_overhead_s=overhead)


def _decode_overhead(model_dir: str, batch: int, prompt: int) -> float:
    """CPU seconds per layer of one decoding step of ``batch`` sequences (transformers' generate from
    random ``prompt``-token prompts, 32 new tokens, random weights of the model's shape), on one thread: a
    second thread that spin-waits while the machine is oversubscribed would count CPU time that
    does no work. At this size the step is small matrix products, the KV cache's copies and the
    framework's per-op work, not FLOPs: the rate of the step itself."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt))
    steps = 32

    def run():
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                           do_sample=True, pad_token_id=model.config.eos_token_id)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _best(run, 5) / steps / model.config.num_hidden_layers
    finally:
        torch.set_num_threads(threads)


def data_size(info: dict, case: dict):
    """The iteration's DataSize: the sample's prompts and real responses as the loop tokenised and cut
    them (mean lengths from the reference stage's tokens), and the measured mean generated length."""
    from spin_kernels.memory.cost import DataSize
    from spin_kernels.packing import load_ultrachat_sample, sample_tokenizer
    from spin_kernels.packing.example import tokenize_prompt

    tok = sample_tokenizer()
    rows = load_ultrachat_sample()[:info["prompts"]]
    limit = info["settings"]["data"]["max_prompt_length"]
    prompt = sum(len(tokenize_prompt(tok, r["prompt"], max_prompt_length=limit)) for r in rows) / len(rows)
    gen = case["stages"]["generate"]["tokens"] / case["stages"]["generate"]["prompts"]
    pairs = case["stages"]["reference"]["pairs"]
    real = case["stages"]["reference"]["tokens"] / pairs - 2 * prompt - gen
    return DataSize(prompts=pairs, prompt_tokens=prompt, real_tokens=real, generated_tokens=gen,
                    epochs=info["settings"]["training"]["epochs"],
                    global_batch_pairs=info["settings"]["training"]["global_batch_pairs"])


def iteration_plan(info: dict, case: dict):
    """The plan of the iteration suite's run: one CPU process, fp32, the C++ loss."""
    from spin_kernels.memory import plan, spec_from_config

    m = info["model"]
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "tie_word_embeddings")
    spec = spec_from_config({**{k: m[k] for k in keys}, "vocab_size": 4096}, name="iteration-llama")
    s = info["settings"]
    return plan(spec, device="cpu", num_gpus=1, fsdp=False, mixed_precision=None, token_budget=s["training"][
        "token_budget"], max_seqlen=s["data"]["max_length"], prompt_len=s["data"]["max_prompt_length"],
        max_new_tokens=info["max_new_tokens"], gen_batch=case["generation"]["generation_batch_size"],
        activation_checkpointing=False, attention="sdpa_loop", loss_impl="cpu", process_gib=0.0)


def check(result_path: Path, rates=None) -> dict:
    """Estimated against measured stage times of the ``before`` case of ``result_path``."""
    from benchmarks.env import cpu_model
    from spin_kernels.memory.cost import estimate_time

    record = json.loads(Path(result_path).read_text())
    case = next(c for c in record["cases"] if c["case"] == "before" and c["status"] == "ok")
    rates = rates or cpu_rates()
    est = estimate_time(iteration_plan(record["info"], case), data_size(record["info"], case), rates)
    names = {"generation": "generate", "reference": "reference", "training": "train"}
    stages = {}
    for s, key in zip(est.stages, names):
        measured = case["stages"][names[key]]
        stages[key] = {"estimated_cpu_s": s.seconds, "measured_cpu_s": measured["cpu_s"],
                       "measured_wall_s": measured["wall_s"], "ratio": s.seconds / measured["cpu_s"],
                       "bound": s.bound, "parts": s.parts}
    same = record["env"]["cpu_model"] == cpu_model() and record["env"]["torch_threads"] == torch.get_num_threads()
    load = record.get("load_average") or {}
    return {"result": str(result_path), "measured_on": f"{record['env']['cpu_model']}, "
            f"{record['env']['torch_threads']} threads, {record['created']}", "same_machine": same,
            "load_average": load, "prompts": record["info"]["prompts"], "max_new_tokens": record["info"][
                "max_new_tokens"],
            "rates": {"flops": rates.flops, "bandwidth": rates.hbm, "decode_overhead_s": rates.decode_overhead_s,
                      "name": rates.name},
            "data": {k: getattr(est.data, k) for k in ("prompts", "prompt_tokens", "real_tokens", "generated_tokens",
                                                       "epochs")}, "stages": stages}


def markdown_lines(result: dict) -> list[str]:
    r = result["rates"]
    load = result.get("load_average") or {}
    lines = ["", "## Time estimate, checked on CPU against the iteration suite", "",
             f"Rates measured here, per process CPU second: {r['flops'] / 1e9:.0f} GFLOP (fp32 GEMM), "
             f"{r['bandwidth'] / 1e9:.1f} GB (copy), {r['decode_overhead_s'] * 1e6:.0f} us per layer and decoding "
             f"step; compared with the CPU seconds of each stage in `{result['result']}` ({result['measured_on']}, "
             f"{result['prompts']} prompts, {result['max_new_tokens']} new tokens; load average "
             f"{'/'.join(map(str, load.get('start') or []))} at its start on a shared machine; "
             + ("this CPU model and thread count)." if result["same_machine"] else
                "ANOTHER machine: rates do not apply)."),
             "", "| stage | estimated CPU s | measured CPU s (wall) | estimated / measured | limit |",
             "|---|---|---|---|---|"]
    for name, s in result["stages"].items():
        lines.append(f"| {name} | {s['estimated_cpu_s']:.1f} | {s['measured_cpu_s']:.1f} ({s['measured_wall_s']:.1f}) "
                     f"| {s['ratio']:.2f} | {s['bound']} |")
    return lines
