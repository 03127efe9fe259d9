"""The planner suite: the memory planner's bound against measured peaks on a grid of configurations.

``python -m benchmarks run --suite planner --device cpu`` measures, for each configuration of
``GRID`` (1 and 2 ranks; full, LoRA, QLoRA; activation checkpointing on and off; a narrow and a
wide vocabulary; the shared-prompt layout on and off; RMSprop and AdamW), the peak resident set of
the trainer's training steps above the process's own baseline, moment by moment
(``planner_probe.py``: forward, backward, optimizer step; the larger of the two ranks), and the
plan of the same configuration (``spin_kernels.memory.plan`` with ``device="cpu"``: gloo, torch's
for-loop step, the C++ loss, the sdpa_loop attention, fp32). It writes predicted / measured per
configuration and per moment; the bound holds when every configuration's peak ratio is within
1.00-1.15 (``BOUND``).

Models are small Llamas saved with ``save_pretrained`` (``MODELS``: narrow 4 x 256, vocabulary 8,000;
wide 2 x 384, vocabulary 32,000, where the embeddings and lm_head are most of the model, as at 70B
per rank), batches fixed-length pairs (128-token prompt, two 128-token responses) filling the token
budget exactly (a shared-prompt pair is 385 tokens), 2 micro-batches per optimizer step, 2 steps.
Memory is affected by other processes far less than time (every figure is this process's own
resident set), so configurations run one at a time but on a shared machine. QLoRA under FSDP is
not measured: the trainer runs a 4-bit base in one process only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

#: predicted / measured must lie in this interval for every configuration's peak.
BOUND = (1.00, 1.15)
PROMPT, RESPONSE = 128, 128
MODELS = {
    "narrow": {"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 8,
               "num_key_value_heads": 4, "vocab_size": 8000},
    "wide": {"num_hidden_layers": 2, "hidden_size": 384, "intermediate_size": 1024, "num_attention_heads": 6,
             "num_key_value_heads": 6, "vocab_size": 32000},
}


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    name: str
    model: str           # a key of MODELS
    ranks: int           # 1: one process; 2: FSDP2 over 2 gloo ranks (torchrun)
    mode: str            # full, lora (rank 16), qlora (NF4 base + LoRA rank 16)
    ac: bool             # activation checkpointing
    share_prompt: bool
    optimizer: str       # rmsprop, adamw
    token_budget: int


GRID = [
    Case("narrow-full-adamw", "narrow", 1, "full", False, False, "adamw", 2048),
    Case("narrow-full-ac-rmsprop", "narrow", 1, "full", True, False, "rmsprop", 2048),
    Case("narrow-full-shared", "narrow", 1, "full", False, True, "rmsprop", 1540),
    Case("wide-full-adamw", "wide", 1, "full", False, False, "adamw", 1024),
    Case("narrow-lora-adamw", "narrow", 1, "lora", False, False, "adamw", 2048),
    Case("wide-lora-ac-shared", "wide", 1, "lora", True, True, "rmsprop", 1540),
    Case("narrow-qlora-adamw", "narrow", 1, "qlora", False, False, "adamw", 2048),
    Case("wide-qlora-ac", "wide", 1, "qlora", True, False, "rmsprop", 1024),
    Case("narrow-qlora-ac-shared", "narrow", 1, "qlora", True, True, "rmsprop", 1540),
    Case("fsdp2-narrow-full-ac-adamw", "narrow", 2, "full", True, False, "adamw", 2048),
    Case("fsdp2-wide-full-rmsprop", "wide", 2, "full", False, False, "rmsprop", 1024),
    Case("fsdp2-wide-full-ac-shared", "wide", 2, "full", True, True, "adamw", 1540),
    Case("fsdp2-narrow-lora-shared", "narrow", 2, "lora", False, True, "adamw", 1540),
    Case("fsdp2-wide-lora-ac", "wide", 2, "lora", True, False, "rmsprop", 1024),
]


def model_dirs(work_dir: Path) -> dict[str, str]:
    """Each of MODELS saved once in ``work_dir`` (random weights, seed 0; safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dirs = {}
    for name, shape in MODELS.items():
        path = Path(work_dir) / f"planner-{name}"
        if not (path / "config.json").exists():
            torch.manual_seed(0)
            config = LlamaConfig(**shape, tie_word_embeddings=False, max_position_embeddings=1024, pad_token_id=0,
                                 eos_token_id=1, bos_token_id=None)
            LlamaForCausalLM(config).save_pretrained(path)
        dirs[name] = str(path)
    return dirs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(case: Case, dirs: dict[str, str], timeout: float = 900) -> dict:
    """Run ``planner_probe`` for ``case`` in fresh process(es); the per-rank results."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1",
               SPIN_KERNELS_CPU_RULE="default", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as out:
        spec = {**asdict(case), "model_dir": dirs[case.model], "prompt": PROMPT,
                "response": RESPONSE, "impl": "auto", "micro_batches": 2, "steps": 2, "out_dir": out}
        module = ["-m", "benchmarks.planner_probe", json.dumps(spec)]
        if case.ranks > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(case.ranks),
                   "--master_port", str(_free_port()), *module]
        else:
            cmd = [sys.executable, *module]
        for attempt in range(2):  # a gloo rank aborted by a loaded machine is run once more
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode == 0:
                break
        if proc.returncode != 0:
            err = proc.stderr
            start = err.find("Traceback")
            raise RuntimeError(f"{case.name}: probe failed ({proc.returncode}): "
                               f"{err[start:start + 2000] if start >= 0 else err[-2000:]}")
        return {int(f.stem[4:]): json.loads(f.read_text()) for f in Path(out).glob("rank*.json")}


def predict(case: Case, tokens: int, counted_fraction: float):
    """The plan of ``case`` as the probe ran it."""
    from spin_kernels.memory import ModelSpec, plan, spec_from_config

    spec: ModelSpec = spec_from_config(MODELS[case.model], name=case.model)
    return plan(spec, device="cpu", num_gpus=case.ranks, fsdp=case.ranks > 1, mixed_precision=None, param_bytes=4,
                finetune="full" if case.mode == "full" else "lora", lora_rank=16,
                quantize="nf4" if case.mode == "qlora" else "none", optimizer=case.optimizer,
                activation_checkpointing=case.ac, share_prompt=case.share_prompt, token_budget=tokens,
                counted_fraction=counted_fraction, attention="sdpa_loop", loss_impl="cpu",
                max_seqlen=PROMPT + RESPONSE, gen_batch=1, prompt_len=1, max_new_tokens=1, process_gib=0.0)


MOMENTS = ("forward", "backward", "optimizer step")


def compare(case: Case, ranks: dict[int, dict]) -> dict:
    """Measured (the larger rank per moment) against predicted, per moment and at the peak."""
    measured = {m: max(r["moments"].get(m, 0) for r in ranks.values()) for m in MOMENTS}
    r0 = ranks[0]
    p = predict(case, max(r0["tokens"]), r0["counted_fraction"])
    predicted = {m: p.moment(m).total for m in MOMENTS}
    peak_measured = max(measured.values())
    return {"case": case.name, "status": "ok", "config": asdict(case), "measured": measured, "predicted": predicted,
            "peak_measured": peak_measured, "peak_predicted": p.train_peak, "ratio": p.train_peak / peak_measured,
            "peak_moment_measured": max(measured, key=measured.get), "peak": p.peak_summary(MOMENTS, 2**20),
            "moment_ratio": {m: predicted[m] / measured[m] if measured[m] else None for m in MOMENTS},
            "baseline_rss": {r: v["baseline_rss"] for r, v in ranks.items()}, "tokens": r0["tokens"],
            "counted_fraction": r0["counted_fraction"], "trainable": r0["trainable"]}


def run_suite(cases: list[str] | None = None, work_dir: Path | None = None) -> tuple[list[dict], list[str]]:
    work = Path(work_dir or Path(tempfile.gettempdir()) / "spin_kernels_bench")
    work.mkdir(parents=True, exist_ok=True)
    dirs = model_dirs(work)
    chosen = [c for c in GRID if cases is None or c.name in cases]
    results = []
    for case in chosen:
        print(f"[planner] {case.name}", flush=True)
        try:
            results.append(compare(case, measure(case, dirs)))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            results.append({"case": case.name, "status": "error", "config": asdict(case), "note": str(exc)[-1500:]})
    notes = [f"Bound: predicted / measured within {BOUND[0]:.2f}-{BOUND[1]:.2f} for every configuration's peak.",
             "Measured: peak resident set above the process's baseline (after imports and a warm-up step of the same "
             "configuration whose model is then dropped), glibc mmap threshold 64 KiB, 1 thread per process; the "
             "larger rank.",
             f"Batches: pairs of a {PROMPT}-token prompt and two {RESPONSE}-token responses filling the token budget, "
             "2 micro-batches per step, 2 optimizer steps; the trainer's model loading, optimizer, micro-batches "
             "and step (train_step), impl auto (the C++ loss, SPIN_KERNELS_CPU_RULE=default)."]
    return results, notes


def time_check(env: dict, results: Path, work_dir: Path | None = None, path: Path | None = None) -> dict | None:
    """The time estimate's method against the iteration suite's stage times (``cost_check``): ``path``,
    else this CPU's own iteration result (same slug) if there is one, else the newest other one
    (flagged as another machine)."""
    from .cost_check import check, cpu_rates
    from .iteration import MODEL

    own = Path(results) / env["device_slug"] / "iteration.json"
    others = sorted(Path(results).glob("cpu-*/iteration.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    path = path or (own if own.exists() else (others[0] if others else None))
    if path is None:
        return None
    work = Path(work_dir or Path(tempfile.gettempdir()) / "spin_kernels_bench")
    model_dir = work / "planner-iteration-shape"
    if not (model_dir / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=4096, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                                     **MODEL)).save_pretrained(model_dir)
    record = json.loads(Path(path).read_text())
    case = next(c for c in record["cases"] if c["case"] == "before" and c["status"] == "ok")
    return check(path, cpu_rates(str(model_dir), case["generation"]["generation_batch_size"],
                                 record["info"]["settings"]["data"]["max_prompt_length"]))


def _mib(x: float | None) -> str:
    return "–" if x is None else f"{x / 2**20:,.1f}"


def markdown(record: dict) -> str:
    from .report import header

    lines = header(record)
    lines += ["| configuration | model | ranks | mode | AC | shared prompt | optimizer | tokens | measured peak MiB "
              "(moment) | predicted MiB | predicted / measured | forward | backward | optimizer step | the plan's "
              "training peak and the term that sets it |", "|" + "---|" * 15]
    ok = [c for c in record["cases"] if c["status"] == "ok"]
    for c in record["cases"]:
        k = c["config"]
        if c["status"] != "ok":
            lines.append(f"| {c['case']} | {k['model']} | {k['ranks']} | {k['mode']} | | | | | error: "
                         f"{c['note'][:200]} |" + " |" * 6)
            continue
        mr = c["moment_ratio"]
        lines.append(
            f"| {c['case']} | {k['model']} | {k['ranks']} | {k['mode']} | {'on' if k['ac'] else 'off'} | "
            f"{'on' if k['share_prompt'] else 'off'} | {k['optimizer']} | {max(c['tokens'])} | "
            f"{_mib(c['peak_measured'])} ({c['peak_moment_measured']}) | {_mib(c['peak_predicted'])} | "
            f"**{c['ratio']:.3f}** | " + " | ".join(f"{_mib(c['predicted'][m])} / {_mib(c['measured'][m])}"
                                                   f" ({mr[m]:.2f})" if mr[m] else "–" for m in MOMENTS)
            + f" | {c['peak']} |")
    if ok:
        lo, hi = min(c["ratio"] for c in ok), max(c["ratio"] for c in ok)
        inside = sum(BOUND[0] <= c["ratio"] <= BOUND[1] for c in ok)
        lines += ["", f"Peak ratio predicted / measured: {lo:.3f}-{hi:.3f}; {inside} of {len(ok)} configurations "
                      f"within {BOUND[0]:.2f}-{BOUND[1]:.2f}. Per-moment cells: predicted / measured MiB (ratio)."]
        base = [v for c in ok for v in c["baseline_rss"].values()]
        lines.append(f"Non-tensor memory of a process (its resident set after imports and the warm-up, the baseline "
                     f"above): {min(base) / 2**20:,.0f}-{max(base) / 2**20:,.0f} MiB.")
    if record.get("time_check"):
        from .cost_check import markdown_lines

        lines += markdown_lines(record["time_check"])
    return "\n".join(lines) + "\n"
