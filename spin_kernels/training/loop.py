"""The SPIN loop and the single stages behind the CLI subcommands.

A run directory holds::

    config.yaml                 the configuration the run started with
    iter{t}/generated.jsonl     (1) the opponent's synthetic responses, appended batch by batch
    iter{t}/pairs.jsonl         (2) the training pairs with the opponent's ref_logps
    iter{t}/metrics.jsonl, metrics.png, checkpoints/, model/   (3) training; model/ is (4),
                                the next opponent
    summary.json, summary.md    one row per finished iteration

Each stage is skipped when its output is complete, so ``resume`` just runs the loop again:
generation continues from its JSONL, training from its latest checkpoint.

Launched with torchrun (``torchrun --nproc_per_node K -m spin_kernels.cli iterate ...``) every
stage runs on all K processes with the model sharded by FSDP2 (spin_kernels.training.parallel):
each rank generates and scores its share of the prompts, trains on its share of every global
batch, and rank 0 writes the files; each iteration's final model is one Hugging Face checkpoint,
loaded (sharded) as the next opponent.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from .config import ConfigError, SpinConfig, config_from_dict, save_config
from .data import Record, load_sft_data, read_jsonl, write_jsonl_atomic
from .generation import generate_synthetic
from .loading import check_model_dir, load_tokenizer
from .metrics import format_table, read_metrics, summarise_iteration
from .parallel import Session, barrier, is_main, load_runner, session
from .reference import reference_logps_for, to_examples
from .trainer import train_spin

IterationHook = Callable[[int, str, dict[str, Any]], dict[str, Any] | None]


def _load(cfg: SpinConfig, path: str, sess: Session):
    """(runner, tokenizer) for the model directory ``path``: see parallel.load_runner."""
    tokenizer = load_tokenizer(cfg.model.tokenizer or path)
    return load_runner(path, cfg, sess), tokenizer


def _prepared(runner):
    """The runner, its model switched to packed (varlen) batches for reference and training."""
    from spin_kernels.models import prepare_model

    prepare_model(runner.model)
    return runner


# --------------------------------------------------------------------------- single stages


def stage_generate(model, tokenizer, records: list[Record], cfg: SpinConfig, out_path: str, *, seed: int,
                   model_path: str | None = None, desc: str = "generate") -> list[Record]:
    return generate_synthetic(model, tokenizer, records, cfg.generation, out_path,
                              max_prompt_length=cfg.data.max_prompt_length, seed=seed, model_path=model_path,
                              desc=desc)


def stage_reference(model, tokenizer, rows: list[Record], cfg: SpinConfig, out_path: str,
                    desc: str = "reference") -> list[Record]:
    """Rows with ``ref_logps = [log p(real), log p(synthetic)]`` under ``model`` (prepared), written
    atomically to ``out_path``."""
    t = cfg.training
    examples = to_examples(tokenizer, rows, max_length=cfg.data.max_length,
                           max_prompt_length=cfg.data.max_prompt_length)
    refs = reference_logps_for(model, examples, token_budget=t.token_budget, impl=t.impl, average=t.average_log_prob,
                               bf16=t.bf16, desc=desc)
    out = [{**row, "ref_logps": list(ref)} for row, ref in zip(rows, refs)]
    if is_main():
        write_jsonl_atomic(out_path, out)
    barrier()
    return out


def read_rows(path: str, need: tuple[str, ...], what: str) -> list[Record]:
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: file not found: {path}")
    rows = list(read_jsonl(path))
    for i, row in enumerate(rows):
        missing = [k for k in need if k not in row]
        if missing:
            raise ConfigError(f"{what}: {path} row {i} lacks {missing} (expected fields {list(need)})")
    if not rows:
        raise ConfigError(f"{what}: {path} holds no rows")
    return rows


def run_generate(cfg: SpinConfig, output: str) -> list[Record]:
    """``spin-kernels generate``: sample synthetic responses for the data's prompts with ``model``."""
    cfg.validate(need=("model.model", "data.data"))
    with session(cfg) as sess:
        model, tokenizer = _load(cfg, check_model_dir(cfg.model.model), sess)
        records = load_sft_data(cfg.data)
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        return stage_generate(model, tokenizer, records, cfg, output, seed=cfg.generation.generation_seed,
                              model_path=cfg.model.model)


def run_reference(cfg: SpinConfig, inp: str, output: str) -> list[Record]:
    """``spin-kernels reference``: add the model's ref_logps to generated rows."""
    cfg.validate(need=("model.model",))
    rows = read_rows(inp, ("prompt", "real", "synthetic"), "--input")
    with session(cfg) as sess:
        model, tokenizer = _load(cfg, check_model_dir(cfg.model.model), sess)
        return stage_reference(_prepared(model), tokenizer, rows, cfg, output)


def run_train(cfg: SpinConfig, inp: str, out_dir: str) -> str:
    """``spin-kernels train``: train on pairs with ref_logps; returns the final model directory."""
    cfg.validate(need=("model.model",))
    rows = read_rows(inp, ("prompt", "real", "synthetic", "ref_logps"), "--input")
    if not cfg.loop.resume and any(os.path.exists(os.path.join(out_dir, d)) for d in ("model", "checkpoints")):
        raise ConfigError(f"loop.output_dir: {out_dir!r} already holds a training run; pass --resume to continue "
                          f"it or choose another --output-dir")
    with session(cfg) as sess:
        model, tokenizer = _load(cfg, check_model_dir(cfg.model.model), sess)
        t = cfg.training
        examples = to_examples(tokenizer, rows, max_length=cfg.data.max_length,
                               max_prompt_length=cfg.data.max_prompt_length)
        res = train_spin(_prepared(model), tokenizer, examples, t, out_dir, resume=cfg.loop.resume,
                         tensorboard=cfg.loop.tensorboard, info={"start_model": cfg.model.model})
        return res.model_dir


