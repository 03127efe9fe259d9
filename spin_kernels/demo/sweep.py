"""The demo's settings sweep, on validation samples only: SPIN's optimizer, lr and β are chosen by
the validation KL (never by the test samples the demo's table reports).

    python -m spin_kernels.demo.sweep --out runs/demo-sweep --iterations 2

Each grid point runs the demo (one task seed, the early-stopped SFT start shared by all points)
for ``--iterations`` SPIN iterations and records the validation KL of SPIN after each; the
table lists the best iteration's validation KL of each point and the start's.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import sys

from ..training.metrics import format_table
from .run import DemoConfig, demo_spin_defaults, run_demo

GRID = {"optimizer": ["adamw"], "learning_rate": [3e-5, 1e-4, 3e-4], "beta": [1.0, 3.0, 10.0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo-sweep")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--task-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    # The test KL is not looked at here (a handful of samples keeps it cheap), nor the controls.
    demo = DemoConfig(task_seed=args.task_seed, seeds=1, threads=args.threads, eval_examples=16, controls=False)
    rows = []
    shared_sft = None
    for opt, lr, beta in itertools.product(*GRID.values()):
        cfg = demo_spin_defaults(os.path.join(args.out, f"{opt}-{lr:g}-{beta:g}"))
        cfg.loop.iterations = args.iterations
        cfg.training = dataclasses.replace(cfg.training, optimizer=opt, learning_rate=lr, beta=beta)
        if shared_sft is not None:  # every point starts from the same SFT model
            os.makedirs(cfg.loop.output_dir, exist_ok=True)
            with open(os.path.join(cfg.loop.output_dir, "demo.json"), "w") as f:
                f.write("{}")
            for name in ("sft", "sft.json"):
                src = os.path.join(shared_sft, name)
                dst = os.path.join(cfg.loop.output_dir, name)
                if not os.path.exists(dst):
                    (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
            cfg.loop.resume = True
        result = run_demo(demo, cfg)
        shared_sft = shared_sft or cfg.loop.output_dir
        val = [r["val KL SPIN"] for r in result]
        best = min(range(1, len(val)), key=lambda i: val[i])
        rows.append({"optimizer": opt, "lr": f"{lr:g}", "beta": beta, "val KL start": val[0],
                     "best val KL": val[best], "at iteration": result[best]["iteration"],
                     "val KL last": val[-1]})
    rows.sort(key=lambda r: r["best val KL"])
    table = format_table(rows, list(rows[0]), floatfmt="{:.3f}")
    print(table)
    with open(os.path.join(args.out, "sweep.md"), "w", encoding="utf-8") as f:
        f.write(f"`python -m spin_kernels.demo.sweep {' '.join(argv or sys.argv[1:])}`\n\n{table}\n")
    with open(os.path.join(args.out, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
