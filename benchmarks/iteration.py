"""The iteration suite: one whole SPIN iteration, and where its time goes.

``python -m benchmarks run --suite iteration --device cpu`` runs ``spin-kernels iterate`` for one
iteration (``spin_kernels.training.run_iterations``: generate, reference, train, export) on the
UltraChat sample (all 154 prompts, the offline BPE tokenizer) with a ~10M-parameter Llama
(``MODEL``: H 384, 4 layers, 6 heads / 2 KV heads, intermediate 1,024, vocabulary 4,096: 9.6M
parameters) that first gets a short SFT on the same sample (``sft_model``: AdamW, cached in the
work directory), so that it ends its responses at varied lengths as a real opponent does.

Each stage is timed by wrapping the functions the loop's stages call (``stages.generate``'s
``sample_plan``, ``stages.reference.run``, ``stages.train``'s ``train_spin``) for the run: wall
seconds, process CPU seconds,
share of the iteration's wall time, and tokens/s (generate: sampled tokens; reference: tokens of
the packed real and synthetic sequences scored; train: the tokens of every optimizer step's
global batch, as metrics.jsonl counts them). "other" is the rest of the iteration (loading,
weight digests, checks, the export). Cases (``--iteration-cases``) differ only in their
generation options: ``before`` is the original sampler (transformers generate, file order,
batches of 16, batch seeds: ``--generation-seeding batch``), ``after`` the default sampler
(continuous batching, sorted prompts, per-example seeds, 64 slots on CPU) (``GENERATION``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

#: The ~10M-parameter Llama (vocabulary: the sample tokenizer's 4,096).
MODEL = {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 6,
         "num_key_value_heads": 2, "max_position_embeddings": 1024, "tie_word_embeddings": False}
#: The short SFT that makes it a plausible opponent (it learns where responses end).
SFT = {"steps": 40, "batch_size": 8, "lr": 1e-3, "warmup_steps": 5, "max_prompt_length": 128, "max_length": 512,
       "seed": 0}
#: The generation options of each case.
GENERATION: dict[str, dict[str, Any]] = {
    "before": {"generation_seeding": "batch"},
    "after": {"generation_batch_size": 64},  # the defaults, with the CPU's slot count named
}
#: The iteration: the paper's sampling (256 new tokens, temperature 1), lengths for a 512-token model.
SETTINGS = {"data": {"max_length": 512, "max_prompt_length": 256},
            "generation": {"max_new_tokens": 256},
            "training": {"epochs": 1, "global_batch_pairs": 64, "token_budget": 4096, "save_every": 0},
            "model": {"device": "cpu"}, "loop": {"iterations": 1}}


def default_work_dir() -> Path:
    return Path(os.environ.get("SPIN_BENCH_WORK") or Path(tempfile.gettempdir()) / "spin_kernels_bench")


def records(limit: int | None = None) -> list[dict]:
    from spin_kernels.packing import load_ultrachat_sample

    rows = load_ultrachat_sample()[:limit]
    return [{"index": i, "prompt": r["prompt"], "real": r["real"]} for i, r in enumerate(rows)]


def sft_model(work_dir: Path, *, model: dict | None = None, sft: dict | None = None) -> str:
    """The SFT'd Llama's directory (weights + tokenizer), trained once per (model, SFT) settings
    and kept in ``work_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from spin_kernels.demo.sft import sft_train
    from spin_kernels.packing import sample_tokenizer

    model, sft = model or MODEL, sft or SFT
    key = hashlib.sha256(json.dumps([model, sft], sort_keys=True).encode()).hexdigest()[:12]
    path = Path(work_dir) / f"sft-llama-{key}"
    if (path / "done.json").exists():
        return str(path)
    tok = sample_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None, **model)
    torch.manual_seed(sft["seed"])
    llm = LlamaForCausalLM(config)
    t0 = time.perf_counter()
    losses = sft_train(llm, tok, records(), **{k: v for k, v in sft.items()})
    llm.generation_config.pad_token_id = tok.pad_token_id
    llm.save_pretrained(path)
    tok.save_pretrained(path)
    params = sum(p.numel() for p in llm.parameters())
    (path / "done.json").write_text(json.dumps({"model": model, "sft": sft, "params": params, "losses": losses,
                                                "seconds": time.perf_counter() - t0}))
    return str(path)


def model_info(path: str) -> dict:
    return json.loads((Path(path) / "done.json").read_text())


