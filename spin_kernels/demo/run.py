"""``spin-kernels demo``: does SPIN help a model whose data distribution is known? On CPU, in minutes.

1. A toy task (spin_kernels.demo.task): the prompt names one of a few random Markov chains and a
   start letter; the real response is sampled from that chain. p_data is known exactly.
2. A tiny Llama (built from a config, character-level tokenizer) is trained by SFT on the SPIN
   training set, early-stopped on a validation set: a finished SFT model, as the paper starts
   from (zephyr-7b-sft-full), not an under-trained one.
3. SPIN iterations with the real trainer (spin_kernels.training.run_iterations), with held-out
   evaluation (``--eval-data``: validation pairs never trained on) and the stopping rule's view.
4. Two controls continue plain SFT from the same start, for the same number of optimizer steps on
   the same number of sequences per step (one SPIN pair = two sequences): one at the SFT
   learning rate, one at SPIN's.
5. After every iteration: the exact KL(p_data || p_theta) per sequence (task.py) for SPIN and both
   controls on test samples that nothing was chosen on, next to the SPIN and held-out metrics.
   With several task seeds (``--seeds``), means and standard errors across seeds.

The terminal gets progress bars while a stage runs (they vanish when it ends), one line per SFT
start and per iteration, then one compact comparison (``comparison``: SPIN against the controls,
Δ KL with its spread, held-out accuracy, the stopping rule's decision) and where the full tables
and plots are: results.md (every column), results.json, and the loop's own files per seed.

Samples: ``train_examples`` (SFT and SPIN data), ``val_examples`` (early stopping, the held-out
pairs of the loop, and any choice of settings: the validation KL is in results.json), and
``eval_examples`` (the test samples of the reported KL).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..distributed.export import save_model_dir
from ..training.config import Section, SpinConfig, at_least_one, option, positive, probability, save_config
from ..training.loop import run_iterations
from ..training.metrics import format_table
from ..training.parallel import progress_defaults
from .sft import early_stopped_sft, sft_train
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
    task_seed: int = option(0, "seed of the (first) task: its chains, samples and model")
    seeds: int = option(3, "task seeds to run (task_seed, task_seed + 1, ...): means and standard errors across "
                        "them", check=at_least_one)
    train_examples: int = option(256, "SPIN training pairs (prompt, real response); the SFT data too")
    val_examples: int = option(512, "validation samples: SFT early stopping, the loop's held-out pairs, settings")
    heldout_pairs: int = option(128, "validation samples the loop holds out each iteration (held-out accuracy)")
    eval_examples: int = option(2000, "test samples of the reported KL (nothing is chosen on them)")
    hidden_size: int = option(64, "tiny Llama hidden size (2 layers, 4 heads)")
    sft_steps: int = option(600, "the most SFT steps of the start (it stops early on the validation NLL)",
                            check=positive)
    sft_lr: float = option(3e-3, "AdamW learning rate of the SFT start and of the SFT-lr control")
    sft_batch: int = option(32, "sequences per SFT step")
    controls: bool = option(True, "train and report the two SFT controls")
    stop_rule_accuracy: float = option(0.55, "the stopping rule reported: the first iteration whose held-out "
                                        "accuracy is below this", check=probability)
    threads: int = option(2, "torch CPU threads")


def demo_spin_defaults(output_dir: str = "runs/demo") -> SpinConfig:
    """The SPIN settings of the demo (a 77k-parameter model needs its own lr, not 5e-7; demo/README.md
    has the validation sweep that chose them)."""
    cfg = SpinConfig()
    cfg.model.device = "cpu"
    cfg.loop.output_dir = output_dir
    cfg.loop.iterations = 4
    t = cfg.training
    t.optimizer, t.learning_rate, t.beta, t.epochs, t.global_batch_pairs, t.warmup_ratio = \
        "adamw", 1e-4, 3.0, 3, 32, 0.1
    t.token_budget, t.save_every = 4096, 0
    cfg.data.max_length, cfg.data.max_prompt_length = 64, 8
    g = cfg.generation
    # The original sampler (batches of 128, batch seeds): the demo's documented results and the
    # sweep that chose its settings were sampled with it (its sampling takes ~0.2 s a stage).
    g.max_new_tokens, g.generation_batch_size, g.generation_seeding = 24, 128, "batch"
    return cfg


def run_demo(demo: DemoConfig, cfg: SpinConfig) -> list[dict[str, Any]]:
    """Run the whole demo in ``cfg.loop.output_dir``; return the per-iteration result rows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(demo.threads)
    try:
        return _run_demo(demo, cfg)
    finally:
        torch.set_num_threads(threads)


