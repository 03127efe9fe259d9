"""The ``train`` stage: the main player, initialised from the start model (the opponent), trained
on the pairs with the fused SPIN loss (``train_spin``), resumable from its step checkpoints.

Its output is current when ``out_dir`` holds a final model trained from exactly these inputs:
the training key (spin_kernels.training.provenance.training_key: the tokenised pairs with their
reference log-probs, the training options, the starting weights and the tokenizer) recorded by
the checkpointer, every file of it as it was written. ``_finished`` is the one place that asks
the checkpointer. A training whose weights come out bit-identical to its start is an error
(``_refuse_unchanged``), not a result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from typing import Any

from spin_kernels.distributed.env import all_reduce_sum

from .. import provenance
from ..checkpoint import Checkpointer
from ..config import SpinConfig, TrainingConfig
from ..data import Record
from ..metrics import read_metrics
from ..parallel import barrier, is_main
from ..reference import check_token_budget, to_examples
from ..trainer import TrainingError, global_batches, train_spin, warmup_steps
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
    tokenizer: Any = None
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


def _finished(out_dir: str, key: str, on_stale: str) -> bool:
    """Whether ``out_dir`` holds the final model of the training ``key``, every file as it was
    written (the checkpointer's word; a damaged one is rebuilt or refused as ``on_stale`` says)."""
    return Checkpointer.finished(out_dir, key, on_stale=on_stale)


def plan(cfg: SpinConfig, pairs: list[Record], out_dir: str, *, start_model: str, tokenizer, pairs_path: str,
         iteration: int = 0, info: dict[str, Any] | None = None, desc: str = "train") -> TrainPlan:
    """Training iteration ``iteration``'s options (``cfg.for_iteration``) on ``pairs`` from
    ``start_model``; current when ``out_dir`` already holds its final model. A token budget
    below the longest pair is refused here, before a model is loaded."""
    training = cfg.for_iteration(iteration)
    examples = to_examples(tokenizer, pairs, cfg.data)
    check_token_budget(examples, training.token_budget, training.share_prompt, describe_pairs(pairs, pairs_path))
    key = provenance.training_key(examples, training, provenance.model_digest(start_model),
                                  provenance.tokenizer_digest(tokenizer))
    steps = len(global_batches(len(examples), training.global_batch_pairs, training.epochs, training.seed))
    return TrainPlan(cfg, training, pairs, pairs_path, examples, out_dir, start_model, key, steps,
                     _finished(out_dir, key, cfg.data.on_stale), info or {}, desc, tokenizer)


def run(plan: TrainPlan, loader, models: Models | None = None) -> TrainedModel:
    """Train (continuing a checkpoint of this key with ``--resume``) and export the final model;
    the model held by ``models`` is then the trained one."""
    if plan.current:
        return plan.output
    models = models or Models(loader)
    model = models.runner(plan.start_model, prepared=True)
    res = train_spin(model, plan.tokenizer or loader.tokenizer(plan.start_model), plan.examples, plan.training,
                     plan.out_dir, resume=plan.cfg.loop.resume, tensorboard=plan.cfg.loop.tensorboard, desc=plan.desc,
                     info=plan.info, start_digest=provenance.model_digest(plan.start_model),
                     on_stale=plan.cfg.data.on_stale, describe=describe_pairs(plan.pairs, plan.pairs_path),
                     autocast=loader.autocast)
    if res.trained:
        _refuse_unchanged(plan, res.model_dir, loader.sess.device)
        models.now_holds(res.model_dir)
    return TrainedModel(res.model_dir, plan.key)


def _refuse_unchanged(plan: TrainPlan, model_dir: str, device) -> None:
    """An iteration whose weights come out bit-identical to its start is an error, not a result:
    the final model is removed and a TrainingError says what the schedule and gradients were.
    (Rank 0 compares every tensor of the written model with the start model's, by name; every
    rank raises alike.)"""
    (same,) = all_reduce_sum([float(is_main() and same_weights(model_dir, plan.start_model))], device)
    if not same:
        return
    if is_main():
        shutil.rmtree(model_dir, ignore_errors=True)
    barrier()
    metrics = os.path.join(plan.out_dir, "metrics.jsonl")
    rows = read_metrics(metrics) if os.path.exists(metrics) else []
    t = plan.training
    raise TrainingError(
        f"{plan.desc}: the trained weights are bit-identical to the starting model {plan.start_model!r} after "
        f"{plan.steps} optimizer step(s) on {len(plan.examples)} pair(s): the iteration learned nothing, so its model "
        f"is not kept. Schedule: --learning-rate {t.learning_rate:g}, {warmup_steps(t, plan.steps)} warm-up step(s) "
        f"(--warmup-ratio {t.warmup_ratio:g}), --global-batch-pairs {t.global_batch_pairs}, --epochs {t.epochs}; "
        f"logged learning rates {[r.get('lr') for r in rows][:8]}, gradient norms "
        f"{[r.get('grad_norm') for r in rows][:8]}. Likely cause: every update is below the weights' resolution "
        f"(raise --learning-rate) or every gradient is zero (no response token is trained: check --max-length "
        f"against the prompts)")


def same_weights(a: str, b: str) -> bool:
    """Whether the model directories ``a`` and ``b`` hold the same tensors, bit for bit (one
    tensor at a time: safetensors maps the files)."""
    import torch
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        def tensors(path: str) -> dict[str, Any]:
            handles = [stack.enter_context(safe_open(os.path.join(path, f), "pt"))
                       for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
            return {name: h for h in handles for name in h.keys()}

        ta, tb = tensors(a), tensors(b)
        if ta.keys() != tb.keys():
            return False
        for name, h in ta.items():
            x, y = h.get_tensor(name), tb[name].get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return False
    return True
