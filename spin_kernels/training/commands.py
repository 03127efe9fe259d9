"""The CLI's single-stage commands: plan one stage, run it.

    spin-kernels generate  --model M --data data.jsonl --output generated.jsonl
    spin-kernels reference --model M --input generated.jsonl --output pairs.jsonl
    spin-kernels train     --model M --input pairs.jsonl --output-dir out

Each checks what a user can get wrong (configuration, input file, model directory, output
path, another process on the same output) before it writes, then plans its stage
(spin_kernels.training.stages) and runs what is left: an output that is already current is
returned as it is, without loading a model.
"""

from __future__ import annotations

import os
import sys

from . import provenance
from .config import SCHEDULED, ConfigError, SpinConfig
from .data import Record, load_sft_data, read_stage_rows
from .loading import Loader, check_impl
from .reference import check_rows_fit
from .parallel import is_main, session
from .rundir import LOCK_FILE, check_output_dir, check_output_file, single_writer
from .stages import Models, generate, reference, train


def run_generate(cfg: SpinConfig, output: str) -> list[Record]:
    """``spin-kernels generate``: sample synthetic responses for the data's prompts with ``model``."""
    cfg.validate(need=("model.model", "data.data"))
    cfg.check_generation_fits()
    check_output_file(output, inputs={"--data": cfg.data.data})
    records = load_sft_data(cfg.data)
    with session(cfg) as sess, single_writer(f"{output}.lock", "--output", sess):
        loader = Loader(cfg, sess)
        model_path = loader.check(cfg.model.model)
        plan = generate.plan(cfg, records, output, model_path=model_path, seed=cfg.generation.generation_seed,
                             tokenizer=loader.tokenizer(model_path))
        return generate.run(plan, loader)


def run_reference(cfg: SpinConfig, inp: str, output: str) -> list[Record]:
    """``spin-kernels reference``: add the model's ref_logps to generated rows."""
    cfg.validate(need=("model.model",))
    rows = read_stage_rows(inp, ("prompt", "real", "synthetic"), "--input")
    check_output_file(output, inputs={"--input": inp})
    with session(cfg) as sess, single_writer(f"{output}.lock", "--output", sess):
        check_impl(cfg.training.impl, sess.device)
        loader = Loader(cfg, sess)
        model_path = loader.check(cfg.model.model)
        _check_sampled_with(rows, cfg, model_path, "--input")
        tokenizer = loader.tokenizer(model_path)
        check_rows_fit([dict(r, index=r.get("index", n)) for n, r in enumerate(rows)], tokenizer, cfg)
        return reference.run(reference.plan(cfg, rows, output, model_path=model_path, tokenizer=tokenizer), loader)


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
    recomputed = os.path.join(out_dir, "pairs.jsonl")
    check_output_file(recomputed, "--output-dir", inputs={"--input": inp})
    with session(cfg) as sess, single_writer(os.path.join(out_dir, LOCK_FILE), "loop.output_dir", sess):
        if not cfg.loop.resume and any(os.path.exists(os.path.join(out_dir, d)) for d in ("model", "checkpoints")):
            raise ConfigError(f"loop.output_dir: {out_dir!r} already holds a training run; pass --resume to continue "
                              f"it or choose another --output-dir")
        check_impl(cfg.training.impl, sess.device)
        loader = Loader(cfg, sess)
        model_path = loader.check(cfg.model.model)
        tokenizer = loader.tokenizer(model_path)
        check_rows_fit([dict(r, index=r.get("index", n)) for n, r in enumerate(rows)], tokenizer, cfg)
        recompute = _check_reference_settings(rows, cfg, model_path, tokenizer, inp)
        models = Models(loader)
        if recompute:
            body = [{k: v for k, v in r.items() if k not in ("ref_logps", "reference")} for r in rows]
            rows = reference.run(reference.plan(cfg, body, recomputed, model_path=model_path, tokenizer=tokenizer),
                                 loader, models)
        plan = train.plan(cfg, rows, out_dir, start_model=model_path, tokenizer=tokenizer, pairs_path=inp,
                          info={"start_model": model_path})
        return train.run(plan, loader, models).model_dir


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


def _check_reference_settings(rows: list[Record], cfg: SpinConfig, model_path: str, tokenizer, inp: str) -> bool:
    """Whether the pairs' ref_logps must be recomputed: they were computed by another model or
    tokenizer than training's own (``--model``, ``--tokenizer``: in SPIN the reference is the
    starting model) or with other length limits (or averaging) than training uses. Recomputed
    with training's model when ``on_stale`` allows, else a ConfigError naming the difference."""
    want = {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length,
            "average_log_prob": cfg.training.average_log_prob}
    stamp = provenance.model_stamp(model_path)
    tok = provenance.tokenizer_digest(tokenizer)
    unrecorded = 0
    for n, row in enumerate(rows):
        ref = row.get("reference")
        if not isinstance(ref, dict):
            unrecorded += 1
            continue
        diff = [f"{k} {ref.get(k)} (training: {v})" for k, v in want.items() if ref.get(k) != v]
        if provenance.differences({"m": ref.get("model")}, {"m": stamp}) is not None:
            where = ref["model"].get("path") if isinstance(ref.get("model"), dict) else ref.get("model")
            diff.append(f"the model {where!r} (training starts from {model_path!r}, other weights)")
        if ref.get("tokenizer") != tok:
            diff.append("another tokenizer (vocabulary, special tokens or chat template) than training's"
                        if ref.get("tokenizer") is not None else "a tokenizer it does not record")
        if not diff:
            continue
        shown = ", ".join(diff)
        if cfg.data.on_stale == "regenerate":
            if is_main():
                print(f"spin-kernels: warning: --input {inp}: line {n + 1}: ref_logps were computed with {shown}; "
                      f"they are recomputed with {model_path!r} and training's tokenizer and lengths",
                      file=sys.stderr)
            return True
        raise ConfigError(f"--input: {inp}:{n + 1}: ref_logps were computed with {shown}; the reference log-probs "
                          f"must score the same token sequences with the model training starts from. Recompute "
                          f"them with spin-kernels reference, or rerun with --on-stale regenerate")
    if unrecorded and is_main():
        print(f"spin-kernels: note: {unrecorded} row(s) of {inp} do not record how their ref_logps were computed; "
              f"they are used as given", file=sys.stderr)
    return False
