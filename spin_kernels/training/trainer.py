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
"""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .checkpoint import latest_step_checkpoint, load_weights_into, prune_step_checkpoints, save_model_dir
from .config import TrainingConfig
from .loading import rng_state, seed_everything, set_rng_state
from .metrics import MetricsLogger, plot_metrics, read_metrics
from .step import grad_norm, spin_step


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


def _micro_batches(examples: list, idx: list[int], token_budget: int, device: torch.device) -> list:
    from spin_kernels.packing import pack_batch, plan_micro_batches

    chunk = [examples[i] for i in idx]
    plan = plan_micro_batches(chunk, token_budget, shuffle=False)
    return [pack_batch([chunk[j] for j in mb]).to(device) for mb in plan.micro_batches[0] if mb]


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
) -> TrainResult:
    """Train ``model`` (already initialised from the opponent and passed through
    ``prepare_model``) on ``examples`` (``SpinExample`` s with ``ref_logps``); write ``out_dir``.

    Returns the final model directory and the metrics file. With ``resume`` the latest
    checkpoint in ``out_dir/checkpoints`` (if any) is continued.
    """
    if not examples:
        raise ValueError("train_spin: no training pairs")
    if any(ex.ref_logps is None for ex in examples):
        raise ValueError("train_spin: every example needs ref_logps (run the reference pass first)")
    device = next(model.parameters()).device
    ckpt_root = os.path.join(out_dir, "checkpoints")
    os.makedirs(out_dir, exist_ok=True)
    seed_everything(cfg.seed)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    schedule = global_batches(len(examples), cfg.global_batch_pairs, cfg.epochs, cfg.seed)
    steps_per_epoch = math.ceil(len(examples) / cfg.global_batch_pairs)
    optimizer = build_optimizer(params, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(schedule))

    start = 0
    found = latest_step_checkpoint(ckpt_root) if resume else None
    if found is not None:
        start, path = found
        load_weights_into(model, path)
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        if state["num_steps"] != len(schedule):
            raise RuntimeError(f"cannot resume from {path}: it planned {state['num_steps']} steps, this run "
                               f"{len(schedule)} (data or batch settings changed)")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    logger = MetricsLogger(metrics_path, tensorboard=tensorboard, resume_from_step=start if resume else None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    bar = tqdm(total=len(schedule), initial=start, desc=desc, unit="step", dynamic_ncols=True)
    for step in range(start, len(schedule)):
        t0 = time.perf_counter()
        mbs = _micro_batches(examples, schedule[step], cfg.token_budget, device)
        loss, metrics = spin_step(model, mbs, beta=cfg.beta, loss_type=cfg.loss_type, average=cfg.average_log_prob,
                                  impl=cfg.impl, bf16=cfg.bf16)
        if cfg.max_grad_norm is not None:
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            gnorm = grad_norm(params)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        done = step + 1
        if done % cfg.log_every == 0 or done == len(schedule):
            tokens = sum(mb.num_tokens for mb in mbs)
            row = {"step": done, "epoch": round(done / steps_per_epoch, 4), "loss": loss, **metrics, "lr": lr,
                   "grad_norm": gnorm, "pairs": sum(mb.num_pairs for mb in mbs), "micro_batches": len(mbs),
                   "tokens": tokens, "tokens_per_s": tokens / dt, "peak_mem_mib": peak_memory_mib(device)}
            logger.log(row)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{metrics['rewards/accuracy']:.2f}",
                            margin=f"{metrics['rewards/margin']:.3f}")
        bar.update(1)
        if cfg.save_every and done % cfg.save_every == 0 and done < len(schedule):
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                     "step": done, "num_steps": len(schedule)}
            save_model_dir(model, tokenizer, os.path.join(ckpt_root, f"step-{done}"), state=state)
            prune_step_checkpoints(ckpt_root, keep=done)
    bar.close()
    logger.close()
    model_dir = save_model_dir(model, tokenizer, os.path.join(out_dir, "model"),
                               extra={**(info or {}), "steps": len(schedule)})
    prune_step_checkpoints(ckpt_root)
    plot = plot_metrics(read_metrics(metrics_path), os.path.join(out_dir, "metrics.png"), title=desc)
    return TrainResult(model_dir, metrics_path, plot, len(schedule))
