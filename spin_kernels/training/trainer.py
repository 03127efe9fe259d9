"""Step (3) of a SPIN iteration: train the main player on packed (real, synthetic) pairs.

Layout of one training run in ``out_dir``::

    checkpoints/step-N/   HF model + trainer_state.pt (optimizer, scheduler, step, RNG)
    metrics.jsonl         one row per logged optimizer step
    metrics.png           the curves of this run
    model/                the final model (save_pretrained, safetensors)

Determinism: the data order of epoch e is a permutation seeded by (seed, e), and global batch
k is a fixed slice of it, so "the data position" is just the optimizer step. A resumed run
reloads weights, optimizer, scheduler and RNG states of the latest checkpoint and replays the
same batches, reaching the same final weights as an uninterrupted run.

Under FSDP (a sharded runner, spin_kernels.training.parallel) the same global batch is planned
with ``num_ranks=W`` and each rank accumulates its own micro-batches (the same number on every
rank; an empty one runs a zero-weight forward/backward); ``spin_kernels.distributed.train_step``
weights them so the loss is the mean over the global batch, and clips by the global gradient
norm. ``checkpoints/step-N`` is then a sharded torch.distributed.checkpoint (model, optimizer,
scheduler; loadable on another number of ranks) and ``model/`` one Hugging Face checkpoint
gathered on rank 0.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import provenance
from .checkpoint import (
    STATE_FILE,
    latest_step_checkpoint,
    load_weights_into,
    prune_step_checkpoints,
    read_info,
    save_model_dir,
)
from .config import ConfigError, TrainingConfig
from .loading import autocast, rng_state, seed_everything, set_rng_state
from .metrics import MetricsLogger, plot_metrics, read_metrics
from .parallel import as_runner, barrier, is_main, is_sharded, progress, rank, world_size


class TrainingError(RuntimeError):
    """Training stopped because a step went non-finite; the message names the iteration, the
    step, the examples and the likely cause. Nothing of that step was saved."""


@dataclass
class TrainResult:
    model_dir: str
    metrics_path: str
    plot_path: str | None
    steps: int


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


def build_scheduler(optimizer, cfg: TrainingConfig, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)


def enable_checkpointing(model) -> None:
    """Recompute decoder layers in the backward (non-reentrant: works with the packed kwargs)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux: the process's peak resident set, the closest CPU analogue.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rank_micro_batches(examples: list, idx: list[int], token_budget: int, device: torch.device) -> list:
    """This rank's micro-batches of the global batch ``idx``: ``[(PackedBatch, pairs)]``.

    Planned with ``num_ranks = world_size()`` so every rank gets the same number; an empty
    micro-batch becomes one pair of the global batch with weight (pairs) 0, so that the rank
    still runs the forward/backward whose FSDP collectives the others wait for.
    """
    from spin_kernels.packing import pack_batch, plan_micro_batches

    chunk = [examples[i] for i in idx]
    plan = plan_micro_batches(chunk, token_budget, num_ranks=world_size(), shuffle=False)
    return [(pack_batch([chunk[j] for j in (mb or [0])]).to(device), len(mb)) for mb in plan.micro_batches[rank()]]


def _micro_batches(examples: list, idx: list[int], token_budget: int, device: torch.device) -> list:
    """The packed micro-batches of ``idx`` in one process (``spin_step``'s input)."""
    return [b for b, pairs in rank_micro_batches(examples, idx, token_budget, device) if pairs]


def _loss_fn(cfg: TrainingConfig, device: torch.device, use_autocast: bool):
    """``(model, (batch, pairs)) -> (mean loss over the batch's pairs, metrics)`` for train_step."""
    from spin_kernels.models import packed_spin_loss

    def fn(model, item):
        with autocast(device, use_autocast):
            # The packer built the batch and the pairs' ref_logps were checked when read, so the
            # op's value checks (a host sync per micro-batch) are skipped; a non-finite loss is
            # caught by train_step on every rank alike.
            return packed_spin_loss(model, item[0], beta=cfg.beta, loss_type=cfg.loss_type, impl=cfg.impl,
                                    average=cfg.average_log_prob, check_values=False)

    return fn


