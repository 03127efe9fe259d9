"""``spin-kernels demo``: SPIN on a language whose distribution is known, on CPU, in minutes.

1. A toy task (spin_kernels.demo.task): the prompt names one of a few random Markov chains and a
   start letter; the real response is sampled from that chain. p_data is known exactly.
2. A tiny Llama (built from a config, character-level tokenizer) is trained by SFT for a few
   steps on the SPIN training set: a weak starting point, as in the paper (zephyr-7b-sft-full).
3. SPIN iterations with the real trainer (spin_kernels.training.run_iterations).
4. A control continues plain SFT from the same start, for the same number of optimizer steps
   on the same number of sequences per step (one SPIN pair = two sequences).
5. After every iteration: KL(p_data || p_theta) per sequence on held-out samples (exact per-token
   KLs, Monte Carlo over the samples; see task.py) for SPIN and for the control, next to the
   SPIN metrics; the table is printed and written to results.md / results.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..training.checkpoint import save_model_dir
from ..training.config import Section, SpinConfig, option, save_config
from ..training.loop import run_iterations
from ..training.metrics import format_table
from .sft import sft_train
from .task import MarkovTask, sequence_kl
from .tiny import demo_tokenizer, tiny_llama

MARKER = "demo.json"


@dataclass
class DemoConfig(Section):
    SECTION: ClassVar[str] = "demo"

    num_chains: int = option(4, "Markov chains the prompts choose from")
    alphabet: str = option("abcdefgh", "response letters (the chains' states)")
    concentration: float = option(0.3, "Dirichlet concentration of the transition rows (small = peaked)")
    stop_prob: float = option(0.1, "EOS probability in every state (mean response length ~ 1/stop_prob - 1)")
    max_len: int = option(16, "letters after which EOS is forced")
    task_seed: int = option(0, "seed of the chains")
    train_examples: int = option(256, "SPIN training pairs (prompt, real response)")
    eval_examples: int = option(2000, "held-out samples from p_data for the KL")
    hidden_size: int = option(64, "tiny Llama hidden size (2 layers, 4 heads)")
    sft_steps: int = option(30, "SFT steps of the starting point (few: a weak model)")
    sft_lr: float = option(3e-3, "AdamW learning rate of the SFT start and of the SFT control")
    sft_batch: int = option(32, "sequences per SFT step of the starting point")
    threads: int = option(2, "torch CPU threads")


def demo_spin_defaults(output_dir: str = "runs/demo") -> SpinConfig:
    """The SPIN settings of the demo (a 77k-parameter model needs its own lr, not 5e-7; see README)."""
    cfg = SpinConfig()
    cfg.model.device = "cpu"
    cfg.loop.output_dir = output_dir
    cfg.loop.iterations = 3
    t = cfg.training
    t.learning_rate, t.beta, t.epochs, t.global_batch_pairs, t.warmup_ratio = 3e-4, 3.0, 3, 32, 0.1
    t.token_budget, t.save_every = 4096, 0
    cfg.data.max_length, cfg.data.max_prompt_length = 64, 8
    g = cfg.generation
    g.max_new_tokens, g.generation_batch_size = 24, 128
    return cfg


def _kl_row(model_or_dir, tokenizer, task: MarkovTask, rows: list[dict]) -> tuple[float, float]:
    if isinstance(model_or_dir, str):
        from transformers import AutoModelForCausalLM

        model_or_dir = AutoModelForCausalLM.from_pretrained(model_or_dir)
    return sequence_kl(model_or_dir, tokenizer, task, rows)


def _prepare_dir(path: str, resume: bool) -> None:
    if os.path.isdir(path) and os.listdir(path) and not resume:
        if not os.path.exists(os.path.join(path, MARKER)):
            raise FileExistsError(f"{path} exists and is not a demo run; choose another --output-dir")
        shutil.rmtree(path)  # a previous demo run: the demo owns it and starts over
    os.makedirs(path, exist_ok=True)


def run_demo(demo: DemoConfig, cfg: SpinConfig) -> list[dict[str, Any]]:
    """Run the whole demo in ``cfg.loop.output_dir``; return the per-iteration result rows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(demo.threads)
    try:
        return _run_demo(demo, cfg)
    finally:
        torch.set_num_threads(threads)


