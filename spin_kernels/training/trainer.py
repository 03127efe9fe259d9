"""Step (3) of a SPIN iteration: train the main player on packed (real, synthetic) pairs.

Layout of one training run in ``out_dir``::

    checkpoints/          resumable step checkpoints and their index.json (spin_kernels.training.checkpoint)
    metrics.jsonl         one row per logged optimizer step
    metrics.png           the curves of this run
    model/                the final model (save_pretrained, safetensors)

Determinism: the data order of epoch e is a permutation seeded by (seed, e), and global batch
k is a fixed slice of it, so "the data position" is just the optimizer step. A resumed run
reloads the trained weights, optimizer, scheduler, data position and RNG states of the latest
checkpoint and replays the same batches, reaching the same final weights as an uninterrupted run.

Under FSDP (a sharded runner, spin_kernels.training.parallel) the same global batch is planned
with ``num_ranks=W`` and each rank accumulates its own micro-batches (the same number on every
rank; an empty one runs a zero-weight forward/backward); ``spin_kernels.distributed.train_step``
weights them so the loss is the mean over the global batch, and clips by the global gradient
norm. The Checkpointer's step checkpoints are the same format in both cases (each rank writes
its shards), and ``model/`` is gathered on rank 0.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import provenance
from .checkpoint import Checkpointer, run_states, seed_everything
from .config import TrainingConfig
from .metrics import MetricsLogger, plot_metrics, read_metrics
from .parallel import as_runner, is_main, is_sharded, progress, rank, world_size


class TrainingError(RuntimeError):
    """Training stopped because a step went non-finite; the message names the iteration, the
    step, the examples and the likely cause. Nothing of that step was saved."""


@dataclass
class TrainResult:
    """``trained``: the model passed in now holds the trained weights (False when a finished run
    was found and returned as it is)."""

    model_dir: str
    metrics_path: str
    plot_path: str | None
    steps: int
    trained: bool = True


def global_batches(num_examples: int, batch_pairs: int, epochs: int, seed: int) -> list[list[int]]:
    """Example indices of every optimizer step: per epoch a seeded permutation cut into slices of
    ``batch_pairs`` (the last slice of an epoch may be smaller; its loss is still a pair mean)."""
    steps = []
    for epoch in range(epochs):
        perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 1009 + epoch)).tolist()
        steps += [perm[i:i + batch_pairs] for i in range(0, num_examples, batch_pairs)]
    return steps


def build_optimizer(params, cfg: TrainingConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "rmsprop":
        # torch defaults (alpha 0.99, eps 1e-8), as HF Trainer's "rmsprop" in the released SPIN code.
        return torch.optim.RMSprop(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def warmup_steps(cfg: TrainingConfig, total_steps: int) -> int:
    """Steps of linear warm-up: ``ceil(warmup_ratio * total_steps)``, except that a schedule of one
    step has none (its only step would have lr 0: an iteration that trains nothing). From two
    steps on, every step after the first has lr > 0."""
    return 0 if total_steps <= 1 else math.ceil(cfg.warmup_ratio * total_steps)


def build_scheduler(optimizer, cfg: TrainingConfig, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, warmup_steps(cfg, total_steps), total_steps)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux: the process's peak resident set, the closest CPU analogue.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rank_micro_batches(examples: list, idx: list[int], token_budget: int, device: torch.device,
                       share_prompt: bool = False) -> list:
    """This rank's micro-batches of the global batch ``idx``: ``[(PackedBatch, pairs)]``.

    Planned with ``num_ranks = world_size()`` so every rank gets the same number; an empty
    micro-batch becomes one pair of the global batch with weight (pairs) 0, so that the rank
    still runs the forward/backward whose FSDP collectives the others wait for. ``share_prompt``:
    the shared-prompt layout (``pack_batch(..., share_prompt=True)``).
    """
    from spin_kernels.packing import pack_batch, plan_micro_batches

    chunk = [examples[i] for i in idx]
    plan = plan_micro_batches(chunk, token_budget, num_ranks=world_size(), shuffle=False, share_prompt=share_prompt)
    return [(pack_batch([chunk[j] for j in (mb or [0])], share_prompt=share_prompt).to(device), len(mb))
            for mb in plan.micro_batches[rank()]]


def _loss_fn(cfg: TrainingConfig, compute: Callable[[], contextlib.AbstractContextManager]):
    """``(model, (batch, pairs)) -> (mean loss over the batch's pairs, metrics)`` for train_step."""
    from spin_kernels.models import packed_spin_loss

    def fn(model, item):
        with compute():
            # The packer built the batch and the pairs' ref_logps were checked when read, so the
            # op's value checks (a host sync per micro-batch) are skipped; a non-finite loss is
            # caught by train_step on every rank alike.
            return packed_spin_loss(model, item[0], beta=cfg.beta, loss_type=cfg.loss_type, impl=cfg.impl,
                                    average=cfg.average_log_prob, check_values=False)

    return fn


def _likely_cause(err, step: int, cfg: TrainingConfig, dtype: torch.dtype) -> str:
    lr = f"--learning-rate {cfg.learning_rate:g}"
    if err.quantity == "loss" and step == 0:
        return (f"the starting model gives non-finite log-probs on these examples before any update (its weights "
                f"are finite): activations overflow in {str(dtype).replace('torch.', '')}, or the examples hold "
                f"something the model cannot score")
    if err.quantity == "loss":
        return f"training diverged: the previous updates made the model's log-probs non-finite; lower {lr}"
    if err.quantity == "gradient norm":
        return (f"the gradients overflowed ({str(dtype).replace('torch.', '')}) although the loss was finite; lower "
                f"{lr} or train in float32")
    return f"the optimizer step overflowed the weights: {lr} is too large for these gradients"


def train_spin(
    model,
    tokenizer,
    examples: list,
    cfg: TrainingConfig,
    out_dir: str,
    *,
    resume: bool = False,
    tensorboard: bool = False,
    desc: str = "train",
    info: dict | None = None,
    start_digest: str | None = None,
    on_stale: str = "regenerate",
    describe: Callable[[list[int]], str] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> TrainResult:
    """Train ``model`` (already initialised from the opponent and passed through
    ``prepare_model``; or a runner of it, sharded under FSDP) on ``examples`` (``SpinExample`` s
    with ``ref_logps``); write ``out_dir`` (rank 0 writes the files).

    Returns the final model directory and the metrics file. With ``resume`` the latest
    checkpoint in ``out_dir/checkpoints`` (if any) is continued, and a final model already
    trained from the same inputs is returned as it is. Inputs are compared through the training
    key (spin_kernels.training.provenance.training_key: the examples, ``cfg`` and
    ``start_digest``, the digest of the starting weights): checkpoints with another key are
    discarded (``on_stale="regenerate"``, with a warning) or refused (``"error"``).

    ``describe(example_positions) -> str`` names examples in the error raised when a step goes
    non-finite (default: their positions in ``examples``); ``autocast()`` is the compute context
    of the loss (``Loader.autocast``: bf16 autocast on GPU).

    Raises:
        TrainingError: a step's loss, gradient norm or updated weights were NaN/inf; nothing of
            that step was saved.
    """
    from spin_kernels.distributed import NonFiniteError

    runner = _checked_runner(model, examples)
    tokenizer_digest = provenance.tokenizer_digest(tokenizer)
    key = provenance.training_key(examples, cfg, start_digest, tokenizer_digest)
    schedule = global_batches(len(examples), cfg.global_batch_pairs, cfg.epochs, cfg.seed)
    metrics_path = f"{out_dir}/metrics.jsonl"
    if resume and Checkpointer.finished(out_dir, key, on_stale=on_stale):  # finished before: nothing to redo
        return TrainResult(f"{out_dir}/model", metrics_path, None, len(schedule), trained=False)
    _note_schedule(cfg, len(examples), len(schedule), desc)
    seed_everything(cfg.seed)
    runner.train()
    optimizer = build_optimizer([p for p in runner.parameters() if p.requires_grad], cfg)
    scheduler = build_scheduler(optimizer, cfg, len(schedule))
    ckpt = Checkpointer(run_states(runner, optimizer, scheduler), out_dir, key=key, num_steps=len(schedule),
                        save_every=cfg.save_every, on_stale=on_stale, tokenizer=tokenizer_digest)
    start = ckpt.load() if resume else 0
    logger = MetricsLogger(metrics_path, tensorboard=tensorboard, resume_from_step=start if resume else None) \
        if is_main() else None
    device = next(runner.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loss_fn = _loss_fn(cfg, autocast)
    with progress(total=len(schedule), initial=start, desc=desc, unit="step") as bar:
        for step in range(start, len(schedule)):
            t0, lr = time.perf_counter(), scheduler.get_last_lr()[0]
            mbs = rank_micro_batches(examples, schedule[step], cfg.token_budget, device, cfg.share_prompt)
            try:
                res = _step(runner, optimizer, scheduler, mbs, loss_fn, cfg)
            except NonFiniteError as err:
                raise TrainingError(_stop_message(err, step, len(schedule), cfg, runner, ckpt, desc, info,
                                                  describe)) from err
            if logger is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == len(schedule)):
                logger.log(_metrics_row(res, step + 1, cfg, examples, schedule[step], lr, len(mbs),
                                        time.perf_counter() - t0, device))
                bar.set_postfix(loss=f"{res.loss:.4f}", acc=f"{res.metrics['rewards/accuracy']:.2f}",
                                margin=f"{res.metrics['rewards/margin']:.3f}")
            bar.update(1)
            ckpt.save(step + 1)
    if logger is not None:
        logger.close()
    model_dir = ckpt.export(runner, tokenizer, {**(info or {}), "steps": len(schedule)})
    plot = plot_metrics(read_metrics(metrics_path), f"{out_dir}/metrics.png", title=desc) if is_main() else None
    return TrainResult(model_dir, metrics_path, plot, len(schedule))


def _note_schedule(cfg: TrainingConfig, pairs: int, steps: int, desc: str) -> None:
    """Say so when a global batch holds every pair (each epoch is one optimizer step) and when a
    one-step schedule gets no warm-up (``warmup_steps``)."""
    if not is_main() or cfg.global_batch_pairs < pairs:
        return
    warm = math.ceil(cfg.warmup_ratio * steps)
    skipped = f"; the warm-up of ceil({cfg.warmup_ratio:g} x 1) = {warm} step is dropped (its one step would " \
              f"have lr 0 and train nothing): the step takes --learning-rate" if steps == 1 and warm else ""
    print(f"spin-kernels: note: {desc}: --global-batch-pairs {cfg.global_batch_pairs} >= the {pairs} pairs: each "
          f"epoch is one optimizer step of {pairs} pairs ({steps} step(s) in all){skipped}", file=sys.stderr)


def _checked_runner(model, examples: list):
    if not examples:
        raise ValueError("train_spin: no training pairs")
    if any(ex.ref_logps is None for ex in examples):
        raise ValueError("train_spin: every example needs ref_logps (run the reference pass first)")
    runner = as_runner(model)
    if world_size() > 1 and not is_sharded(runner):
        raise ValueError("train_spin: several processes need an FSDP-sharded model (Loader.runner); "
                         "an unsharded copy per rank would not synchronise its gradients")
    return runner


def _step(runner, optimizer, scheduler, mbs: list, loss_fn, cfg: TrainingConfig):
    """One optimizer step over this rank's ``(PackedBatch, pairs)`` micro-batches
    (spin_kernels.distributed.train_step; raises NonFiniteError)."""
    from spin_kernels.distributed import train_step

    return train_step(runner, optimizer, mbs, loss_fn=loss_fn, max_grad_norm=cfg.max_grad_norm, scheduler=scheduler,
                      num_pairs=lambda item: item[1],
                      example_ids=lambda item: item[0].example_index.tolist() if item[1] else [])


def _metrics_row(res, done: int, cfg: TrainingConfig, examples: list, idx: list[int], lr: float, micro_batches: int,
                 seconds: float, device: torch.device) -> dict:
    """The metrics.jsonl row of optimizer step ``done`` (global batch ``idx``)."""
    tokens = sum(examples[i].num_tokens for i in idx)  # the global batch, all ranks
    steps_per_epoch = math.ceil(len(examples) / cfg.global_batch_pairs)
    return {"step": done, "epoch": round(done / steps_per_epoch, 4), "loss": res.loss, **res.metrics, "lr": lr,
            "beta": cfg.beta,
            "grad_norm": res.grad_norm, "pairs": res.num_pairs, "micro_batches": micro_batches, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "peak_mem_mib": peak_memory_mib(device)}


def _stop_message(err, step: int, num_steps: int, cfg: TrainingConfig, runner, ckpt: Checkpointer, desc: str,
                  info: dict | None, describe: Callable[[list[int]], str] | None) -> str:
    where = f"{(info or {}).get('iteration', '')}".strip()
    named = describe(err.examples) if describe is not None else f"examples {err.examples[:20]}"
    saved = ckpt.latest()
    return (f"{desc}{' (iteration ' + where + ')' if where else ''}: optimizer step {step + 1} of {num_steps} "
            f"stopped before it was saved: non-finite {err.quantity} ({err.detail}); {named}. Likely cause: "
            f"{_likely_cause(err, step, cfg, next(runner.parameters()).dtype)}. Nothing non-finite was saved"
            f"{'; the last checkpoint is ' + saved.path if saved else ''}.")
