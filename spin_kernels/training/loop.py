"""The SPIN loop and the single stages behind the CLI subcommands.

A run directory holds::

    config.yaml                 the configuration the run started with
    iter{t}/generated.jsonl     (1) the opponent's synthetic responses, appended batch by batch
    iter{t}/pairs.jsonl         (2) the training pairs with the opponent's ref_logps
    iter{t}/metrics.jsonl, metrics.png, checkpoints/, model/   (3) training; model/ is (4),
                                the next opponent
    summary.json, summary.md    one row per finished iteration

Each stage is skipped when its output is complete *and made from the current inputs*, so
``resume`` just runs the loop again: generation continues from its JSONL, training from its
latest checkpoint. Every row records what it was made from and every trained model the key of
its inputs (spin_kernels.training.provenance): a stage whose output was made from other inputs
(an edited data file, another opponent, stray files of another run) is run again
(``--on-stale regenerate``, the default) or refused (``--on-stale error``), never reused. One
process at a time writes a run directory (spin_kernels.training.runlock).

Launched with torchrun (``torchrun --nproc_per_node K -m spin_kernels.cli iterate ...``) every
stage runs on all K processes with the model sharded by FSDP2 (spin_kernels.training.parallel):
each rank generates and scores its share of the prompts, trains on its share of every global
batch, and rank 0 writes the files; each iteration's final model is one Hugging Face checkpoint,
loaded (sharded) as the next opponent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import provenance
from .config import SCHEDULED, ConfigError, SpinConfig, config_from_dict, save_config
from .data import Record, check_row_ref_logps, load_sft_data, read_jsonl, read_stage_rows
from .checkpoint import trained_model_key
from .generation import generate_synthetic, plan_generation
from .loading import Loader, check_impl
from .metrics import format_table, read_metrics, summarise_iteration
from .parallel import Session, barrier, is_main, session
from .reference import reference_logps_for, to_examples
from .runlock import RunLock
from .trainer import train_spin

IterationHook = Callable[[int, str, dict[str, Any]], dict[str, Any] | None]
LOCK_FILE = ".spin-kernels.lock"


# --------------------------------------------------------------------------- checks before work


def check_output_dir(path: str, what: str = "loop.output_dir") -> str:
    """Create ``path`` if needed; refuse a file or a directory this process cannot write."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{what}: {path!r} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot create {path!r} ({exc.strerror})") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: {path!r} is not writable")
    return path


def check_output_file(path: str, what: str = "--output") -> str:
    """The parent of ``path`` is created and writable, and ``path`` is not a directory."""
    if os.path.isdir(path):
        raise ConfigError(f"{what}: {path!r} is a directory; give a file name")
    check_output_dir(os.path.dirname(os.path.abspath(path)), what)
    return path


