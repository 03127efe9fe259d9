"""The SPIN loop: ``cfg.loop.iterations`` iterations, each the four stages of
spin_kernels.training.stages, and the summaries.

Iteration t (files in ``loop.output_dir``: spin_kernels.training.rundir):

    generate    the opponent (the starting model, then iteration t-1's) samples a synthetic
                response per prompt (and per held-out prompt)          -> iter{t}/generated.jsonl
    reference   it scores the pairs: ref_logps                         -> iter{t}/pairs.jsonl
    train       the main player, initialised from it, trains on them   -> iter{t}/model
    evaluate    the trained model scores the held-out pairs            -> iter{t}/heldout_eval.json

Each stage is skipped when its output is complete *and made from the current inputs*, so
``resume`` just runs the loop again: generation continues from its JSONL, training from its
latest checkpoint. ``iteration_stages`` wires the stages once: planned alone (no model loaded)
they say whether the iteration is current (``all(p.current for p in plans)``); run, they do what
is left, reusing the plans of the check until a stage has run. Every row records what it was
made from and every trained model the key of its inputs (spin_kernels.training.provenance): a
stage whose output was made from other inputs (an edited data file, another opponent, stray
files of another run) is run again (``--on-stale regenerate``, the default) or refused
(``--on-stale error``), never reused. One process at a time writes a run directory
(spin_kernels.training.rundir.single_writer).

Launched with torchrun (``torchrun --nproc_per_node K -m spin_kernels.cli iterate ...``) every
stage runs on all K processes with the model sharded by FSDP2 (spin_kernels.training.parallel):
each rank generates and scores its share of the prompts, trains on its share of every global
batch, and rank 0 writes the files; each iteration's final model is one Hugging Face checkpoint,
loaded (sharded) as the next opponent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import provenance
from .config import SpinConfig
from .data import Record, load_sft_data, read_jsonl
from .loading import Loader, check_impl
from .reference import check_rows_fit
from .metrics import format_table, read_metrics, summarise_iteration
from .parallel import barrier, is_main, session
from .rundir import LOCK_FILE, IterationFiles, check_output_dir, check_run_dir, iteration_model_dir, single_writer
from .stages import Models, Pending, Plan, evaluate, generate, reference, train
from .stages.evaluate import metrics_of, read_json

IterationHook = Callable[[int, str, dict[str, Any]], dict[str, Any] | None]
#: Held-out prompts are sampled from seeds offset from the training ones (other random streams).
HELDOUT_SEED_OFFSET = 1_000_000

__all__ = ["HELDOUT_SEED_OFFSET", "iteration_line", "iteration_stages", "run_iterations", "write_summary"]


def run_iterations(cfg: SpinConfig, *, on_iteration_end: IterationHook | None = None,
                   records: list[Record] | None = None, heldout: list[Record] | None = None,
                   echo: str = "line") -> list[dict[str, Any]]:
    """``spin-kernels iterate``: ``cfg.loop.iterations`` SPIN iterations from ``cfg.model.model``.

    Everything a user can get wrong (configuration, data, model directory, tokenizer, device,
    output directory, another process on the same run) is checked before the run directory is
    written.

    Args:
        on_iteration_end: called as ``hook(t, model_dir, summary)`` after iteration t; the dict it
            returns is merged into the iteration's summary row (the demo adds its KL there).
        records: the ``{index, prompt, real}`` rows, instead of reading ``cfg.data``.
        heldout: held-out rows likewise, instead of ``cfg.loop.eval_data`` or ``eval_fraction``.
        echo: what is printed after each iteration: ``"line"`` (one line of its main numbers and
            the path of summary.md, which holds the full table), ``"table"`` (the full table) or
            ``"none"`` (a caller that prints its own, like the demo).
    Returns:
        one summary row per iteration (also in ``summary.json`` / ``summary.md``). Under torchrun
        every rank runs this; rank 0 alone calls the hook and writes the summaries.
    """
    cfg.validate(need=("model.model",) if records is not None else ("model.model", "data.data"))
    cfg.check_trainable()
    cfg.check_generation_fits()
    check_output_dir(cfg.loop.output_dir)
    if records is None:
        records = load_sft_data(cfg.data)
    train_rows, heldout = _split_heldout(cfg, records) if heldout is None else (records, heldout)
    with session(cfg) as sess, single_writer(os.path.join(cfg.loop.output_dir, LOCK_FILE), "loop.output_dir",
                                                 sess):
        check_impl(cfg.training.impl, sess.device)
        loader = Loader(cfg, sess)
        tokenizer = loader.tokenizer(loader.check(cfg.model.model))
        check_rows_fit(train_rows + heldout, tokenizer, cfg)
        check_run_dir(cfg)
        return _iterate(cfg, loader, on_iteration_end, train_rows, heldout, echo)


def _split_heldout(cfg: SpinConfig, records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(training, held-out) rows, before any model is loaded: ``--eval-data`` (a warning counts
    its rows whose prompt is also a training prompt) or ``--eval-fraction`` (whole prompts held
    out; a ConfigError when it leaves nothing to train on)."""
    from .evaluation import split_heldout, warn_heldout_overlap

    if cfg.loop.eval_data:
        heldout = load_sft_data(dataclasses.replace(cfg.data, data=cfg.loop.eval_data, max_examples=None))
        warn_heldout_overlap(records, heldout, cfg.data.data, cfg.loop.eval_data)
        return records, heldout
    return split_heldout(records, cfg.loop.eval_fraction, cfg.training.seed)