def _prepare_dir(path: str, resume: bool) -> None:
    if os.path.isdir(path) and os.listdir(path) and not resume:
        if not os.path.exists(os.path.join(path, MARKER)):
            raise FileExistsError(f"{path} exists and is not a demo run; choose another --output-dir")
        shutil.rmtree(path)  # a previous demo run: the demo owns it and starts over
    os.makedirs(path, exist_ok=True)


def _run_demo(demo: DemoConfig, cfg: SpinConfig) -> list[dict[str, Any]]:
    start = time.perf_counter()
    root = cfg.loop.output_dir
    _prepare_dir(root, cfg.loop.resume)
    with open(os.path.join(root, MARKER), "w", encoding="utf-8") as f:
        json.dump({"demo": dataclasses.asdict(demo)}, f, indent=1)
    seeds = [demo.task_seed + i for i in range(demo.seeds)]
    print(f"spin-kernels demo: SPIN on known Markov chains, a tiny Llama on CPU: {len(seeds)} task seed(s) x "
          f"{cfg.loop.iterations} iterations, and two SFT controls -> {root}", flush=True)
    with progress_defaults(leave=False):  # the stages' bars vanish when done; a line per iteration stays
        per_seed = [_run_seed(demo, cfg, s, root if len(seeds) == 1 else os.path.join(root, f"seed{s}"))
                    for s in seeds]
    rows = _aggregate(per_seed)
    seconds = time.perf_counter() - start
    write_results(root, rows, per_seed, demo, cfg, seconds)
    print("\n" + comparison(rows, per_seed, demo, root, seconds))
    return rows


def _kl(model_or_dir, tokenizer, task: MarkovTask, rows: list[dict]) -> tuple[float, float]:
    if isinstance(model_or_dir, str):
        from transformers import AutoModelForCausalLM

        model_or_dir = AutoModelForCausalLM.from_pretrained(model_or_dir)
    return sequence_kl(model_or_dir, tokenizer, task, rows)


