"""The ``evaluate`` stage: the trained model scores the held-out pairs (which never train), and
``heldout_eval.json`` records the held-out metrics (spin_kernels.training.evaluation) with the
key of what they were made from: the trained model (its training key) and the pairs, and the
digest of its content (a changed file is scored again)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from .. import provenance
from ..config import SpinConfig, TrainingConfig
from ..data import Record
from ..parallel import barrier, is_main
from ..reference import reference_logps_for, to_examples
from . import Models
from .train import TrainedModel


@dataclasses.dataclass
class EvaluatePlan:
    """Scoring the held-out ``pairs`` with the trained model into ``out_path`` (``training``:
    the iteration's options: β, the averaging, the token budget)."""

    cfg: SpinConfig
    training: TrainingConfig
    pairs: list[Record]
    model: TrainedModel
    out_path: str
    key: str
    done: dict[str, Any] | None
    desc: str = "held-out"
    stage = "evaluate"

    @property
    def current(self) -> bool:
        return self.done is not None and self.done.get("key") == self.key and provenance.row_damage(self.done) is None

    @property
    def output(self) -> dict[str, Any] | None:
        return metrics_of(self.done) if self.current else None

    @property
    def reads(self) -> list[str]:
        return [self.model.model_dir, self.out_path]

    @property
    def left(self) -> str:
        return "" if self.current else f"score {len(self.pairs)} held-out pair(s) with {self.model.model_dir}"


def heldout_key(training_key: str, pairs: list[Record]) -> str:
    """What a held-out evaluation is made from: the trained model (its training key) and the pairs."""
    return provenance.text_digest(training_key, [(r["prompt"], r["real"], r["synthetic"], r["ref_logps"])
                                                 for r in pairs])


def metrics_of(done: dict[str, Any]) -> dict[str, Any]:
    """The metrics of a heldout_eval.json (without its key and digest)."""
    return {k: v for k, v in done.items() if k not in ("key", provenance.ROW_DIGEST)}


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object of ``path``, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def plan(cfg: SpinConfig, pairs: list[Record], model: TrainedModel, out_path: str, *, iteration: int = 0,
         desc: str = "held-out") -> EvaluatePlan:
    """Whether ``out_path`` holds the evaluation of ``model`` on ``pairs``."""
    return EvaluatePlan(cfg, cfg.for_iteration(iteration), pairs, model, out_path, heldout_key(model.key, pairs),
                        read_json(out_path), desc)


def run(plan: EvaluatePlan, loader, models: Models | None = None) -> dict[str, Any]:
    """Score the pairs with the trained model (the one in memory right after training, else
    loaded from its directory) and write the metrics; returns them."""
    from ..evaluation import heldout_metrics

    if plan.current:
        return plan.output
    t = plan.training
    model = (models or Models(loader)).runner(plan.model.model_dir, prepared=True)
    examples = to_examples(loader.tokenizer(plan.cfg.model.model), plan.pairs, plan.cfg.data)
    sums = reference_logps_for(model, examples, token_budget=t.token_budget, impl=t.impl, average=False,
                               share_prompt=t.share_prompt, autocast=loader.autocast, desc=plan.desc)
    if t.average_log_prob:  # the margin in the convention the reference log-probs were computed in
        policy = [(r / max(1, len(ex.real_ids)), s / max(1, len(ex.synthetic_ids))) for (r, s), ex in
                  zip(sums, examples)]
    else:
        policy = sums
    metrics = heldout_metrics(policy, plan.pairs, t.beta, [len(ex.real_ids) for ex in examples])
    metrics["heldout/logp_real_per_token"] = sum(r for r, _ in sums) / max(1, sum(len(ex.real_ids)
                                                                                for ex in examples))
    if is_main():
        with open(plan.out_path + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(provenance.with_row_digest({"key": plan.key, **metrics}), fh, indent=1)
        os.replace(plan.out_path + ".tmp", plan.out_path)
    barrier()
    return metrics