def _run_demo(demo: DemoConfig, cfg: SpinConfig) -> list[dict[str, Any]]:
    start = time.perf_counter()
    root = cfg.loop.output_dir
    _prepare_dir(root, cfg.loop.resume)
    with open(os.path.join(root, MARKER), "w", encoding="utf-8") as f:
        json.dump({"demo": dataclasses.asdict(demo)}, f, indent=1)
    task = MarkovTask(num_chains=demo.num_chains, alphabet=demo.alphabet, concentration=demo.concentration,
                      stop_prob=demo.stop_prob, max_len=demo.max_len, seed=demo.task_seed)
    tokenizer = demo_tokenizer(task.alphabet)
    train = [dict(r, index=i) for i, r in enumerate(task.sample(demo.train_examples, seed=demo.task_seed + 1))]
    held_out = task.sample(demo.eval_examples, seed=demo.task_seed + 2)
    entropy = task.entropy_estimate(held_out)

    # The weak start: a few SFT steps from random init.
    sft_dir = os.path.join(root, "sft")
    if not os.path.isdir(sft_dir):
        model = tiny_llama(len(tokenizer), hidden_size=demo.hidden_size, intermediate_size=2 * demo.hidden_size,
                           max_positions=2 * cfg.data.max_length, seed=demo.task_seed)
        sft_train(model, tokenizer, train, steps=demo.sft_steps, batch_size=demo.sft_batch, lr=demo.sft_lr,
                  seed=demo.task_seed)
        save_model_dir(model, tokenizer, sft_dir, extra={"sft_steps": demo.sft_steps})
    kl0 = _kl_row(sft_dir, tokenizer, task, held_out)
    print(f"\ndemo: p_data entropy {entropy:.3f} nats/sequence; SFT start KL {kl0[0]:.3f} ± {kl0[1]:.3f}")

    # The SFT control, one "iteration" per SPIN iteration, same steps and sequences per step.
    from transformers import AutoModelForCausalLM

    control = AutoModelForCausalLM.from_pretrained(sft_dir)
    steps_per_iter = cfg.training.epochs * -(-len(train) // cfg.training.global_batch_pairs)

    def after_iteration(t: int, model_dir: str, summary: dict[str, Any]) -> dict[str, Any]:
        spin_kl = _kl_row(model_dir, tokenizer, task, held_out)
        sft_train(control, tokenizer, train, steps=steps_per_iter, batch_size=2 * cfg.training.global_batch_pairs,
                  lr=demo.sft_lr, seed=demo.task_seed + 100 + t, warmup_steps=round(0.1 * steps_per_iter))
        control_kl = sequence_kl(control, tokenizer, task, held_out)
        return {"KL SPIN": spin_kl[0], "KL SPIN se": spin_kl[1], "KL SFT-control": control_kl[0],
                "KL SFT-control se": control_kl[1]}

    spin_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, model=sft_dir),
                                   loop=dataclasses.replace(cfg.loop, output_dir=os.path.join(root, "spin")))
    summaries = run_iterations(spin_cfg, records=train, on_iteration_end=after_iteration)
    rows = [{"iteration": "SFT start", "KL SPIN": kl0[0], "KL SPIN se": kl0[1], "KL SFT-control": kl0[0],
             "KL SFT-control se": kl0[1]}]
    for s in summaries:
        rows.append({"iteration": s["iteration"], "KL SPIN": s["KL SPIN"], "KL SPIN se": s["KL SPIN se"],
                     "KL SFT-control": s["KL SFT-control"], "KL SFT-control se": s["KL SFT-control se"],
                     "loss": s["loss last"], "accuracy": s["accuracy"], "margin": s["margin"],
                     "logp real": s["logp real"], "logp synthetic": s["logp synthetic"],
                     "synthetic len": s["synthetic/mean_tokens"]})
    write_results(root, rows, demo, cfg, entropy, time.perf_counter() - start)
    return rows


def write_results(root: str, rows: list[dict[str, Any]], demo: DemoConfig, cfg: SpinConfig, entropy: float,
                  seconds: float) -> None:
    cols = ["iteration", "KL SPIN", "KL SPIN se", "KL SFT-control", "KL SFT-control se", "loss", "accuracy",
            "margin", "logp real", "logp synthetic", "synthetic len"]
    table = format_table(rows, cols, floatfmt="{:.3f}")
    t = cfg.training
    text = (f"# spin-kernels demo: SPIN vs continued SFT on known Markov chains\n\n"
            f"KL(p_data || p_theta) in nats per sequence on {demo.eval_examples} held-out samples "
            f"(exact per-token KLs summed along each sample, averaged over samples; se = standard error); "
            f"p_data entropy {entropy:.3f} nats/sequence. {demo.train_examples} training pairs, "
            f"SPIN: lr {t.learning_rate}, beta {t.beta}, {t.optimizer}, {t.epochs} epochs/iteration, "
            f"{t.global_batch_pairs} pairs/step; control: AdamW lr {demo.sft_lr}, same steps, "
            f"{2 * t.global_batch_pairs} real sequences/step. loss, accuracy, margin, logp real/synthetic: "
            f"the SPIN metrics of the iteration's last 3 optimizer steps; synthetic len: mean tokens of the "
            f"opponent's responses. Wall time {seconds:.0f} s.\n\n{table}\n")
    with open(os.path.join(root, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(root, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "demo": dataclasses.asdict(demo), "config": cfg.to_dict(),
                   "entropy": entropy, "seconds": seconds}, f, indent=1)
    save_config(cfg, os.path.join(root, "spin_config.yaml"))
    print("\n" + text)