def _find_checkpoint(ckpt_root: str, sharded: bool) -> tuple[int, str] | None:
    """The latest resumable checkpoint of this kind (HF + trainer_state.pt, or sharded DCP)."""
    from spin_kernels.distributed import latest_checkpoint

    if sharded:
        path = latest_checkpoint(ckpt_root)
        found = None if path is None else (int(os.path.basename(path)[len("step-"):]), path)
        other = latest_step_checkpoint(ckpt_root)
    else:
        found, path = latest_step_checkpoint(ckpt_root), latest_checkpoint(ckpt_root)
        other = None if path is None else (0, path)
    if found is None and other is not None:
        kinds = ("a single-process", "an FSDP") if sharded else ("an FSDP (sharded)", "a single-process")
        raise ConfigError(f"--resume: {other[1]} is {kinds[0]} checkpoint and this is {kinds[1]} run; resume it "
                          f"the way it was started (distributed.fsdp)")
    return found


def _checkpoint_key(path: str, sharded: bool) -> str | None:
    """The training key a step checkpoint was written with (read without loading it)."""
    import json

    if sharded:
        from spin_kernels.distributed.checkpoint import TRAINER_STATE

        with open(os.path.join(path, TRAINER_STATE)) as f:
            return json.load(f).get("extra", {}).get("training_key")
    return read_info(path).get("training_key")


