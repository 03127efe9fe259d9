"""SPINTrainer against TRL's DPOTrainer (with and without ``use_liger_kernel=True``) on the same model and data.

    python -m benchmarks.trl_trainer                       # writes results/<device>/trl-trainer.{json,md}
    python -m benchmarks.trl_trainer --steps 2 --pairs 8   # a quick look
    python -m benchmarks.trl_trainer --loss-types sigmoid,ipo,sigmoid+sft   # the loss types (default)

Each loss type (``DPOConfig.loss_type``; ``a+b`` is the list ``[a, b]`` with weights 1) runs every
contender: "sigmoid" is SPINTrainer's one-pass fused SPIN loss, the others its fused sequence
log-probs fed to TRL's formulas (``spin_kernels.integrations.dpo_losses``).

Every contender runs in a fresh process (``--one NAME``), so that one's allocations do not count
against another's peak: it builds the model, the frozen reference copy and the trainer, runs
``warmup`` optimizer steps (optimizer state allocated, caches warm), resets the process's peak RSS
(``/proc/self/clear_refs``), runs ``steps`` more, and reports the median wall time of a whole
trainer step (collation, reference pass, policy forward, loss, backward, clipping, AdamW update,
logging) and the peak RSS growth over those steps. Same rows in the same order for all (sequential
sampler), so the logged losses must agree.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .env import ROOT, device_slug, environment
from .memprobe import _reset_peak, _status_kib

CONTENDERS = {
    "SPINTrainer": "spin_kernels.integrations.trl.SPINTrainer: packed, fused ops (impl auto), no logits",
    "DPOTrainer": "trl.DPOTrainer: padded, TRL's chunked lm-head log-probs",
    "DPOTrainer+liger": "trl.DPOTrainer(use_liger_kernel=True): Liger's layer kernels on top",
    "DPOTrainer+liger-interpret": "the same under TRITON_INTERPRET=1 (Triton's CPU interpreter)",
}
MODEL = {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}


def _rows(pairs: int) -> list[dict]:
    """UltraChat sample rows; each synthetic response is the next row's real one."""
    with open(ROOT / "tests" / "data" / "ultrachat_sample.jsonl") as f:
        rows = [json.loads(line) for line in f][:pairs + 1]
    return [{"prompt": r["prompt"], "real": r["real"], "synthetic": rows[i + 1]["real"]}
            for i, r in enumerate(rows[:pairs])]


LOSS_TYPES = "sigmoid,ipo,sigmoid+sft"


def _loss_type(spec: str) -> str | list[str]:
    """"ipo" -> "ipo"; "sigmoid+sft" -> ["sigmoid", "sft"]."""
    parts = spec.split("+")
    return parts[0] if len(parts) == 1 else parts


def _run_one(name: str, opts) -> dict:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(opts.threads)
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from spin_kernels.integrations.trl import SPINTrainer
    from spin_kernels.packing import sample_tokenizer

    tok = sample_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                         bos_token_id=None))
    ref = copy.deepcopy(model).requires_grad_(False)
    rows = _rows(opts.pairs)
    if name != "SPINTrainer":
        rows = [{"prompt": r["prompt"], "chosen": r["real"], "rejected": r["synthetic"]} for r in rows]
    timer = {"times": [], "base_kib": None, "peak_kib": None, "reset": False}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == opts.warmup:
                import gc

                gc.collect()
                timer["reset"] = _reset_peak()
                timer["base_kib"] = _status_kib("VmRSS")
            timer["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step > opts.warmup:
                timer["times"].append(time.perf_counter() - timer["t0"])

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=opts.batch, max_steps=opts.warmup + opts.steps,
                         max_length=opts.max_length, bf16=False, gradient_checkpointing=False, report_to=[],
                         logging_steps=1, use_cpu=True, save_strategy="no", train_sampling_strategy="sequential",
                         disable_tqdm=True, use_liger_kernel="liger" in name, learning_rate=1e-6,
                         loss_type=_loss_type(opts.loss_types))
        cls = SPINTrainer if name == "SPINTrainer" else DPOTrainer
        trainer = cls(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tok, callbacks=[Timer()])
        batch = trainer.get_train_dataloader()
        first = next(iter(batch))
        tokens = int(first["attention_mask"].numel()) if "attention_mask" in first else int(first["input_ids"].numel())
        real = int(first["attention_mask"].sum()) if "attention_mask" in first else tokens
        trainer.train()
    timer["peak_kib"] = _status_kib("VmHWM")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"status": "ok", "median_step_s": statistics.median(timer["times"]), "step_s": timer["times"],
            "peak_extra_mib": (timer["peak_kib"] - timer["base_kib"]) / 1024 if timer["reset"] else None,
            "first_batch_tokens": tokens, "first_batch_real_tokens": real, "losses": losses}


