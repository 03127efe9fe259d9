"""The ``train`` stage: the main player, initialised from the start model (the opponent), trained
on the pairs with the fused SPIN loss (``train_spin``), resumable from its step checkpoints.

Its output is current when ``out_dir`` holds a final model trained from exactly these inputs:
the training key (spin_kernels.training.provenance.training_key: the tokenised pairs with their
reference log-probs, the training options and the starting weights) recorded by the
checkpointer. ``_finished`` is the one place that asks the checkpointer.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from .. import provenance
from ..checkpoint import Checkpointer
from ..config import SpinConfig, TrainingConfig
from ..data import Record
from ..reference import to_examples
from ..trainer import global_batches, train_spin
from . import Models, describe_pairs


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """The output of the stage: the final model directory and the training key it records."""

    model_dir: str
    key: str


@dataclasses.dataclass
class TrainPlan:
    """Training on ``pairs`` (read from ``pairs_path``) from ``start_model`` into ``out_dir``
    with the options ``training``: ``examples`` are the tokenised pairs, ``key`` the training
    key, ``steps`` the optimizer steps of the whole training."""

    cfg: SpinConfig
    training: TrainingConfig
    pairs: list[Record]
    pairs_path: str
    examples: list
    out_dir: str
    start_model: str
    key: str
    steps: int
    current: bool
    info: dict[str, Any]
    desc: str = "train"
    stage = "train"

    @property
    def output(self) -> TrainedModel | None:
        return TrainedModel(os.path.join(self.out_dir, "model"), self.key) if self.current else None

    @property
    def reads(self) -> list[str]:
        return [self.start_model, self.pairs_path, self.out_dir]

    @property
    def left(self) -> str:
        return "" if self.current else (f"train {self.steps} step(s) on {len(self.examples)} pair(s) (from the latest "
                                         f"checkpoint of this key, with --resume)")


def _finished(out_dir: str, key: str) -> bool:
    """Whether ``out_dir`` holds the final model of the training ``key`` (the checkpointer's word)."""
    return Checkpointer.finished(out_dir, key)


def plan(cfg: SpinConfig, pairs: list[Record], out_dir: str, *, start_model: str, tokenizer, pairs_path: str,
         iteration: int = 0, info: dict[str, Any] | None = None, desc: str = "train") -> TrainPlan:
    """Training iteration ``iteration``'s options (``cfg.for_iteration``) on ``pairs`` from
    ``start_model``; current when ``out_dir`` already holds its final model."""
    training = cfg.for_iteration(iteration)
    examples = to_examples(tokenizer, pairs, cfg.data)
    key = provenance.training_key(examples, training, provenance.model_digest(start_model))
    steps = len(global_batches(len(examples), training.global_batch_pairs, training.epochs, training.seed))
    return TrainPlan(cfg, training, pairs, pairs_path, examples, out_dir, start_model, key, steps,
                     _finished(out_dir, key), info or {}, desc)


def run(plan: TrainPlan, loader, models: Models | None = None) -> TrainedModel:
    """Train (continuing a checkpoint of this key with ``--resume``) and export the final model;
    the model held by ``models`` is then the trained one."""
    if plan.current:
        return plan.output
    models = models or Models(loader)
    model = models.runner(plan.start_model, prepared=True)
    res = train_spin(model, loader.tokenizer(plan.start_model), plan.examples, plan.training, plan.out_dir,
                     resume=plan.cfg.loop.resume, tensorboard=plan.cfg.loop.tensorboard, desc=plan.desc,
                     info=plan.info, start_digest=provenance.model_digest(plan.start_model),
                     on_stale=plan.cfg.data.on_stale, describe=describe_pairs(plan.pairs, plan.pairs_path),
                     autocast=loader.autocast)
    if res.trained:
        models.now_holds(res.model_dir)
    return TrainedModel(res.model_dir, plan.key)