def trained_model_key(out_dir: str) -> str | None:
    """The training key recorded with the final model of ``out_dir`` (None if there is none)."""
    model_dir = os.path.join(out_dir, "model")
    return read_info(model_dir).get("training_key") if os.path.isdir(model_dir) else None


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
    non-finite (default: their positions in ``examples``).

    Raises:
        TrainingError: a step's loss, gradient norm or updated weights were NaN/inf; nothing of
            that step was saved.
    """
    from spin_kernels.distributed import (
        NonFiniteError,
        full_state_dict,
        load_checkpoint,
        save_checkpoint,
        train_step,
    )

    if not examples:
        raise ValueError("train_spin: no training pairs")
    if any(ex.ref_logps is None for ex in examples):
        raise ValueError("train_spin: every example needs ref_logps (run the reference pass first)")
    runner = as_runner(model)
    sharded = is_sharded(runner)
    if world_size() > 1 and not sharded:
        raise ValueError("train_spin: several processes need an FSDP-sharded model (parallel.load_runner); "
                         "an unsharded copy per rank would not synchronise its gradients")
    device = next(runner.parameters()).device
    ckpt_root = os.path.join(out_dir, "checkpoints")
    model_dir = os.path.join(out_dir, "model")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    key = provenance.training_key(examples, cfg, start_digest)
    schedule = global_batches(len(examples), cfg.global_batch_pairs, cfg.epochs, cfg.seed)
    if resume and trained_model_key(out_dir) == key:  # finished before: nothing to redo
        return TrainResult(model_dir, metrics_path, None, len(schedule))
    main = is_main()
    if main:
        os.makedirs(out_dir, exist_ok=True)
    seed_everything(cfg.seed)
    if cfg.gradient_checkpointing and not sharded:  # FSDP: apply_fsdp2 wraps the layers itself
        enable_checkpointing(runner.model)
    runner.train()
    params = [p for p in runner.parameters() if p.requires_grad]
    steps_per_epoch = math.ceil(len(examples) / cfg.global_batch_pairs)
    optimizer = build_optimizer(params, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(schedule))

    start = 0
    found = _find_checkpoint(ckpt_root, sharded) if resume else None
    if found is not None and _checkpoint_key(found[1], sharded) != key:
        message = (f"{found[1]} was trained from other inputs (examples, reference log-probs, training options or "
                   f"starting weights) than this run")
        if on_stale == "error":
            raise ConfigError(f"--resume: {message}; remove {ckpt_root} or rerun with --on-stale regenerate")
        if main:
            print(f"spin-kernels: warning: {message}; training starts over", file=sys.stderr)
            prune_step_checkpoints(ckpt_root)
        barrier()
        found = None
    if found is not None:
        start, path = found
        if sharded:
            state = load_checkpoint(path, runner, optimizer)["extra"]
        else:
            load_weights_into(runner.model, path)
            state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
            optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
        scheduler.load_state_dict(state["scheduler"])
        if state["num_steps"] != len(schedule):
            raise RuntimeError(f"cannot resume from {path}: it planned {state['num_steps']} steps, this run "
                               f"{len(schedule)} (data or batch settings changed)")
    logger = MetricsLogger(metrics_path, tensorboard=tensorboard, resume_from_step=start if resume else None) \
        if main else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    loss_fn = _loss_fn(cfg, device, cfg.bf16 and not sharded)
    bar = progress(total=len(schedule), initial=start, desc=desc, unit="step")
    for step in range(start, len(schedule)):
        t0 = time.perf_counter()
        mbs = rank_micro_batches(examples, schedule[step], cfg.token_budget, device)
        lr = scheduler.get_last_lr()[0]
        try:
            res = train_step(runner, optimizer, mbs, loss_fn=loss_fn, max_grad_norm=cfg.max_grad_norm,
                             scheduler=scheduler, num_pairs=lambda item: item[1],
                             example_ids=lambda item: item[0].example_index.tolist() if item[1] else [])
        except NonFiniteError as err:
            bar.close()
            if logger is not None:
                logger.close()
            where = f"{(info or {}).get('iteration', '')}".strip()
            named = describe(err.examples) if describe is not None else f"examples {err.examples[:20]}"
            saved = _find_checkpoint(ckpt_root, sharded)
            raise TrainingError(
                f"{desc}{' (iteration ' + where + ')' if where else ''}: optimizer step {step + 1} of {len(schedule)} "
                f"stopped before it was saved: non-finite {err.quantity} ({err.detail}); {named}. Likely cause: "
                f"{_likely_cause(err, step, cfg, next(runner.parameters()).dtype)}. Nothing non-finite was saved"
                f"{'; the last checkpoint is ' + saved[1] if saved else ''}.") from err
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        done = step + 1
        if main and (done % cfg.log_every == 0 or done == len(schedule)):
            tokens = sum(examples[i].num_tokens for i in schedule[step])  # the global batch, all ranks
            row = {"step": done, "epoch": round(done / steps_per_epoch, 4), "loss": res.loss, **res.metrics,
                   "lr": lr, "grad_norm": res.grad_norm, "pairs": res.num_pairs, "micro_batches": len(mbs),
                   "tokens": tokens, "tokens_per_s": tokens / dt, "peak_mem_mib": peak_memory_mib(device)}
            logger.log(row)
            bar.set_postfix(loss=f"{res.loss:.4f}", acc=f"{res.metrics['rewards/accuracy']:.2f}",
                            margin=f"{res.metrics['rewards/margin']:.3f}")
        bar.update(1)
        if cfg.save_every and done % cfg.save_every == 0 and done < len(schedule):
            path = os.path.join(ckpt_root, f"step-{done}")
            state = {"scheduler": scheduler.state_dict(), "num_steps": len(schedule), "training_key": key}
            if sharded:
                save_checkpoint(path, runner, optimizer, step=done, extra=state)
            else:
                state.update(optimizer=optimizer.state_dict(), rng=rng_state(), step=done)
                save_model_dir(runner.model, tokenizer, path, state=state, extra={"training_key": key})
            if main:
                prune_step_checkpoints(ckpt_root, keep=done)
    bar.close()
    if logger is not None:
        logger.close()
    full = full_state_dict(runner) if sharded else None  # a collective: the weights on rank 0
    plot = None
    if main:
        save_model_dir(runner.model, tokenizer, model_dir, state_dict=full,
                       extra={**(info or {}), "steps": len(schedule), "training_key": key})
        prune_step_checkpoints(ckpt_root)
        plot = plot_metrics(read_metrics(metrics_path), os.path.join(out_dir, "metrics.png"), title=desc)
    barrier()  # the final model exists before any rank goes on (the next iteration loads it)
    return TrainResult(model_dir, metrics_path, plot, len(schedule))