@contextlib.contextmanager
def single_writer(lock_path: str, what: str, sess: Session) -> Iterator[None]:
    """Rank 0 holds ``RunLock(lock_path)`` for the block; every rank raises alike if it cannot."""
    from spin_kernels.distributed.env import all_reduce_sum

    lock, error = None, None
    if is_main():
        try:
            lock = RunLock(lock_path, what=what).acquire()
        except ConfigError as exc:
            error = exc
    (failed,) = all_reduce_sum([float(error is not None)], sess.device)
    if error is not None:
        raise error
    if failed:
        raise ConfigError(f"{what}: rank 0 could not lock {os.path.dirname(lock_path)!r} (in use by another run)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


# --------------------------------------------------------------------------- single stages


def stage_generate(model, tokenizer, records: list[Record], cfg: SpinConfig, out_path: str, *, seed: int,
                   model_path: str, desc: str = "generate") -> list[Record]:
    return generate_synthetic(model, tokenizer, records, cfg.generation, out_path,
                              max_prompt_length=cfg.data.max_prompt_length, seed=seed, model_path=model_path,
                              model_label=_label(cfg, model_path), on_stale=cfg.data.on_stale, desc=desc)


def _label(cfg: SpinConfig, model_path: str) -> str | None:
    """``iter{t}/model`` for a model of this run (its rows then read the same wherever the run
    directory is), None (the path itself) for any other model."""
    run = os.path.realpath(cfg.loop.output_dir)
    full = os.path.realpath(model_path)
    return os.path.relpath(full, run) if full.startswith(run + os.sep) else None


def reference_sources(rows: list[Record], model_path: str, cfg: SpinConfig) -> list[dict[str, Any]]:
    """The ``reference`` record each pairs row scored by ``model_path`` must carry."""
    stamp = provenance.model_stamp(model_path, _label(cfg, model_path))
    return [provenance.reference_source(r, stamp, cfg.data, cfg.training.average_log_prob) for r in rows]


def current_pairs(path: str, rows: list[Record], sources: list[dict[str, Any]], on_stale: str) -> list[Record] | None:
    """The pairs of ``path`` if they are exactly ``rows`` scored as ``sources`` say, else None
    (with a warning), or a ConfigError with ``on_stale="error"``. No file: None."""
    if not os.path.exists(path):
        return None
    pairs = list(read_jsonl(path, tolerate_torn_tail=True))
    problem = None
    if len(pairs) != len(rows):
        problem = f"it holds {len(pairs)} row(s) for {len(rows)} generated row(s)"
    for n, (pair, row, src) in enumerate(zip(pairs, rows, sources)):
        if problem is not None:
            break
        if not isinstance(pair, dict) or {k: v for k, v in pair.items() if k not in ("ref_logps", "reference")} != row:
            problem = f"line {n + 1} is not the generated row {row.get('index')} it should score"
        elif (why := provenance.differences(pair.get("reference"), src)) is not None:
            problem = f"line {n + 1}: {why}"
        else:
            try:
                check_row_ref_logps(pair.get("ref_logps"), f"line {n + 1}")
            except ConfigError as exc:
                problem = str(exc)
    if problem is None:
        return pairs
    if on_stale == "error":
        raise ConfigError(f"{path}: cannot be reused: {problem}; remove it or rerun with --on-stale regenerate")
    if is_main():
        print(f"spin-kernels: warning: {path} cannot be reused ({problem}); the reference pass runs again",
              file=sys.stderr)
    return None


def stage_reference(model, loader: Loader, rows: list[Record], cfg: SpinConfig, out_path: str, *, model_path: str,
                    desc: str = "reference") -> list[Record]:
    """Rows with ``ref_logps = [log p(real), log p(synthetic)]`` under ``model`` (prepared, loaded
    from ``model_path`` by ``loader``) and the ``reference`` record of how they were computed,
    written atomically to ``out_path``; an up-to-date ``out_path`` is reused as it is."""
    from .data import write_jsonl_atomic

    sources = reference_sources(rows, model_path, cfg)
    pairs = current_pairs(out_path, rows, sources, cfg.data.on_stale)
    if pairs is not None:
        return pairs
    t = cfg.training
    examples = to_examples(loader.tokenizer(model_path), rows, cfg.data)
    refs = reference_logps_for(model, examples, token_budget=t.token_budget, impl=t.impl, average=t.average_log_prob,
                               share_prompt=t.share_prompt, autocast=loader.autocast, desc=desc)
    out = [{**row, "ref_logps": list(ref), "reference": src} for row, ref, src in zip(rows, refs, sources)]
    bad = [(i, ref) for i, ref in enumerate(refs) if not all(map(_finite_logp, ref))]
    if bad:
        raise ConfigError(f"{desc}: the model {model_path!r} gives non-finite log-probs for {len(bad)} row(s), e.g. "
                          f"row {bad[0][0]} (index {rows[bad[0][0]].get('index')}): {bad[0][1]}; its weights are "
                          f"finite, so its activations overflow in --dtype {cfg.model.dtype}")
    if is_main():
        write_jsonl_atomic(out_path, out)
    barrier()
    return out


def _finite_logp(v: float) -> bool:
    return v == v and v not in (float("inf"), float("-inf"))


def _describe(pairs: list[Record], path: str) -> Callable[[list[int]], str]:
    """Names training examples (positions in ``pairs``) by the file's lines and the data rows."""
    def describe(positions: list[int]) -> str:
        lines = [p + 1 for p in positions[:10]]
        data = [pairs[p].get("index") for p in positions[:10]]
        more = f" and {len(positions) - 10} more" if len(positions) > 10 else ""
        return f"pairs at {path} lines {lines}{more} (data rows {data})"

    return describe


def run_generate(cfg: SpinConfig, output: str) -> list[Record]:
    """``spin-kernels generate``: sample synthetic responses for the data's prompts with ``model``."""
    cfg.validate(need=("model.model", "data.data"))
    cfg.check_generation_fits()
    check_output_file(output)
    records = load_sft_data(cfg.data)
    with session(cfg) as sess, single_writer(f"{output}.lock", "--output", sess):
        loader = Loader(cfg, sess)
        model_path = loader.check(cfg.model.model)
        tokenizer = loader.tokenizer(model_path)
        plan = plan_generation(records, output, cfg.generation, max_prompt_length=cfg.data.max_prompt_length,
                               model_path=model_path, model_label=_label(cfg, model_path),
                               seed=cfg.generation.generation_seed, on_stale=cfg.data.on_stale, tokenizer=tokenizer)
        model = loader.runner(model_path) if plan.todo else None
        return stage_generate(model, tokenizer, records, cfg, output, seed=cfg.generation.generation_seed,
                              model_path=model_path)


def _check_sampled_with(rows: list[Record], cfg: SpinConfig, model_path: str, what: str) -> None:
    """The responses of ``rows`` must have been sampled under this run's prompt length limit;
    another model than the scoring one is allowed (with a warning): SPIN scores with the opponent."""
    digest = provenance.model_digest(model_path)
    others = 0
    for n, row in enumerate(rows):
        src = row.get("source")
        if not isinstance(src, dict):
            continue
        if src.get("max_prompt_length") not in (None, cfg.data.max_prompt_length):
            raise ConfigError(f"{what}: line {n + 1}: the synthetic response was sampled from prompts cut to "
                              f"{src.get('max_prompt_length')} tokens, but --max-prompt-length is "
                              f"{cfg.data.max_prompt_length}: the pair would be scored on another prompt; use the "
                              f"generation's value")
        others += provenance.differences({"m": src.get("opponent")}, {"m": {"path": model_path, "digest": digest}}) \
            is not None
    if others and is_main():
        print(f"spin-kernels: warning: {others} row(s) of {what} were sampled by another model than {model_path!r}; "
              f"in SPIN the reference is the opponent that sampled them", file=sys.stderr)


def run_reference(cfg: SpinConfig, inp: str, output: str) -> list[Record]:
    """``spin-kernels reference``: add the model's ref_logps to generated rows."""
    cfg.validate(need=("model.model",))
    rows = read_stage_rows(inp, ("prompt", "real", "synthetic"), "--input")
    check_output_file(output)
    with session(cfg) as sess, single_writer(f"{output}.lock", "--output", sess):
        check_impl(cfg.training.impl, sess.device)
        loader = Loader(cfg, sess)
        model_path = loader.check(cfg.model.model)
        _check_sampled_with(rows, cfg, model_path, "--input")
        loader.tokenizer(model_path)
        model = loader.prepared(loader.runner(model_path))
        return stage_reference(model, loader, rows, cfg, output, model_path=model_path)


def _check_reference_settings(rows: list[Record], cfg: SpinConfig, model_path: str, inp: str) -> bool:
    """Whether the pairs' ref_logps must be recomputed: they were computed with other length
    limits (or averaging) than training uses. Recomputed only when they came from the training's
    own starting model (the SPIN reference) and ``on_stale`` allows; else a ConfigError."""
    want = {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length,
            "average_log_prob": cfg.training.average_log_prob}
    unrecorded = 0
    for n, row in enumerate(rows):
        ref = row.get("reference")
        if not isinstance(ref, dict):
            unrecorded += 1
            continue
        diff = {k: (ref.get(k), v) for k, v in want.items() if ref.get(k) != v}
        if not diff:
            continue
        shown = ", ".join(f"{k} {a} (training: {b})" for k, (a, b) in diff.items())
        ours = provenance.differences({"m": ref.get("model")},
                                      {"m": provenance.model_stamp(model_path)}) is None
        if ours and cfg.data.on_stale == "regenerate":
            if is_main():
                print(f"spin-kernels: warning: --input {inp}: ref_logps were computed with {shown}; they are "
                      f"recomputed with {model_path!r}", file=sys.stderr)
            return True
        raise ConfigError(f"--input: {inp}:{n + 1}: ref_logps were computed with {shown}; the reference log-probs "
                          f"must score the same token sequences as training. Recompute them with spin-kernels "
                          f"reference and the training's lengths"
                          + ("" if ours else f" (they come from another model than {model_path!r})"))
    if unrecorded and is_main():
        print(f"spin-kernels: note: {unrecorded} row(s) of {inp} do not record how their ref_logps were computed; "
              f"they are used as given", file=sys.stderr)
    return False


def run_train(cfg: SpinConfig, inp: str, out_dir: str) -> str:
    """``spin-kernels train``: train on pairs with ref_logps; returns the final model directory."""
    cfg.validate(need=("model.model",))
    cfg.check_trainable()
    for key in SCHEDULED:
        if isinstance(value := getattr(cfg.training, key), list) and len(value) > 1:
            raise ConfigError(f"training.{key}: one value per iteration is for spin-kernels iterate; train runs one "
                              f"training, got {value}")
    rows = read_stage_rows(inp, ("prompt", "real", "synthetic", "ref_logps"), "--input")
    check_output_dir(out_dir)
    with session(cfg) as sess, single_writer(os.path.join(out_dir, LOCK_FILE), "loop.output_dir", sess):
        if not cfg.loop.resume and any(os.path.exists(os.path.join(out_dir, d)) for d in ("model", "checkpoints")):
            raise ConfigError(f"loop.output_dir: {out_dir!r} already holds a training run; pass --resume to continue "
                              f"it or choose another --output-dir")
        check_impl(cfg.training.impl, sess.device)
        loader = Loader(cfg, sess)
        model_path = loader.check(cfg.model.model)
        recompute = _check_reference_settings(rows, cfg, model_path, inp)
        tokenizer = loader.tokenizer(model_path)
        model = loader.prepared(loader.runner(model_path))
        if recompute:
            body = [{k: v for k, v in r.items() if k not in ("ref_logps", "reference")} for r in rows]
            rows = stage_reference(model, loader, body, cfg, os.path.join(out_dir, "pairs.jsonl"),
                                   model_path=model_path)
        examples = to_examples(tokenizer, rows, cfg.data)
        res = train_spin(model, tokenizer, examples, cfg.for_iteration(0), out_dir, resume=cfg.loop.resume,
                         tensorboard=cfg.loop.tensorboard, info={"start_model": model_path},
                         start_digest=provenance.model_digest(model_path), on_stale=cfg.data.on_stale,
                         describe=_describe(rows, inp), autocast=loader.autocast)
        return res.model_dir


# --------------------------------------------------------------------------- the loop

#: Fields that name files: compared as resolved paths, so ``run/`` and ``/abs/run`` are one run.
_PATH_FIELDS = (("model", "model"), ("model", "tokenizer"), ("data", "data"))
#: Fields that may change between an interrupted run and its continuation without changing results.
_FREE_FIELDS = {("loop", "resume"), ("loop", "iterations"), ("loop", "tensorboard"), ("loop", "output_dir"),
                ("model", "device"), ("data", "on_stale"), ("training", "save_every"), ("training", "log_every"),
                ("loop", "stop_below_accuracy"), ("loop", "eval_command"),
                ("distributed", "fsdp"), ("distributed", "cpu_offload"), ("distributed", "reshard_after_forward")}


def _comparable(cfg: dict[str, dict[str, Any]], base: str) -> dict[str, dict[str, Any]]:
    out = {s: dict(v) for s, v in cfg.items()}
    for sec, key in _PATH_FIELDS:
        value = out.get(sec, {}).get(key)
        if isinstance(value, str) and value:
            full = value if os.path.isabs(value) else os.path.join(base, value)
            if os.path.exists(full):
                out[sec][key] = os.path.realpath(full)
    return out


def run_has_work(run_dir: str) -> bool:
    """Whether a run directory holds the output of any stage (beyond its config and lock)."""
    if not os.path.isdir(run_dir):
        return False
    for name in os.listdir(run_dir):
        it = os.path.join(run_dir, name)
        if not (name.startswith("iter") and os.path.isdir(it)):
            continue
        for entry in os.listdir(it):
            path = os.path.join(it, entry)
            if os.path.isdir(path) or os.path.getsize(path) > 0:
                return True
    return False


def _check_run_dir(cfg: SpinConfig) -> None:
    """Refuse to overwrite a run / to resume one with another configuration; record the config.

    A run whose directory holds a config but no stage output (it stopped before doing any work,
    e.g. on bad data) is simply started again with the new configuration. Every rank checks (so
    all raise alike) before rank 0 writes.
    """
    run_dir = cfg.loop.output_dir
    saved = os.path.join(run_dir, "config.yaml")
    started = os.path.exists(saved) and run_has_work(run_dir)
    barrier()
    if started:
        if not cfg.loop.resume:
            raise ConfigError(f"loop.output_dir: {run_dir!r} already holds a run; pass --resume to continue it "
                              f"or choose another --output-dir")
        import yaml

        with open(saved, encoding="utf-8") as f:
            old = _comparable(config_from_dict(yaml.safe_load(f)).to_dict(), os.getcwd())
        new = _comparable(cfg.to_dict(), os.getcwd())
        diff = [f"{s}.{k}" for s in new for k in new[s] if (s, k) not in _FREE_FIELDS and new[s][k] != old[s][k]]
        if diff:
            shown = ", ".join(f"{d} ({old[d.split('.')[0]][d.split('.')[1]]!r} -> "
                              f"{new[d.split('.')[0]][d.split('.')[1]]!r})" for d in diff)
            raise ConfigError(f"--resume: the configuration differs from the run's config.yaml in {shown}")
    elif is_main():
        save_config(cfg, saved)
    barrier()


def iteration_model_dir(run_dir: str, t: int) -> str:
    return os.path.join(run_dir, f"iter{t}", "model")


def run_iterations(cfg: SpinConfig, *, on_iteration_end: IterationHook | None = None,
                   records: list[Record] | None = None) -> list[dict[str, Any]]:
    """``spin-kernels iterate``: ``cfg.loop.iterations`` SPIN iterations from ``cfg.model.model``.

    Everything a user can get wrong (configuration, data, model directory, tokenizer, device,
    output directory, another process on the same run) is checked before the run directory is
    written.

    Args:
        on_iteration_end: called as ``hook(t, model_dir, summary)`` after iteration t; the dict it
            returns is merged into the iteration's summary row (the demo adds its KL there).
        records: the ``{index, prompt, real}`` rows, instead of reading ``cfg.data``.
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
    with session(cfg) as sess, single_writer(os.path.join(cfg.loop.output_dir, LOCK_FILE), "loop.output_dir",
                                                 sess):
        check_impl(cfg.training.impl, sess.device)
        loader = Loader(cfg, sess)
        loader.tokenizer(cfg.model.model)
        _check_run_dir(cfg)
        return _iterate(cfg, loader, on_iteration_end, records)


def _training_rows(cfg: SpinConfig, t: int, generated: list[Record]) -> list[Record]:
    """Iteration t's pairs: its own synthetic responses and, with ``--include-previous K``, those
    of the previous K iterations (each row records the iteration that sampled it)."""
    rows = [dict(r, source_iteration=t) for r in generated]
    for k in range(1, int(cfg.loop.include_previous) + 1):
        if t - k >= 0:
            prev = read_jsonl(os.path.join(cfg.loop.output_dir, f"iter{t - k}", "generated.jsonl"))
            rows += [dict(r, source_iteration=t - k) for r in prev]
    return rows


#: Held-out prompts are sampled from seeds offset from the training ones (other random streams).
HELDOUT_SEED_OFFSET = 1_000_000


class _Files:
    """The paths of iteration t's files."""

    def __init__(self, run_dir: str, t: int):
        self.dir = os.path.join(run_dir, f"iter{t}")
        self.generated = os.path.join(self.dir, "generated.jsonl")
        self.pairs = os.path.join(self.dir, "pairs.jsonl")
        self.heldout_generated = os.path.join(self.dir, "heldout_generated.jsonl")
        self.heldout_pairs = os.path.join(self.dir, "heldout_pairs.jsonl")
        self.heldout_eval = os.path.join(self.dir, "heldout_eval.json")
        self.eval_command = os.path.join(self.dir, "eval_command.json")


def _heldout_key(training_key: str, heldout_pairs: list[Record]) -> str:
    """What a held-out evaluation is made from: the trained model (its training key) and the pairs."""
    return provenance.text_digest(training_key, [(r["prompt"], r["real"], r["synthetic"], r["ref_logps"])
                                                 for r in heldout_pairs])


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _iteration_is_current(cfg: SpinConfig, loader: Loader, t: int, train: list[Record], heldout: list[Record],
                          opponent: str) -> bool:
    """Whether iteration t's files (samples, pairs, model, held-out evaluation) are complete and
    made from the current inputs (no model load)."""
    f = _Files(cfg.loop.output_dir, t)
    key = trained_model_key(f.dir)
    if key is None:
        return False
    seed = cfg.generation.generation_seed + t
    rows = []
    for records, path, s in ((train, f.generated, seed), (heldout, f.heldout_generated, seed + HELDOUT_SEED_OFFSET)):
        if not records:
            continue
        plan = plan_generation(records, path, cfg.generation, max_prompt_length=cfg.data.max_prompt_length,
                               model_path=opponent, model_label=_label(cfg, opponent), seed=s,
                               on_stale=cfg.data.on_stale, tokenizer=loader.tokenizer(opponent))
        if plan.todo:
            return False
        rows.append([plan.done[r["index"]] for r in records])
    pairs = current_pairs(f.pairs, _training_rows(cfg, t, rows[0]), reference_sources(
        _training_rows(cfg, t, rows[0]), opponent, cfg), cfg.data.on_stale)
    if pairs is None:
        return False
    examples = to_examples(loader.tokenizer(opponent), pairs, cfg.data)
    if provenance.training_key(examples, cfg.for_iteration(t), provenance.model_digest(opponent)) != key:
        return False
    if heldout:
        held_rows = [dict(r, source_iteration=t) for r in rows[1]]
        held = current_pairs(f.heldout_pairs, held_rows, reference_sources(held_rows, opponent, cfg),
                             cfg.data.on_stale)
        done = _read_json(f.heldout_eval)
        return held is not None and done is not None and done.get("key") == _heldout_key(key, held)
    return True


def _evaluate_heldout(runner, loader: Loader, cfg: SpinConfig, t: int, pairs: list[Record], key: str,
                      path: str) -> None:
    """Score the held-out pairs with the trained model ``runner`` and write ``heldout_eval.json``."""
    from .evaluation import heldout_metrics

    t_cfg = cfg.for_iteration(t)
    examples = to_examples(loader.tokenizer(cfg.model.model), pairs, cfg.data)
    sums = reference_logps_for(runner, examples, token_budget=t_cfg.token_budget, impl=t_cfg.impl, average=False,
                               share_prompt=t_cfg.share_prompt, autocast=loader.autocast, desc=f"iter{t} held-out")
    if t_cfg.average_log_prob:  # the margin in the convention the reference log-probs were computed in
        policy = [(r / max(1, len(ex.real_ids)), s / max(1, len(ex.synthetic_ids))) for (r, s), ex in
                  zip(sums, examples)]
    else:
        policy = sums
    metrics = heldout_metrics(policy, pairs, t_cfg.beta, [len(ex.real_ids) for ex in examples])
    metrics["heldout/logp_real_per_token"] = sum(r for r, _ in sums) / max(1, sum(len(ex.real_ids)
                                                                                for ex in examples))
    if is_main():
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            json.dump({"key": _heldout_key(key, pairs), **metrics}, fh, indent=1)
        os.replace(path + ".tmp", path)
    barrier()


def _run_iteration(cfg: SpinConfig, loader: Loader, t: int, train: list[Record], heldout: list[Record],
                   opponent: str) -> None:
    """Generate, score, train (and evaluate on the held-out pairs) iteration t; every stage reuses
    what is current."""
    f = _Files(cfg.loop.output_dir, t)
    seed = cfg.generation.generation_seed + t
    tokenizer, model = loader.tokenizer(opponent), loader.runner(opponent)
    generated = stage_generate(model, tokenizer, train, cfg, f.generated, seed=seed, model_path=opponent,
                               desc=f"iter{t} generate")
    held_generated = stage_generate(model, tokenizer, heldout, cfg, f.heldout_generated,
                                    seed=seed + HELDOUT_SEED_OFFSET, model_path=opponent,
                                    desc=f"iter{t} held-out generate") if heldout else []
    model = loader.prepared(model)
    pairs = stage_reference(model, loader, _training_rows(cfg, t, generated), cfg, f.pairs, model_path=opponent,
                            desc=f"iter{t} reference")
    held_pairs = stage_reference(model, loader, [dict(r, source_iteration=t) for r in held_generated], cfg,
                                 f.heldout_pairs, model_path=opponent,
                                 desc=f"iter{t} held-out reference") if heldout else []
    res = train_spin(model, tokenizer, to_examples(tokenizer, pairs, cfg.data), cfg.for_iteration(t), f.dir,
                     resume=cfg.loop.resume, tensorboard=cfg.loop.tensorboard, desc=f"iter{t} train",
                     info={"iteration": t, "opponent": opponent}, start_digest=provenance.model_digest(opponent),
                     on_stale=cfg.data.on_stale, describe=_describe(pairs, f.pairs), autocast=loader.autocast)
    if heldout:
        if not res.trained:  # finished before (killed before its evaluation): the saved model
            del model
            model = loader.prepared(loader.runner(res.model_dir))
        _evaluate_heldout(model, loader, cfg, t, held_pairs, trained_model_key(f.dir), f.heldout_eval)


def _eval_command(cfg: SpinConfig, model_dir: str, path: str) -> dict[str, Any]:
    """``--eval-command`` on the iteration's model, run once per (command, model) on rank 0."""
    from .evaluation import run_eval_command

    stamp = {"command": cfg.loop.eval_command, "model": provenance.model_digest(model_dir)}
    done = _read_json(path)
    if done is not None and {k: done.get(k) for k in stamp} == stamp:
        return {k: v for k, v in done.items() if k.startswith("eval/")}
    result = run_eval_command(cfg.loop.eval_command, model_dir)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({**stamp, **result}, fh, indent=1)
    return result


def _iterate(cfg: SpinConfig, loader: Loader, on_iteration_end: IterationHook | None,
             records: list[Record]) -> list[dict[str, Any]]:
    from .evaluation import split_heldout, synthetic_stats

    run_dir = cfg.loop.output_dir
    if cfg.loop.eval_data:
        train, heldout = records, load_sft_data(dataclasses.replace(cfg.data, data=cfg.loop.eval_data,
                                                                    max_examples=None))
    else:
        train, heldout = split_heldout(records, cfg.loop.eval_fraction, cfg.training.seed)
    summaries: list[dict[str, Any]] = []
    for t in range(cfg.loop.iterations):
        f = _Files(run_dir, t)
        os.makedirs(f.dir, exist_ok=True)
        opponent = cfg.model.model if t == 0 else iteration_model_dir(run_dir, t - 1)
        final = iteration_model_dir(run_dir, t)
        start = time.perf_counter()
        if not _iteration_is_current(cfg, loader, t, train, heldout, opponent):
            _run_iteration(cfg, loader, t, train, heldout, opponent)
        generated = list(read_jsonl(f.generated))
        summary: dict[str, Any] = {"iteration": t, **summarise_iteration(read_metrics(
            os.path.join(f.dir, "metrics.jsonl"))),
            **synthetic_stats(generated, loader.tokenizer(opponent)),
            "seconds": round(time.perf_counter() - start, 1)}
        if heldout:
            summary.update({k: v for k, v in (_read_json(f.heldout_eval) or {}).items() if k != "key"})
        stop = cfg.loop.stop_below_accuracy
        if stop is not None and summary["heldout/accuracy"] < stop:
            summary["stopped"] = (f"held-out accuracy {summary['heldout/accuracy']:.3f} < {stop:g} "
                                  f"(--stop-below-accuracy): the model no longer tells its own samples from the "
                                  f"data; the loop ends after iteration {t}")
        if is_main():  # the hook, the eval command, the summary files and the table: rank 0 only
            if cfg.loop.eval_command:
                summary.update(_eval_command(cfg, final, f.eval_command))
            if on_iteration_end is not None:
                summary.update(on_iteration_end(t, final, summary) or {})
            summaries.append(summary)
            write_summary(run_dir, summaries)
            print(f"\nSPIN after iteration {t} ({run_dir}):")
            print(format_table(summaries, [c for c in summaries[-1] if c != "stopped"]))
            if "stopped" in summary:
                print(summary["stopped"])
        else:
            summaries.append(summary)
        barrier()
        if "stopped" in summary:
            break
    return summaries


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