@contextlib.contextmanager
def timed_stages(out: dict[str, dict]):
    """Wrap the work of the loop's stages so that each call adds its wall/CPU seconds (and what it
    produced) to ``out[stage]`` (loading the model stays in "other")."""
    from spin_kernels.training.stages import generate, reference, train

    targets = {"generate": (generate, "sample_plan"), "reference": (reference, "run"), "train": (train, "train_spin")}
    originals = {stage: getattr(module, name) for stage, (module, name) in targets.items()}

    def wrap(stage, fn):
        def run(*args, **kwargs):
            w0, c0 = time.perf_counter(), time.process_time()
            result = fn(*args, **kwargs)
            entry = out.setdefault(stage, {"wall_s": 0.0, "cpu_s": 0.0, "calls": 0})
            entry["wall_s"] += time.perf_counter() - w0
            entry["cpu_s"] += time.process_time() - c0
            entry["calls"] += 1
            entry["result"] = result
            return result
        return run

    for stage, (module, name) in targets.items():
        setattr(module, name, wrap(stage, originals[stage]))
    try:
        yield
    finally:
        for stage, (module, name) in targets.items():
            setattr(module, name, originals[stage])


def run_case(name: str, model_dir: str, rows: list[dict], run_dir: Path, *, max_new_tokens: int | None = None
             ) -> dict:
    """One SPIN iteration with case ``name``'s generation options; the split of its wall time."""
    from spin_kernels.packing import sample_tokenizer
    from spin_kernels.training import config_from_dict, run_iterations
    from spin_kernels.training.reference import to_examples

    settings = json.loads(json.dumps(SETTINGS))
    settings["generation"].update(GENERATION[name])
    if max_new_tokens is not None:
        settings["generation"]["max_new_tokens"] = max_new_tokens
    settings["model"]["model"] = model_dir
    settings["loop"]["output_dir"] = str(run_dir)
    cfg = config_from_dict(settings)
    stages: dict[str, dict] = {}
    w0, c0 = time.perf_counter(), time.process_time()
    with timed_stages(stages):
        run_iterations(cfg, records=rows)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    generated = stages["generate"].pop("result")
    pairs = stages["reference"].pop("result")
    stages["train"].pop("result")
    examples = to_examples(sample_tokenizer(), pairs, cfg.data)
    with open(run_dir / "iter0" / "metrics.jsonl") as f:
        steps = [json.loads(line) for line in f]
    stages["generate"].update(tokens=sum(r["synthetic_tokens"] for r in generated), prompts=len(generated),
                              finished=sum(bool(r["finished"]) for r in generated))
    stages["reference"].update(tokens=sum(ex.num_tokens for ex in examples), pairs=len(pairs))
    stages["train"].update(tokens=sum(s["tokens"] for s in steps), steps=len(steps))
    stages["other"] = {"wall_s": wall - sum(s["wall_s"] for s in stages.values()),
                       "cpu_s": cpu - sum(s["cpu_s"] for s in stages.values())}
    for s in stages.values():
        s["share"] = s["wall_s"] / wall
        if "tokens" in s:
            s["tokens_per_s"] = s["tokens"] / s["wall_s"]
    return {"case": name, "status": "ok", "generation": dataclasses.asdict(cfg.generation.in_force()), "wall_s": wall,
            "cpu_s": cpu, "stages": stages}