def _training_rows(cfg: SpinConfig, t: int, generated: list[Record]) -> list[Record]:
    """Iteration t's pairs: its own synthetic responses and, with ``--include-previous K``, those
    of the previous K iterations (each row records the iteration that sampled it)."""
    rows = [dict(r, source_iteration=t) for r in generated]
    for k in range(1, int(cfg.loop.include_previous) + 1):
        if t - k >= 0:
            prev = read_jsonl(IterationFiles(cfg.loop.output_dir, t - k).generated)
            rows += [dict(r, source_iteration=t - k) for r in prev]
    return rows


class _Steps:
    """Walks the stages of an iteration: each is planned (``make()``; ``Pending`` while an input
    is missing), and with ``run`` what is not current is run. A plan of ``planned`` (an earlier
    walk over the same files) is taken instead of planning again until a stage has run."""

    def __init__(self, loader: Loader, run: bool, planned: Sequence[Plan]):
        self.loader, self.run, self.planned = loader, run, list(planned)
        self.models = Models(loader) if run else None
        self.plans: list[Plan] = []
        self.ran = False

    def __call__(self, stage, make: Callable[[], Plan], *inputs: Any) -> Any:
        """The output of ``stage`` (a stage module), or None when it is not current and not run."""
        earlier = self.planned[len(self.plans)] if len(self.plans) < len(self.planned) else None
        if any(x is None for x in inputs):
            plan = Pending(stage.__name__.rsplit(".", 1)[-1])
        elif earlier is not None and not self.ran and not isinstance(earlier, Pending):
            plan = earlier
        else:
            plan = make()
        self.plans.append(plan)
        if plan.current or not self.run:
            return plan.output
        self.ran = True
        return stage.run(plan, self.loader, self.models)


def iteration_stages(cfg: SpinConfig, loader: Loader, t: int, records: list[Record], heldout: list[Record],
                     opponent: str, *, run: bool = False, planned: Sequence[Plan] = ()) -> list[Plan]:
    """The plans of iteration t's stages, in order: generate (training and held-out prompts),
    reference (both), train, evaluate (with held-out prompts). ``run=False``: planned only, no
    model loaded; ``run=True``: what is not current is run (``planned``: the plans of a check
    just before, reused until a stage has run)."""
    f = IterationFiles(cfg.loop.output_dir, t)
    seed = cfg.generation.generation_seed + t
    tokenizer = loader.tokenizer(opponent)
    step = _Steps(loader, run, planned)
    generated = step(generate, lambda: generate.plan(cfg, records, f.generated, model_path=opponent, seed=seed,
                                                     tokenizer=tokenizer, desc=f"iter{t} generate"))
    held_generated = step(generate, lambda: generate.plan(
        cfg, heldout, f.heldout_generated, model_path=opponent, seed=seed + HELDOUT_SEED_OFFSET,
        tokenizer=tokenizer, desc=f"iter{t} held-out generate")) if heldout else []
    rows = None if generated is None else _training_rows(cfg, t, generated)
    pairs = step(reference, lambda: reference.plan(cfg, rows, f.pairs, model_path=opponent, tokenizer=tokenizer,
                                                   desc=f"iter{t} reference"), rows)
    held_rows = None if held_generated is None else [dict(r, source_iteration=t) for r in held_generated]
    held_pairs = step(reference, lambda: reference.plan(cfg, held_rows, f.heldout_pairs, model_path=opponent,
                                                        tokenizer=tokenizer, desc=f"iter{t} held-out reference"),
                      held_rows) \
        if heldout else []
    trained = step(train, lambda: train.plan(cfg, pairs, f.dir, start_model=opponent, tokenizer=tokenizer,
                                             pairs_path=f.pairs, iteration=t, desc=f"iter{t} train",
                                             info={"iteration": t, "opponent": opponent}), pairs)
    if heldout:
        step(evaluate, lambda: evaluate.plan(cfg, held_pairs, trained, f.heldout_eval, iteration=t,
                                             desc=f"iter{t} held-out"), held_pairs, trained)
    return step.plans


