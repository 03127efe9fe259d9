"""SPINTrainer against TRL's DPOTrainer: the differences the parity test asserts on, as a table.

    python -m benchmarks.trl_parity        # writes results/<device>/trl-parity.{json,md}

Runs the cases of ``tests/test_trl_trainer.py`` (its setting: ``tests/trl_setup.py``; tiny Llama,
V 4,096, H 64, 2 layers, fp32, 8 UltraChat-sample rows, beta 2.0, max_length 96, the first
micro-batch of 4 pairs) and records the largest differences of loss, gradients and metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from .env import ROOT, device_slug, environment

sys.path.insert(0, str(ROOT / "tests"))

CASES = [(lt, ref) for ref in ("ref_model", "precomputed", "column") for lt in ("sigmoid", "hinge")]
CASES.append(("sigmoid", "peft"))
LABEL = {"ref_model": "live reference model", "precomputed": "precomputed by each trainer",
         "column": "TRL's values as a ref_logps column", "peft": "LoRA policy, reference = adapter disabled"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    opts = p.parse_args(argv)
    torch.set_num_threads(opts.threads)
    from trl_setup import METRIC_RTOL, RTOL, parity_case, policy_and_reference, tokenizer

    tok = tokenizer()
    models = policy_and_reference(tok)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (loss_type, reference) in enumerate(CASES):
            case = parity_case(f"{tmp}/{i}", tok, models, loss_type, reference)
            d = case["diff"]
            rows.append({"loss_type": loss_type, "reference": reference, "loss": float(case["dpo"]["loss"]),
                         **{k: d[k] for k in ("loss_abs", "loss_rel", "grad_abs", "grad_rel", "metric_rel")},
                         "exact_mismatch": d["exact"]})
            print(rows[-1], flush=True)
    record = {"command": "python -m benchmarks.trl_parity" + (" " + " ".join(argv) if argv else ""),
              "env": environment(torch.device("cpu")), "tolerances": {"rtol": RTOL, "metric_rtol": METRIC_RTOL},
              "cases": rows}
    env = record["env"]
    lines = [
        "# SPINTrainer vs TRL's DPOTrainer: parity",
        "",
        f"- Command: `{record['command']}` (the cases of `tests/test_trl_trainer.py`)",
        f"- CPU: {env['cpu_model']}, {opts.threads} torch threads",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v and k != "cuda"),
        f"- Commit: {env['git']['commit']}",
        "- Setting: tiny Llama from a config (V 4,096, H 64, 2 layers, fp32), 8 UltraChat-sample rows, beta 2.0, "
        "max_length 96 (completions cut), first micro-batch of 4 pairs; policy = reference + noise",
        "- rel: max |Δ| / max |g| per tensor, worst tensor; metrics: rewards/margins/log-probs against beta·|logps| "
        "(their fp32 scale); accuracies and token counts must be equal",
        "",
        "| loss_type | reference | loss | loss abs | loss rel | gradients max abs | gradients rel | metrics rel |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['loss_type']} | {LABEL[r['reference']]} | {r['loss']:.4f} | {r['loss_abs']:.1e} | "
                     f"{r['loss_rel']:.1e} | {r['grad_abs']:.1e} | {r['grad_rel']:.1e} | {r['metric_rel']:.1e} |")
    lines += ["", f"Asserted by the test: loss and gradients within {RTOL:g} relative, metrics within "
              f"{METRIC_RTOL:g} of their scale, accuracies and token counts equal.", ""]
    folder = Path(opts.out) / device_slug(torch.device("cpu"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trl-parity.json").write_text(json.dumps(record, indent=1) + "\n")
    (folder / "trl-parity.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