# --------------------------------------------------------------------------- the loop


def _check_run_dir(cfg: SpinConfig) -> None:
    """Refuse to overwrite a run / to resume one with another configuration; record the config.
    Every rank checks (so all raise alike) before rank 0 writes."""
    run_dir = cfg.loop.output_dir
    saved = os.path.join(run_dir, "config.yaml")
    existed = os.path.exists(saved)
    barrier()
    if existed:
        if not cfg.loop.resume:
            raise ConfigError(f"loop.output_dir: {run_dir!r} already holds a run; pass --resume to continue it "
                              f"or choose another --output-dir")
        import yaml

        with open(saved, encoding="utf-8") as f:
            old = config_from_dict(yaml.safe_load(f)).to_dict()
        new = cfg.to_dict()
        # These may change between an interrupted run and its continuation without changing results.
        free = {("loop", "resume"), ("loop", "iterations"), ("loop", "tensorboard"), ("model", "device"),
                ("distributed", "fsdp"), ("distributed", "cpu_offload"), ("distributed", "reshard_after_forward")}
        diff = [f"{s}.{k}" for s in new for k in new[s]
                if (s, k) not in free and new[s][k] != old[s][k]]
        if diff:
            raise ConfigError(f"--resume: the configuration differs from the run's config.yaml in {diff}")
    elif is_main():
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, saved)
    barrier()


def iteration_model_dir(run_dir: str, t: int) -> str:
    return os.path.join(run_dir, f"iter{t}", "model")


def run_iterations(cfg: SpinConfig, *, on_iteration_end: IterationHook | None = None,
                   records: list[Record] | None = None) -> list[dict[str, Any]]:
    """``spin-kernels iterate``: ``cfg.loop.iterations`` SPIN iterations from ``cfg.model.model``.

    Args:
        on_iteration_end: called as ``hook(t, model_dir, summary)`` after iteration t; the dict it
            returns is merged into the iteration's summary row (the demo adds its KL there).
        records: the ``{index, prompt, real}`` rows, instead of reading ``cfg.data``.
    Returns:
        one summary row per iteration (also in ``summary.json`` / ``summary.md``). Under torchrun
        every rank runs this; rank 0 alone calls the hook and writes the summaries.
    """
    cfg.validate(need=("model.model",) if records is not None else ("model.model", "data.data"))
    check_model_dir(cfg.model.model)
    with session(cfg) as sess:
        return _iterate(cfg, sess, on_iteration_end, records)


def _iterate(cfg: SpinConfig, sess: Session, on_iteration_end: IterationHook | None,
             records: list[Record] | None) -> list[dict[str, Any]]:
    run_dir = cfg.loop.output_dir
    _check_run_dir(cfg)
    if records is None:
        records = load_sft_data(cfg.data)
    summaries: list[dict[str, Any]] = []
    t_cfg = cfg.training
    for t in range(cfg.loop.iterations):
        it_dir = os.path.join(run_dir, f"iter{t}")
        os.makedirs(it_dir, exist_ok=True)
        opponent = cfg.model.model if t == 0 else iteration_model_dir(run_dir, t - 1)
        final = iteration_model_dir(run_dir, t)
        start = time.perf_counter()
        if not os.path.isdir(final):
            model, tokenizer = _load(cfg, opponent, sess)
            gen_path = os.path.join(it_dir, "generated.jsonl")
            generated = stage_generate(model, tokenizer, records, cfg, gen_path,
                                       seed=cfg.generation.generation_seed + t, model_path=opponent,
                                       desc=f"iter{t} generate")
            model = _prepared(model)
            pairs_path = os.path.join(it_dir, "pairs.jsonl")
            if os.path.exists(pairs_path):
                pairs = list(read_jsonl(pairs_path))
            else:
                rows = [dict(r, source_iteration=t) for r in generated]
                if cfg.loop.include_previous and t > 0:
                    prev = list(read_jsonl(os.path.join(run_dir, f"iter{t - 1}", "generated.jsonl")))
                    rows += [dict(r, source_iteration=t - 1) for r in prev]
                pairs = stage_reference(model, tokenizer, rows, cfg, pairs_path, desc=f"iter{t} reference")
            examples = to_examples(tokenizer, pairs, max_length=cfg.data.max_length,
                                   max_prompt_length=cfg.data.max_prompt_length)
            train_spin(model, tokenizer, examples, t_cfg, it_dir, resume=cfg.loop.resume,
                       tensorboard=cfg.loop.tensorboard, desc=f"iter{t} train",
                       info={"iteration": t, "opponent": opponent})
            del model
        generated = list(read_jsonl(os.path.join(it_dir, "generated.jsonl")))
        summary: dict[str, Any] = {"iteration": t, **summarise_iteration(read_metrics(
            os.path.join(it_dir, "metrics.jsonl"))),
            "synthetic len": sum(r["synthetic_tokens"] for r in generated) / len(generated),
            "finished": sum(bool(r["finished"]) for r in generated) / len(generated),
            "seconds": round(time.perf_counter() - start, 1)}
        if is_main():  # the hook, the summary files and the table: rank 0 only
            if on_iteration_end is not None:
                summary.update(on_iteration_end(t, final, summary) or {})
            summaries.append(summary)
            write_summary(run_dir, summaries)
            print(f"\nSPIN after iteration {t} ({run_dir}):")
            print(format_table(summaries, list(summaries[-1])))
        else:
            summaries.append(summary)
    return summaries


def write_summary(run_dir: str, rows: list[dict[str, Any]]) -> None:
    with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(run_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(format_table(rows, list(rows[-1])) + "\n")