def _run_seed(demo: DemoConfig, cfg: SpinConfig, seed: int, root: str) -> dict[str, Any]:
    """One task seed: the early-stopped SFT start, SPIN with held-out evaluation, two controls;
    returns ``{"rows": [...], "sft": ..., "entropy": ..., "stop": ...}``."""
    from transformers import AutoModelForCausalLM

    os.makedirs(root, exist_ok=True)
    task = MarkovTask(num_chains=demo.num_chains, alphabet=demo.alphabet, concentration=demo.concentration,
                      stop_prob=demo.stop_prob, max_len=demo.max_len, seed=seed)
    tokenizer = demo_tokenizer(task.alphabet)
    train = [dict(r, index=i) for i, r in enumerate(task.sample(demo.train_examples, seed=seed + 1))]
    test = task.sample(demo.eval_examples, seed=seed + 2)
    val = task.sample(demo.val_examples, seed=seed + 3)

    # The start: SFT early-stopped on the validation NLL.
    sft_dir = os.path.join(root, "sft")
    sft_info_path = os.path.join(root, "sft.json")
    if not os.path.isdir(sft_dir):
        model = tiny_llama(len(tokenizer), hidden_size=demo.hidden_size, intermediate_size=2 * demo.hidden_size,
                           max_positions=2 * cfg.data.max_length, seed=seed)
        sft = early_stopped_sft(model, tokenizer, train, val, max_steps=demo.sft_steps, batch_size=demo.sft_batch,
                                lr=demo.sft_lr, seed=seed)
        save_model_dir(model, tokenizer, sft_dir, extra={"sft": {k: sft[k] for k in ("steps", "val_nll")}})
        with open(sft_info_path, "w", encoding="utf-8") as f:
            json.dump(sft, f)
    with open(sft_info_path, encoding="utf-8") as f:
        sft = json.load(f)

    # Held-out pairs of the loop: validation samples, never trained on (also written for reading;
    # the loop takes the rows themselves: the task's prompts repeat by design, which a data file
    # would warn about).
    heldout = [{"prompt": r["prompt"], "real": r["real"], "index": i} for i, r in enumerate(val[:demo.heldout_pairs])]
    with open(os.path.join(root, "heldout.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in val[:demo.heldout_pairs])

    kl0 = _kl(sft_dir, tokenizer, task, test)
    val0 = _kl(sft_dir, tokenizer, task, val)[0]
    print(f"seed {seed}: SFT start: {sft['steps']} steps, validation NLL {sft['val_nll']:.3f}, test KL {kl0[0]:.3f}",
          flush=True)

    t_cfg = cfg.training
    steps_per_iter = [cfg.for_iteration(t).epochs * -(-len(train) // cfg.for_iteration(t).global_batch_pairs)
                      for t in range(cfg.loop.iterations)]
    controls = {"SFT lr": AutoModelForCausalLM.from_pretrained(sft_dir),
                "SPIN lr": AutoModelForCausalLM.from_pretrained(sft_dir)}

    def kls(name: str, model) -> dict[str, float]:
        """The loop's summary columns of one model: test KL, its standard error, validation KL."""
        kl, se = _kl(model, tokenizer, task, test)
        return {f"KL {name}": kl, f"KL {name} se": se, f"val KL {name}": _kl(model, tokenizer, task, val)[0]}

    def after_iteration(t: int, model_dir: str, summary: dict[str, Any]) -> dict[str, Any]:
        out = kls("SPIN", model_dir)
        spin_lr = cfg.for_iteration(t).learning_rate
        for name, lr in (("SFT lr", demo.sft_lr), ("SPIN lr", spin_lr)) if demo.controls else ():
            sft_train(controls[name], tokenizer, train, steps=steps_per_iter[t], batch_size=2 * t_cfg.global_batch_pairs,
                      lr=lr, seed=seed + 100 + t, warmup_steps=round(t_cfg.warmup_ratio * steps_per_iter[t]))
            out.update(kls("SFT-control" + ("" if name == "SFT lr" else " (SPIN lr)"), controls[name]))
        print(f"seed {seed}: " + iteration_line({**summary, **out}, kl0[0]), flush=True)
        return out

    spin_cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, model=sft_dir),
        loop=dataclasses.replace(cfg.loop, output_dir=os.path.join(root, "spin"), eval_data=None,
                                 eval_fraction=0.0, stop_below_accuracy=None))
    summaries = run_iterations(spin_cfg, records=train, heldout=heldout, on_iteration_end=after_iteration,
                               echo="none")
    rows = [{"iteration": "SFT start", "KL SPIN": kl0, "val KL SPIN": val0}]
    if demo.controls:
        rows[0].update({"KL SFT-control": kl0, "KL SFT-control (SPIN lr)": kl0, "val KL SFT-control": val0,
                        "val KL SFT-control (SPIN lr)": val0})
    for s in summaries:
        kl = {k: (s[k], s[f"{k} se"]) if f"{k} se" in s else s[k] for k in s
              if k.startswith(("KL", "val KL")) and not k.endswith(" se")}  # (mean, se) as for the start
        rows.append({"iteration": s["iteration"], **kl,
                     "heldout accuracy": s["heldout/accuracy"], "heldout margin": s["heldout/margin"],
                     "loss": s["loss last"], "accuracy": s["accuracy"], "logp real": s["logp real"],
                     "logp synthetic": s["logp synthetic"], "synthetic len": s["synthetic/mean_tokens"]})
    stop = next((s["iteration"] for s in summaries if s["heldout/accuracy"] < demo.stop_rule_accuracy), None)
    return {"seed": seed, "rows": rows, "sft": {k: sft[k] for k in ("steps", "val_nll")},
            "entropy": task.entropy_estimate(test), "stop": stop}


def _aggregate(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per iteration: with one seed its values (KL ± standard error over the test
    samples); with several, the mean and the standard error across seeds. ``Δ KL …``: the change
    from each seed's own SFT start, averaged over the seeds (the starts differ between tasks, so
    the paired change is what the seeds agree or disagree on), with its standard error across
    seeds (none for one seed)."""
    out = []
    for i, row in enumerate(per_seed[0]["rows"]):
        agg: dict[str, Any] = {"iteration": row["iteration"]}
        for key in row:
            if key == "iteration":
                continue
            values = [s["rows"][i][key] for s in per_seed if i < len(s["rows"])]
            if isinstance(values[0], (tuple, list)):  # (mean, se over samples)
                means = [v[0] for v in values]
                agg[key] = sum(means) / len(means)
                agg[f"{key} se"] = values[0][1] if len(values) == 1 else _se(means)
                changes = [s["rows"][i][key][0] - s["rows"][0][key][0] for s in per_seed if i < len(s["rows"])]
                agg[f"Δ {key}"] = sum(changes) / len(changes)
                agg[f"Δ {key} se"] = _se(changes) if len(changes) > 1 else None
            else:
                agg[key] = sum(values) / len(values)
        out.append(agg)
    return out


def _se(values: list[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


COLUMNS = ["iteration", "KL SPIN", "KL SPIN se", "Δ KL SPIN", "Δ KL SPIN se", "KL SFT-control", "Δ KL SFT-control",
           "KL SFT-control (SPIN lr)", "Δ KL SFT-control (SPIN lr)", "Δ KL SFT-control (SPIN lr) se",
           "heldout accuracy", "loss", "accuracy", "logp real", "logp synthetic", "synthetic len"]


def write_results(root: str, rows: list[dict[str, Any]], per_seed: list[dict[str, Any]], demo: DemoConfig,
                  cfg: SpinConfig, seconds: float) -> None:
    table = format_table(rows, COLUMNS, floatfmt="{:.3f}")
    t = cfg.training
    n = len(per_seed)
    se = "standard error across the seeds" if n > 1 else "standard error over the test samples"
    stops = ", ".join(f"seed {s['seed']}: " + (f"after iteration {s['stop']}" if s["stop"] is not None else "never")
                      for s in per_seed)
    sft = ", ".join(f"seed {s['seed']}: {s['sft']['steps']} steps (val NLL {s['sft']['val_nll']:.3f})"
                    for s in per_seed)
    entropy = sum(s["entropy"] for s in per_seed) / n
    text = (f"# spin-kernels demo: does SPIN help? (task seeds {[s['seed'] for s in per_seed]})\n\n"
            f"KL(p_data || p_theta) in nats per sequence on {demo.eval_examples} test samples per seed (exact "
            f"per-token KLs summed along each sample, averaged; se = {se}); Δ KL: the change from each seed's "
            f"SFT start" + (", mean over the seeds (se across them)" if n > 1 else "") + f"; p_data entropy "
            f"{entropy:.3f} "
            f"nats/sequence. Start: SFT on {demo.train_examples} pairs, early-stopped on {demo.val_examples} "
            f"validation samples ({sft}). SPIN: {t.optimizer} lr {t.learning_rate}, beta {t.beta}, {t.epochs} "
            f"epochs/iteration, {t.global_batch_pairs} pairs/step; held-out accuracy on {demo.heldout_pairs} "
            f"validation pairs per iteration. Controls: plain SFT continued from the start for the same optimizer "
            f"steps and sequences per step, at the SFT lr ({demo.sft_lr}) and at SPIN's lr. Stopping rule "
            f"(held-out accuracy < {demo.stop_rule_accuracy}): {stops}. loss, accuracy, logp real/synthetic: the "
            f"SPIN metrics of the iteration's last 3 optimizer steps; synthetic len: mean tokens of the opponent's "
            f"responses. Wall time {seconds:.0f} s.\n\n{table}\n")
    with open(os.path.join(root, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(root, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "per_seed": per_seed, "demo": dataclasses.asdict(demo), "config": cfg.to_dict(),
                   "seconds": seconds}, f, indent=1)
    save_config(cfg, os.path.join(root, "spin_config.yaml"))


def iteration_line(summary: dict[str, Any], kl0: float) -> str:
    """One seed's iteration in a line: its KL and the controls' (changes from the SFT start
    ``kl0``), held-out accuracy, SPIN's last loss and the seconds it took."""
    def delta(key: str) -> str:
        return f"{summary[key] - kl0:+.3f}" if key in summary else "n/a"

    controls = "" if "KL SFT-control" not in summary else \
        f" (controls: SFT lr {delta('KL SFT-control')}, SPIN lr {delta('KL SFT-control (SPIN lr)')})"
    return (f"iteration {summary['iteration']}: KL {summary['KL SPIN']:.3f}, Δ {delta('KL SPIN')}{controls}, "
            f"held-out accuracy {summary['heldout/accuracy']:.2f}, loss {summary['loss last']:.3f}, "
            f"{summary['seconds']:.0f} s")


def _pm(row: dict[str, Any], key: str) -> str:
    """``mean ± se`` of a result column (changes signed; the mean alone without a spread; empty
    if absent)."""
    if row.get(key) is None:
        return ""
    mean = f"{row[key]:+.3f}" if key.startswith("Δ") else f"{row[key]:.3f}"
    se = row.get(f"{key} se")
    return mean if se is None else f"{mean} ± {se:.3f}"


def comparison(rows: list[dict[str, Any]], per_seed: list[dict[str, Any]], demo: DemoConfig, root: str,
               seconds: float) -> str:
    """The demo's verdict for the terminal (at most ~20 lines of at most 160 characters): SPIN's
    KL and its change from the SFT start next to the two controls', held-out accuracy, the
    stopping rule's decision per seed, and the files with the full tables and plots."""
    n = len(per_seed)
    spread = f"mean ± standard error across {n} seeds" if n > 1 else "± standard error over the test samples"
    header = ["iteration", "KL SPIN", "Δ KL SPIN", "Δ KL SFT control", "Δ KL SFT control (SPIN lr)", "held-out acc"]
    table = [{"iteration": r["iteration"], "KL SPIN": _pm(r, "KL SPIN"), "Δ KL SPIN": _pm(r, "Δ KL SPIN"),
              "Δ KL SFT control": _pm(r, "Δ KL SFT-control"),
              "Δ KL SFT control (SPIN lr)": _pm(r, "Δ KL SFT-control (SPIN lr)"),
              "held-out acc": f"{r['heldout accuracy']:.2f}" if "heldout accuracy" in r else ""} for r in rows]
    best = min(rows[1:], key=lambda r: r["KL SPIN"], default=None)
    stops = ", ".join(f"seed {s['seed']} " + (f"after iteration {s['stop']}" if s["stop"] is not None else "never")
                      for s in per_seed)
    lines = [f"SPIN vs the controls: KL(p_data || p_theta), nats/sequence, {demo.eval_examples} test samples per seed; "
             f"Δ: change from the SFT start; {spread}", format_table(table, header)]
    if best is not None:
        lines.append(f"lowest KL: iteration {best['iteration']}, Δ {_pm(best, 'Δ KL SPIN')} (SFT controls: "
                     f"{_pm(best, 'Δ KL SFT-control') or 'n/a'} at the SFT lr, "
                     f"{_pm(best, 'Δ KL SFT-control (SPIN lr)') or 'n/a'} at SPIN's)")
    runs = os.path.join(root, "seed*" if n > 1 else "", "spin")
    lines += [f"stopping rule (held-out accuracy < {demo.stop_rule_accuracy}): {stops}",
              f"done in {seconds:.0f} s; every column, and the settings: {os.path.join(root, 'results.md')}, results.json",
              f"the SPIN runs' tables and plots: {runs}/summary.md, summary.png, iter*/metrics.png"]
    return "\n".join(lines)