def run_suite(device: torch.device, names: list[str] | None, *, work_dir: Path | None = None,
              prompts: int | None = None, max_new_tokens: int | None = None, sft_steps: int | None = None
              ) -> tuple[list[dict], list[str], dict]:
    """Every case in ``names`` (default: before, after), in that order, in fresh run directories.

    Returns (cases, notes, info) where info describes the model and the data."""
    if device.type != "cpu":
        raise ValueError("the iteration suite runs on CPU (its GPU form is not written yet)")
    work = Path(work_dir or default_work_dir())
    sft = dict(SFT, steps=sft_steps) if sft_steps is not None else SFT
    t0 = time.perf_counter()
    model_dir = sft_model(work, sft=sft)
    info = {"model": {**MODEL, "params": model_info(model_dir)["params"], "sft": sft,
                      "sft_final_loss": model_info(model_dir)["losses"][-1]},
            "model_dir_seconds": time.perf_counter() - t0, "settings": SETTINGS,
            "max_new_tokens": max_new_tokens or SETTINGS["generation"]["max_new_tokens"]}
    rows = records(prompts)
    info["prompts"] = len(rows)
    cases = []
    for name in names or list(GENERATION):
        run_dir = Path(tempfile.mkdtemp(prefix=f"iteration-{name}-", dir=work))
        load = os.getloadavg()
        try:
            case = run_case(name, model_dir, rows, run_dir, max_new_tokens=max_new_tokens)
        except Exception as exc:  # noqa: BLE001 - recorded, the other cases still run
            case = {"case": name, "status": "error", "note": f"{type(exc).__name__}: {exc}"}
        case["loadavg_before"], case["loadavg_after"] = load, os.getloadavg()
        cases.append(case)
        print(f"[iteration] {name}: {case.get('wall_s', float('nan')):.1f} s "
              + ", ".join(f"{k} {v['share']:.0%}" for k, v in case.get("stages", {}).items()), flush=True)
    notes = [f"Model: Llama {MODEL['hidden_size']}/{MODEL['num_hidden_layers']} layers, "
             f"{info['model']['params'] / 1e6:.1f}M parameters, after {sft['steps']} SFT steps on the sample "
             f"(final loss {info['model']['sft_final_loss']:.2f}); data: the UltraChat sample ({len(rows)} prompts); "
             f"1 iteration, {SETTINGS['training']['epochs']} epoch, global batch "
             f"{SETTINGS['training']['global_batch_pairs']} pairs, token budget {SETTINGS['training']['token_budget']}."]
    return cases, notes, info


def _fmt(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def markdown(record: dict) -> str:
    from .report import header

    lines = header(record)
    info = record.get("info", {})
    lines += [f"Prompts: {info.get('prompts')}, max new tokens {info.get('max_new_tokens')}. Load average "
              "(1/5/15 min) before and after each case is in the table: the machine may be shared.", ""]
    for case in record["cases"]:
        lines.append(f"## {case['case']}")
        lines.append("")
        if case["status"] != "ok":
            lines += [f"error: {case.get('note')}", ""]
            continue
        g = {k: ("auto" if v is None else v) for k, v in case["generation"].items()}  # older records: unset
        lines.append(f"Generation: backend {g['backend']}, order {g['generation_order']}, batch "
                     f"{g['generation_batch_size']}, token budget {g['generation_token_budget'] or 'none'}, seeding "
                     f"{g['generation_seeding']}. Iteration: {case['wall_s']:.1f} s wall, {case['cpu_s']:.1f} s CPU; "
                     f"load {' / '.join(f'{x:.1f}' for x in case['loadavg_before'])} before, "
                     f"{' / '.join(f'{x:.1f}' for x in case['loadavg_after'])} after.")
        lines += ["", "| stage | wall | share | CPU | tokens | tokens/s | notes |", "|---|---|---|---|---|---|---|"]
        for stage, s in case["stages"].items():
            note = ""
            if stage == "generate":
                note = (f"{s['prompts']} prompts ({s['prompts'] / s['wall_s']:.2f}/s), {s['finished']} ended by "
                        f"EOS, mean {s['tokens'] / max(1, s['prompts']):.0f} tokens")
            elif stage == "reference":
                note = f"{s['pairs']} pairs"
            elif stage == "train":
                note = f"{s['steps']} optimizer steps"
            lines.append(f"| {stage} | {s['wall_s']:.1f} s | {s['share']:.0%} | {s['cpu_s']:.1f} s | "
                         f"{s.get('tokens', '') if 'tokens' in s else ''} | {_fmt(s.get('tokens_per_s'))} | {note} |")
        lines.append("")
    ok = {c["case"]: c for c in record["cases"] if c["status"] == "ok"}
    if "before" in ok and "after" in ok:
        b, a = ok["before"], ok["after"]
        lines.append(f"**before → after**: iteration {b['wall_s']:.1f} s → {a['wall_s']:.1f} s "
                     f"({b['wall_s'] / a['wall_s']:.2f}×); generation {b['stages']['generate']['wall_s']:.1f} s → "
                     f"{a['stages']['generate']['wall_s']:.1f} s ({b['stages']['generate']['wall_s'] / a['stages']['generate']['wall_s']:.2f}×), "
                     f"its share {b['stages']['generate']['share']:.0%} → {a['stages']['generate']['share']:.0%}.")
        lines.append("")
    return "\n".join(lines)
