"""SPINTrainer against TRL's DPOTrainer: the differences the parity test asserts on, as a table.

    python -m benchmarks.trl_parity        # writes results/<device>/trl-parity.{json,md}

Runs the cases of ``tests/test_trl_trainer.py`` (its setting: ``tests/trl_setup.py``; tiny Llama,
V 4,096, H 64, 2 layers, fp32, 8 UltraChat-sample rows, max_length 96, the first micro-batch of 4
pairs): sigmoid and hinge at beta 2.0 with every reference source, every TRL loss type
(``LOSS_CASES``, beta 0.5) with a live reference, and the other reference sources with loss types
of the generic path (``REFERENCE_CASES``); records the largest differences of loss, gradients and
metrics.
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

LABEL = {"ref_model": "live reference model", "precomputed": "precomputed by each trainer",
         "column": "TRL's values as a ref_logps column", "peft": "LoRA policy, reference = adapter disabled"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    opts = p.parse_args(argv)
    torch.set_num_threads(opts.threads)
    from trl_setup import (LOSS_CASES, METRIC_RTOL, REFERENCE_CASES, RTOL, loss_case, parity_case,
                           policy_and_reference, tokenizer)

    tok = tokenizer()
    models = policy_and_reference(tok)
    runs = [(lambda out, lt=lt, ref=ref: parity_case(out, tok, models, lt, ref), lt, {}, ref)
            for ref in ("ref_model", "precomputed", "column") for lt in ("sigmoid", "hinge")]
    runs.append((lambda out: parity_case(out, tok, models, "sigmoid", "peft"), "sigmoid", {}, "peft"))
    for case, ref in [(c, "ref_model") for c in LOSS_CASES] + REFERENCE_CASES:
        runs.append((lambda out, case=case, ref=ref: loss_case(out, tok, models, case, ref), *case, ref))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (run, loss_type, config, reference) in enumerate(runs):
            case = run(f"{tmp}/{i}")
            d = case["diff"]
            rows.append({"loss_type": loss_type, "options": config, "beta": case["trainers"][1].beta,
                         "reference": reference, "loss": float(case["dpo"]["loss"]),
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
        "- Setting: tiny Llama from a config (V 4,096, H 64, 2 layers, fp32), 8 UltraChat-sample rows, "
        "max_length 96 (completions cut), first micro-batch of 4 pairs; policy = reference + noise; aot and "
        "aot_unpaired alone on rows whose responses are near-equal in length (the sort across the batch matters)",
        "- rel: max |Δ| / max |g| per tensor, worst tensor; metrics: rewards/margins/log-probs against beta·|logps| "
        "(their fp32 scale); accuracies and token counts must be equal",
        "",
        "| loss_type | options | beta | reference | loss | loss abs | loss rel | gradients max abs | gradients rel "
        "| metrics rel |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = " + ".join(r["loss_type"]) if isinstance(r["loss_type"], list) else r["loss_type"]
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        lines.append(f"| {name} | {options} | {r['beta']:g} | {LABEL[r['reference']]} | {r['loss']:.4f} | "
                     f"{r['loss_abs']:.1e} | {r['loss_rel']:.1e} | {r['grad_abs']:.1e} | {r['grad_rel']:.1e} | "
                     f"{r['metric_rel']:.1e} |")
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
