"""What fits for one model on 1, 2, 4 and 8 GPUs of each memory size, full fine-tuning, LoRA and
QLoRA, as Markdown: each cell the peak, the moment and term that set it, and the command that runs it.

    python -m spin_kernels.memory.table llama3-70b --gpu-memory 80 141

Each cell is ``recommend(...)`` with at most that many GPUs (the paper's recipe otherwise: RMSprop,
bf16 mixed precision, 1,024-token sequences, 256 new tokens, the Triton fused loss; LoRA rank 16
on every decoder linear map with the reference = the adapter disabled; QLoRA: the same on an NF4
base, one process, as the trainer runs it).
"""

from __future__ import annotations

import argparse
import sys

from .commands import launch_command
from .estimate import recommend
from .options import GiB, PlanOptions

MODES = {"full": {}, "lora": {"finetune": "lora", "reference_mode": "lora-disabled"},
         "qlora": {"finetune": "lora", "quantize": "nf4", "reference_mode": "lora-disabled"}}


def cells(model: str, gpus: list[int], memories: list[float], lora_rank: int = 16) -> list[dict]:
    rows = []
    for mem in memories:
        for g in gpus:
            for mode, fields in MODES.items():
                opts = PlanOptions(num_gpus=g, gpu_memory_gib=mem, lora_rank=lora_rank, **fields)
                best = recommend(model, opts, max_gpus=g)
                command = None
                if best is not None:
                    command, _ = launch_command(best.options, model=f"PATH/TO/{model}", data="DATA.jsonl",
                                                output_dir=f"runs/{model}-{mode}-{g}x{mem:g}")
                rows.append({"gpus": g, "memory": mem, "mode": mode, "plan": best, "command": command})
    return rows


def _cell(c: dict) -> str:
    p = c["plan"]
    if p is None:
        return "does not fit"
    o = p.options
    how = [f"{o.num_gpus} GPU{'s' if o.num_gpus > 1 else ''}" if o.num_gpus != c["gpus"] else "",
           f"CPU offload, host {p.host_per_node / GiB:.0f} GiB" if o.cpu_offload else "",
           "AC" if o.activation_checkpointing else "no AC", f"budget {o.token_budget}",
           f"gen batch {o.gen_batch}" if o.gen_batch != 32 else ""]
    peak = p.peak_point
    term, value = peak.set_by()
    return (f"{p.peak / GiB:.1f} GiB at {peak.moment} ({term} {value / GiB:.1f}); "
            f"{', '.join(h for h in how if h)}")


def markdown(model: str, gpus: list[int], memories: list[float]) -> str:
    rows = cells(model, gpus, memories)
    by = {(c["gpus"], c["memory"], c["mode"]): c for c in rows}
    lines = ["| GPUs | GPU memory | full fine-tuning | LoRA (rank 16) | QLoRA (NF4, rank 16) |",
             "|---|---|---|---|---|"]
    for mem in memories:
        for g in gpus:
            lines.append(f"| {g} | {mem:g} GiB | " + " | ".join(_cell(by[(g, mem, mode)]) for mode in MODES) + " |")
    lines += ["", "<details><summary>The command of each configuration that fits (fill in --model and --data)"
                  "</summary>", "", "```"]
    for c in rows:
        if c["command"]:
            lines.append(f"# {c['gpus']} x {c['memory']:g} GiB, {c['mode']}")
            lines.append(c["command"])
    lines += ["```", "", "</details>"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="llama3-70b")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--gpu-memory", type=float, nargs="+", default=[80.0, 141.0])
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    print(markdown(args.model, args.gpus, args.gpu_memory))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