def _eval_command(cfg: SpinConfig, model_dir: str, path: str) -> dict[str, Any]:
    """``--eval-command`` on the iteration's model, run once per (command, model) on rank 0."""
    from .evaluation import run_eval_command

    stamp = {"command": cfg.loop.eval_command, "model": provenance.model_digest(model_dir)}
    done = read_json(path)
    if done is not None and {k: done.get(k) for k in stamp} == stamp:
        return {k: v for k, v in done.items() if k.startswith("eval/")}
    result = run_eval_command(cfg.loop.eval_command, model_dir)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({**stamp, **result}, fh, indent=1)
    return result


def _iterate(cfg: SpinConfig, loader: Loader, on_iteration_end: IterationHook | None, train_rows: list[Record],
             heldout: list[Record], echo: str) -> list[dict[str, Any]]:
    from .evaluation import synthetic_stats

    run_dir = cfg.loop.output_dir
    summaries: list[dict[str, Any]] = []
    for t in range(cfg.loop.iterations):
        f = IterationFiles(run_dir, t)
        os.makedirs(f.dir, exist_ok=True)
        opponent = cfg.model.model if t == 0 else iteration_model_dir(run_dir, t - 1)
        start = time.perf_counter()
        plans = iteration_stages(cfg, loader, t, train_rows, heldout, opponent)
        if not all(p.current for p in plans):
            iteration_stages(cfg, loader, t, train_rows, heldout, opponent, run=True, planned=plans)
        summary: dict[str, Any] = {"iteration": t, **summarise_iteration(read_metrics(f.metrics)),
                                   **synthetic_stats(list(read_jsonl(f.generated)), loader.tokenizer(opponent)),
                                   "seconds": round(time.perf_counter() - start, 1)}
        if heldout:
            summary.update(metrics_of(read_json(f.heldout_eval) or {}))
        stop = cfg.loop.stop_below_accuracy
        if stop is not None and summary["heldout/accuracy"] < stop:
            summary["stopped"] = (f"held-out accuracy {summary['heldout/accuracy']:.3f} < {stop:g} "
                                  f"(--stop-below-accuracy): the model no longer tells its own samples from the "
                                  f"data; the loop ends after iteration {t}")
        summaries.append(summary)
        if is_main():  # the hook, the eval command, the summary files and the table: rank 0 only
            _report(cfg, t, f, summaries, on_iteration_end, echo)
        barrier()
        if "stopped" in summary:
            break
    return summaries


def _report(cfg: SpinConfig, t: int, f: IterationFiles, summaries: list[dict[str, Any]],
            on_iteration_end: IterationHook | None, echo: str) -> None:
    """Rank 0 after iteration t: the eval command and the hook add to its summary (the last
    row); the summary files are written and the iteration reported (``echo``)."""
    summary, run_dir = summaries[-1], cfg.loop.output_dir
    if cfg.loop.eval_command:
        summary.update(_eval_command(cfg, f.model, f.eval_command))
    if on_iteration_end is not None:
        summary.update(on_iteration_end(t, f.model, summary) or {})
    write_summary(run_dir, summaries)
    if echo == "table":
        print(f"\nSPIN after iteration {t} ({run_dir}):")
        print(format_table(summaries, [c for c in summary if c != "stopped"]))
    elif echo == "line":
        print(iteration_line(summary) + f"; table: {os.path.join(run_dir, 'summary.md')}")
    if "stopped" in summary and echo != "none":
        print(summary["stopped"])


def iteration_line(summary: dict[str, Any]) -> str:
    """One line of an iteration's summary row: its loss, accuracy, held-out accuracy (with held-out
    prompts), the synthetic responses' mean length and the seconds it took."""
    parts = [f"loss {summary['loss first']:.3f} -> {summary['loss last']:.3f}", f"accuracy {summary['accuracy']:.2f}"]
    if "heldout/accuracy" in summary:
        parts.append(f"held-out accuracy {summary['heldout/accuracy']:.2f}")
    parts.append(f"synthetic {summary['synthetic/mean_tokens']:.0f} tokens")
    return f"SPIN after iteration {summary['iteration']} ({summary['seconds']:.0f} s): " + ", ".join(parts)


def write_summary(run_dir: str, rows: list[dict[str, Any]]) -> None:
    """summary.json, summary.md (a table, and the stopping rule's decision) and summary.png."""
    from .metrics import plot_summary

    with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    columns = [c for c in rows[-1] if c not in ("stopped", "eval/last_line")]
    notes = [f"\n{r['iteration']}: {r['eval/last_line']}" for r in rows if r.get("eval/last_line")]
    stopped = [f"\n{r['stopped']}" for r in rows if r.get("stopped")]
    with open(os.path.join(run_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(format_table(rows, columns) + "\n" + "".join(notes) + "".join(stopped) + "\n")
    plot_summary(rows, os.path.join(run_dir, "summary.png"))