def _child(name: str, loss_type: str, opts) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.trl_trainer", "--one", name, "--steps", str(opts.steps), "--warmup",
           str(opts.warmup), "--pairs", str(opts.pairs), "--batch", str(opts.batch), "--max-length",
           str(opts.max_length), "--threads", str(opts.threads), "--loss-types", loss_type]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if name.endswith("-interpret"):
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    lines = [line for line in res.stdout.splitlines() if line.startswith("{\"status\"")]
    if lines:
        return json.loads(lines[-1])
    err = [line for line in res.stderr.splitlines() if "Error" in line]
    return {"status": "error", "note": (err[-1] if err else res.stderr[-300:]).strip()[:300]}


def _table(record: dict) -> str:
    env, o = record["env"], record["options"]
    lines = [
        "# TRL trainers on CPU: SPINTrainer vs DPOTrainer",
        "",
        f"- Command: `{record['command']}`",
        f"- CPU: {env['cpu_model']}, {o['threads']} torch threads; the machine was shared with other jobs "
        f"(1-minute load average {record['load_average']['before'][0]:.1f} before, "
        f"{record['load_average']['after'][0]:.1f} after, on {env['cpu_count']} cores): times are noisy, medians "
        "and ratios matter more than absolute times; peak memory (RSS growth of each trainer's own process) is "
        "not affected by the load",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v and k != "cuda"),
        f"- Commit: {env['git']['commit']}",
        f"- Model: Llama from a config, H={MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, "
        f"V={MODEL['vocab_size']:,}, float32; a frozen copy is the live reference model",
        f"- Data: {o['pairs']} UltraChat-sample pairs (synthetic = the next row's real response), "
        f"{o['batch']} pairs per step, max_length {o['max_length']}, sequential order; TRL's tokenisation "
        "for all",
        f"- Timing: {o['warmup']} warm-up step(s), then the median of {o['steps']} trainer steps (reference "
        "pass + policy forward + loss + backward + clipping + AdamW + logging); peak = RSS growth over the "
        "timed steps",
        "",
        "| loss_type | trainer | median step | speed-up | peak extra MiB | memory ratio | tokens of step 1 (real) "
        "| losses |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for loss_type, results in record["results"].items():
        base = results.get("DPOTrainer", {})
        for name, r in results.items():
            if r["status"] != "ok":
                lines.append(f"| {loss_type} | {name} | fails: {r['note']} | | | | | |")
                continue
            speed = base["median_step_s"] / r["median_step_s"] if base.get("status") == "ok" else float("nan")
            mem = (base["peak_extra_mib"] / r["peak_extra_mib"]
                   if base.get("status") == "ok" and r["peak_extra_mib"] else float("nan"))
            losses = ", ".join(f"{x:.4f}" for x in r["losses"])
            lines.append(f"| {loss_type} | {name} | {r['median_step_s'] * 1000:,.0f} ms | {speed:.2f}× | "
                         f"{r['peak_extra_mib']:,.0f} | {mem:.2f}× | {r['first_batch_tokens']:,} "
                         f"({r['first_batch_real_tokens']:,}) | {losses} |")
    lines += ["", "Contenders: " + "; ".join(f"**{k}**: {v}" for k, v in CONTENDERS.items()) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--pairs", type=int, default=24)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=",".join(CONTENDERS))
    p.add_argument("--loss-types", default=LOSS_TYPES,
                   help="comma-separated DPOConfig.loss_type values; a+b is the list [a, b] (default %(default)s)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--one", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.one:
        try:
            result = _run_one(opts.one, opts)
        except Exception as exc:  # noqa: BLE001 - a contender that cannot run is a row of the table
            result = {"status": "error", "note": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:240]}"}
        print(json.dumps(result), flush=True)
        return 0
    torch.set_num_threads(opts.threads)
    load_before = os.getloadavg()
    results = {}
    for loss_type in opts.loss_types.split(","):
        results[loss_type] = {}
        for name in opts.only.split(","):
            t0 = time.perf_counter()
            r = results[loss_type][name] = _child(name, loss_type, opts)
            print(f"{loss_type} {name}: {r.get('median_step_s', r.get('note'))} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    command = "python -m benchmarks.trl_trainer" + ("" if argv is None else " " + " ".join(argv))
    if argv is None and len(sys.argv) > 1:
        command = "python -m benchmarks.trl_trainer " + " ".join(sys.argv[1:])
    record = {"command": command, "options": {k: v for k, v in vars(opts).items() if k not in ("one", "out")},
              "env": environment(torch.device("cpu")), "model": MODEL, "results": results,
              "load_average": {"before": load_before, "after": os.getloadavg()}}
    folder = Path(opts.out) / device_slug(torch.device("cpu"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trl-trainer.json").write_text(json.dumps(record, indent=1) + "\n")
    (folder / "trl-trainer.md").write_text(_table(record))
    print(_table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
