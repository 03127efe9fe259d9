"""Metrics: JSONL (always), TensorBoard (optional), a PNG per iteration, terminal tables."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from .data import read_jsonl

# The metric schema, as the plots group it ({panel title: keys}); tests/test_metrics.py checks that
# the producers write exactly these keys.
#: A training step's row of metrics.jsonl: the SPIN loss and the metrics of spin_kernels.spin_loss (the
#: trainer adds step, lr, grad_norm and counts).
STEP_PANELS = {"loss": ("loss",), "rewards": ("rewards/real", "rewards/synthetic", "rewards/margin"),
               "accuracy": ("rewards/accuracy",), "log-probs": ("logps/real", "logps/synthetic")}
#: Held-out evaluation of an iteration's model (evaluation.heldout_metrics), in summary.json.
HELDOUT_PANELS = {"held-out accuracy": ("heldout/accuracy",), "held-out margin": ("heldout/margin",),
                  "held-out log p(real) / token": ("heldout/logp_real_per_token",)}
#: The opponent's synthetic responses of an iteration (evaluation.synthetic_stats), in summary.json.
SYNTHETIC_PANELS = {"synthetic responses": ("synthetic/finished", "synthetic/distinct2", "synthetic/duplicates"),
                    "synthetic tokens": ("synthetic/mean_tokens",)}
STEP_KEYS = tuple(k for keys in STEP_PANELS.values() for k in keys)
HELDOUT_KEYS = (*(k for keys in HELDOUT_PANELS.values() for k in keys), "heldout/pairs")
SYNTHETIC_KEYS = tuple(k for keys in SYNTHETIC_PANELS.values() for k in keys)


class MetricsLogger:
    """Append one JSON row per logged step to ``path`` (and to TensorBoard when asked and installed).

    ``resume_from_step``: rows with a step beyond it were logged after the checkpoint we resume
    from; they are dropped so that the file reads as if the run had never been interrupted.
    """

    def __init__(self, path: str, *, tensorboard: bool = False, resume_from_step: int | None = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_from_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            rows = [r for r in read_jsonl(path, tolerate_torn_tail=True) if r.get("step", 0) <= resume_from_step]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(os.path.dirname(os.path.abspath(path)), "tensorboard"))
            except ImportError:
                print("spin-kernels: tensorboard not installed; metrics go to JSONL only")

    def log(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, row["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    return list(read_jsonl(path, tolerate_torn_tail=True)) if os.path.exists(path) else []


def plot_metrics(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> str | None:
    """A grid of per-step curves (loss, rewards, accuracy, log-probs, lr, grad norm) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("spin-kernels: matplotlib not installed; no plot written")
        return None
    panels = [*STEP_PANELS.items(), ("learning rate", ["lr"]), ("grad norm", ["grad_norm"])]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    steps = [r["step"] for r in rows]
    for ax, (name, keys) in zip(axes.flat, panels):
        for k in keys:
            ax.plot(steps, [r.get(k, math.nan) for r in rows], marker="." if len(rows) < 40 else None, label=k)
        ax.set_title(name)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_summary(rows: Sequence[dict[str, Any]], path: str) -> str | None:
    """The per-iteration curves of a run (training loss/accuracy, held-out accuracy, margin and
    log-prob per token, synthetic-data statistics, any demo KL) as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [("training (last steps)", ["loss last", "accuracy"]), *HELDOUT_PANELS.items(), *SYNTHETIC_PANELS.items()]
    panels = [(name, [k for k in keys if any(k in r for r in rows)]) for name, keys in panels]
    panels = [(name, keys) for name, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    its = [r["iteration"] for r in rows]
    for ax, (name, keys) in zip(axes.flat, panels):
        for k in keys:
            ax.plot(its, [r.get(k, math.nan) for r in rows], marker="o", label=k)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("iteration")
        if "held-out accuracy" in name:
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        if len(keys) > 1:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, floatfmt: str = "{:.4g}") -> str:
    """A Markdown table (readable in a terminal too)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return floatfmt.format(v)
        return "" if v is None else str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def summarise_iteration(rows: Sequence[dict[str, Any]], tail: int = 3) -> dict[str, float]:
    """One iteration in a few numbers: the loss over its first and last ``tail`` logged steps,
    and the last steps' accuracy, margin and log-probs (means over those steps)."""
    def mean(key: str, part: Sequence[dict[str, Any]]) -> float:
        vals = [r[key] for r in part if key in r]
        return sum(vals) / len(vals) if vals else math.nan

    last = rows[-tail:]
    return {"steps": rows[-1]["step"] if rows else 0, "loss first": mean("loss", rows[:tail]),
            "loss last": mean("loss", last), "accuracy": mean("rewards/accuracy", last),
            "margin": mean("rewards/margin", last), "logp real": mean("logps/real", last),
            "logp synthetic": mean("logps/synthetic", last)}
