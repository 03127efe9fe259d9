"""Peak memory of SPIN training steps, by moment, measured in this fresh process (called by planner.py).

Usage (one process, or each rank of ``torchrun --nproc_per_node 2``)::

    python -m benchmarks.planner_probe '{"model_dir": ..., "mode": "lora", ...}'

prints one JSON line: ``{"rank": r, "baseline_rss": bytes, "moments": {moment: peak bytes above the
baseline}, "tokens": [...], "counted_fraction": f, ...}``.

The step is the trainer's: the model comes from ``Loader.runner`` (one process: from_pretrained,
QLoRA: bitsandbytes NF4; FSDP2: meta init, ``apply_fsdp2``, rank 0 broadcasts), LoRA adapters from
``add_adapters``, the optimizer from ``build_optimizer`` (torch's default implementation), the
micro-batches from ``rank_micro_batches``, the step from ``spin_kernels.distributed.train_step`` with
the fused loss (``packed_spin_loss``, ``check_values=False`` as the trainer calls it).

Method: glibc's mmap threshold is fixed at 64 KiB by the caller (``MALLOC_MMAP_THRESHOLD_``), so every
tensor above it is its own mapping and leaves the resident set when freed. Imports and a warm-up step
of the same configuration (lazy imports, gloo buffers, oneDNN's and SDPA's per-shape kernels and
scratch buffers), whose model and optimizer are then dropped, come first; the baseline is the
resident set after it (this process's non-tensor memory: interpreter, libraries, thread stacks; it is
reported as ``baseline_rss``). Then the model and optimizer are built and ``steps`` optimizer steps run,
the peak resident set (VmHWM, reset through /proc/self/clear_refs) read at each moment's end:
``forward`` (from the root's forward pre-hook, i.e. before FSDP's all-gather of the root, to the end
of the loss), ``backward`` (to the next forward or the optimizer step: includes the gradient
reduce-scatters, the norm and the clipping), ``optimizer step``. Loading is not a moment here (its
peak is the checkpoint read, not the iteration's).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Moments:
    """Peak resident set above ``base`` per moment: ``enter(name)`` closes the current moment at
    the high-water mark reached since it began and starts ``name``."""

    def __init__(self, base: int):
        self.base, self.current, self.peaks = base, None, {}

    def enter(self, name: str | None) -> None:
        if self.current is not None:
            peak = _status_bytes("VmHWM") - self.base
            self.peaks[self.current] = max(self.peaks.get(self.current, 0), peak)
        _reset_peak()
        self.current = name


def _config(spec: dict, model_dir: str):
    from spin_kernels.training.config import DistributedConfig, ModelConfig, SpinConfig, TrainingConfig

    mode = spec["mode"]
    training = TrainingConfig(optimizer=spec["optimizer"], token_budget=spec["token_budget"],
                              share_prompt=spec["share_prompt"], gradient_checkpointing=spec["ac"],
                              impl=spec["impl"], lora_rank=spec.get("lora_rank", 16) if mode != "full" else 0,
                              quantize="nf4" if mode == "qlora" else "none", learning_rate=1e-5)
    return SpinConfig(model=ModelConfig(model=model_dir, device="cpu", dtype=spec.get("dtype", "float32")),
                      training=training,
                      distributed=DistributedConfig(fsdp=spec["ranks"] > 1 or None, mixed_precision="none"))


def _examples(spec: dict, vocab: int, count: int) -> list:
    import torch

    from spin_kernels.packing.example import SpinExample

    g = torch.Generator().manual_seed(0)
    p, r = spec["prompt"], spec["response"]

    def ids(n):
        return torch.randint(2, vocab, (n,), generator=g).tolist()

    return [SpinExample(ids(p), ids(r), ids(r), (-1000.0, -1000.0), i) for i in range(count)]


def _run_steps(spec: dict, model_dir: str, sess, moments: Moments | None) -> dict:
    """Build the trainer's model and optimizer for ``spec`` and run its steps; returns what was run."""
    import torch

    from spin_kernels.distributed import train_step
    from spin_kernels.models import packed_spin_loss
    from spin_kernels.training.loading import Loader
    from spin_kernels.training.parallel import world_size
    from spin_kernels.training.trainer import build_optimizer, rank_micro_batches

    cfg = _config(spec, model_dir)
    loader = Loader(cfg, sess)
    runner = loader.prepared(loader.runner(model_dir))
    vocab = runner.model.get_output_embeddings().weight.shape[0]
    params = [p for p in runner.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.training)
    # A shared-prompt pair is one segment: prompt[:-1], then prompt[-1] + each response.
    pair = spec["prompt"] + 2 * spec["response"] + 1 if spec["share_prompt"] else 2 * (spec["prompt"] + spec["response"])
    per_mb = spec["token_budget"] // pair
    examples = _examples(spec, vocab, per_mb * spec["micro_batches"] * world_size())
    idx = list(range(len(examples)))

    def loss_fn(model, item):
        out = packed_spin_loss(model, item[0], beta=0.1, impl=spec["impl"], check_values=False)
        if moments is not None:
            moments.enter("backward")
        return out

    if moments is not None:
        runner.register_forward_pre_hook(lambda *_: moments.enter("forward"), prepend=True)
        step = optimizer.step

        def timed_step(*a, **k):
            moments.enter("optimizer step")
            out = step(*a, **k)
            moments.enter("after")
            return out

        optimizer.step = timed_step
    tokens, counted = [], []
    for _ in range(spec["steps"]):
        mbs = rank_micro_batches(examples, idx, spec["token_budget"], torch.device("cpu"), spec["share_prompt"])
        tokens += [b.num_tokens for b, _ in mbs]
        counted += [int((b.targets != -100).sum()) for b, _ in mbs]
        train_step(runner, optimizer, mbs, loss_fn=loss_fn, max_grad_norm=1.0, num_pairs=lambda item: item[1],
                   example_ids=lambda item: item[0].example_index.tolist())
    if moments is not None:
        moments.enter(None)
    return {"tokens": tokens, "counted_fraction": sum(counted) / sum(tokens),
            "trainable": sum(p.numel() for p in params)}


def measure(spec: dict) -> dict:
    import torch

    from spin_kernels.training.parallel import rank, session

    torch.set_num_threads(1)
    warm = dict(spec, micro_batches=1, steps=1)
    cfg = _config(spec, spec["model_dir"])
    with session(cfg) as sess:
        # Every lazy import, one-off buffer and per-shape kernel cache (oneDNN, SDPA) first: the same
        # configuration, one step, then dropped.
        _run_steps(warm, spec["model_dir"], sess, None)
        import gc

        gc.collect()
        base = _status_bytes("VmRSS")
        moments = Moments(base)
        _reset_peak()
        ran = _run_steps(spec, spec["model_dir"], sess, moments)
        return {"rank": rank(), "baseline_rss": base, "moments": moments.peaks, **ran}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    with contextlib.redirect_stdout(sys.stderr):  # library chatter must not mix with the result line
        result = measure(spec)
    if spec.get("out_dir"):  # one file per rank (torchrun interleaves the ranks' output)
        with open(os.path.join(spec["out_dir"], f"rank{result['rank']}.json"), "w") as f:
            json.dump(result, f)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main(sys.argv[1:]))
