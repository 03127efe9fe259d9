"""A tiny SFT model and its data, made on CPU in seconds, to try the SPIN loop with:

    python -m spin_kernels.demo.tiny_sft --out tiny

writes

    tiny/sft/           a Hugging Face checkpoint (safetensors, config, tokenizer with a chat
                        template): a 77k-parameter Llama trained by SFT, early-stopped on
                        tiny/heldout.jsonl, the kind of directory ``--model`` takes
    tiny/train.jsonl    {prompt, real} rows: its SFT data, and SPIN's (``--data``)
    tiny/heldout.jsonl  validation rows, never trained on (``--eval-data``)

The task is the embedded demo's (spin_kernels.demo.task: random Markov chains, prompts such as
``"2c"``, responses of letters), so the model learns in seconds; docs/first-run.md runs the loop
on it.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from ..distributed.export import save_model_dir
from .sft import early_stopped_sft
from .task import MarkovTask
from .tiny import demo_tokenizer, tiny_llama


def make_tiny_sft(out: str, *, examples: int = 256, heldout: int = 128, steps: int = 600, hidden_size: int = 64,
                  seed: int = 0) -> dict[str, str]:
    """Write the SFT model and its data under ``out`` (see the module docstring); return their
    paths ``{"model", "data", "eval_data"}``. Deterministic for a seed."""
    task = MarkovTask(seed=seed)
    tokenizer = demo_tokenizer(task.alphabet)
    train = task.sample(examples, seed=seed + 1)
    val = task.sample(heldout, seed=seed + 3)
    model = tiny_llama(len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, seed=seed,
                       max_positions=128)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 77k-parameter model: more threads only add synchronisation
    try:
        sft = early_stopped_sft(model, tokenizer, train, val, max_steps=steps, batch_size=32, lr=3e-3, seed=seed)
    finally:
        torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    paths = {"model": os.path.join(out, "sft"), "data": os.path.join(out, "train.jsonl"),
             "eval_data": os.path.join(out, "heldout.jsonl")}
    save_model_dir(model, tokenizer, paths["model"], extra={"sft": {k: sft[k] for k in ("steps", "val_nll")}})
    for key, rows in (("data", train), ("eval_data", val)):
        with open(paths[key], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"SFT model: {paths['model']} ({sft['steps']} steps, validation NLL {sft['val_nll']:.3f} nats/token)")
    print(f"data: {paths['data']} ({len(train)} rows), held-out: {paths['eval_data']} ({len(val)} rows)")
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spin_kernels.demo.tiny_sft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory to write sft/, train.jsonl and heldout.jsonl into")
    p.add_argument("--examples", type=int, default=256, help="training rows (SFT and SPIN data)")
    p.add_argument("--heldout", type=int, default=128, help="validation rows (early stopping, --eval-data)")
    p.add_argument("--steps", type=int, default=600, help="the most SFT steps (it stops early on the held-out NLL)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task, the samples and the model")
    args = p.parse_args(argv)
    for name in ("examples", "heldout", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    from transformers.utils import logging

    logging.disable_progress_bar()  # save_pretrained's one-shard bar is noise here
    make_tiny_sft(args.out, examples=args.examples, heldout=args.heldout, steps=args.steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
