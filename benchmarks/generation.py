"""The generation suite: the opponent's sampling stage, the original sampler against the new ways.

``python -m benchmarks run --suite generation --device cpu`` times
``spin_kernels.training.generate_synthetic`` (the stage the loop runs, writing its JSONL) on the
same prompts with the same sampling distribution (temperature 1, top_p 1, no top_k) under each
contender's generation options:

* ``hf``: the original sampler (``generation_seeding=batch``): transformers ``generate`` on
  left-padded batches of 16 prompts in file order, each batch seeded from (seed, batch number);
* ``hf-sorted``: the same ``generate``, prompts sorted by length into batches of up to 64 under a
  token budget, one random stream per prompt (``backend=hf``, per-example seeds);
* ``continuous-N``: continuous batching with N slots, prompts sorted (the default sampler; its
  slot count unset is chosen for the device: 64 on CPU);
* ``transformers-cb``: for reference, transformers' own continuous batching
  (``model.generate_batch``, paged attention) on all prompts at once; not a backend of the
  stage: its requests share one global RNG in a background thread, so a prompt's sample depends
  on the schedule and a run cannot be resumed to the same rows.

Cases (``--generation-cases``): ``cli`` (whole ``spin-kernels generate`` processes at the default
flags against the original sampler's one flag, ``--generation-seeding batch``, on 384 prompts: the
UltraChat sample repeated, every copy its own index and so its own seed; the SFT'd Llama below;
the processes alternate, and the figure is the median over rounds of each round's ratio, which
a shared machine disturbs least), ``ultrachat-sft`` (the iteration suite's ~10M-parameter Llama after
its short SFT on the UltraChat sample: responses end at varied lengths; 154 prompts),
``ultrachat-random`` (the same Llama with random weights: no response ends before
max_new_tokens, the case where continuous batching has nothing to gain), ``demo`` (the embedded
demo's 77k-parameter model after ``DemoConfig.sft_steps`` SFT steps without the demo's early
stopping, so a little more trained than the demo's start; its 256 prompts: short, varied responses).

Contenders run in alternation, ``repeats`` rounds (default 2), after one warm-up of each on a
few prompts; a contender's figure is its fastest round (wall and process CPU seconds are both
recorded). The rows of the per-example contenders must be identical (same streams), which the
table checks; the original sampler's rows are other samples of the same distribution (its mean
response length is shown next to theirs).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .iteration import default_work_dir, records, sft_model

def _contenders(batch: int, sorted_batch: int, budget: int, slots: tuple[int, ...]) -> dict[str, dict | None]:
    return {
        "hf": {"generation_seeding": "batch", **({"generation_batch_size": batch} if batch != 16 else {})},
        "hf-sorted": {"backend": "hf", "generation_order": "length", "generation_batch_size": sorted_batch,
                      "generation_token_budget": budget},
        **{f"continuous-{n}": {"backend": "continuous", "generation_order": "length", "generation_batch_size": n}
           for n in slots},
        "transformers-cb": None,  # model.generate_batch, outside the stage
    }


#: Each case: its sampling lengths, prompts, and its contenders' options (the hf contender is the
#: original sampler, or, for the demo, what the demo ran with it: batches of 128).
CASES: dict[str, dict[str, Any]] = {
    "ultrachat-sft": {"max_new_tokens": 256, "max_prompt_length": 256,
                      "contenders": _contenders(16, 64, 64 * 384, (16, 32, 64, 128))},
    "ultrachat-random": {"max_new_tokens": 64, "max_prompt_length": 256, "prompts": 64,
                         "contenders": _contenders(16, 64, 64 * 192, (16, 32, 64))},
    "demo": {"max_new_tokens": 24, "max_prompt_length": 8, "contenders": _contenders(128, 256, 256 * 32, (128, 256))},
}
REFERENCE = "hf"
#: The whole-process case: ``spin-kernels generate`` at its defaults (and the CLI's lengths: prompts
#: up to 512 tokens, 256 new tokens) against the original sampler's one flag.
CLI = {"prompts": 384, "contenders": {"original": ["--generation-seeding", "batch"], "default": []}}


def _case_inputs(case: str, work: Path):
    """(model directory, records) of a case."""
    if case == "demo":
        return _demo_model(work)
    if case == "ultrachat-sft":
        return sft_model(work), records(CASES[case].get("prompts"))
    if case == "ultrachat-random":
        return _random_model(work), records(CASES[case].get("prompts"))
    raise ValueError(f"unknown generation case {case!r}; known: {', '.join(CASES)}")


def _random_model(work: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from spin_kernels.packing import sample_tokenizer

    from .iteration import MODEL

    path = work / "random-llama"
    if not (path / "model.safetensors").exists():
        tok = sample_tokenizer()
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                     bos_token_id=None, **MODEL)).save_pretrained(path)
        tok.save_pretrained(path)
    return str(path)


def _demo_model(work: Path):
    """The demo's model after ``sft_steps`` SFT steps (the demo itself stops earlier, on
    validation) and its 256 training prompts."""
    from spin_kernels.demo.run import DemoConfig
    from spin_kernels.demo.sft import sft_train
    from spin_kernels.demo.task import MarkovTask
    from spin_kernels.demo.tiny import demo_tokenizer, tiny_llama

    demo = DemoConfig()
    path = work / "demo-sft"
    task = MarkovTask(num_chains=demo.num_chains, alphabet=demo.alphabet, concentration=demo.concentration,
                      stop_prob=demo.stop_prob, max_len=demo.max_len, seed=demo.task_seed)
    rows = task.sample(demo.train_examples, seed=demo.task_seed + 1)
    if not (path / "model.safetensors").exists():
        tok = demo_tokenizer(task.alphabet)
        model = tiny_llama(len(tok), hidden_size=demo.hidden_size, intermediate_size=2 * demo.hidden_size,
                           max_positions=256, seed=demo.task_seed)
        sft_train(model, tok, rows, steps=demo.sft_steps, batch_size=demo.sft_batch, lr=demo.sft_lr,
                  seed=demo.task_seed)
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return str(path), [dict(r, index=i) for i, r in enumerate(rows)]


def _generation_config(case: str, options: dict[str, Any]):
    from spin_kernels.training.config import SamplingOptions

    return SamplingOptions(max_new_tokens=CASES[case]["max_new_tokens"], **options)


def _run_stage(model, tok, rows, cfg, model_dir: str, max_prompt_length: int, out: Path) -> tuple[float, float, list]:
    from spin_kernels.training import generate_synthetic

    if out.exists():
        out.unlink()
    w0, c0 = time.perf_counter(), time.process_time()
    got = generate_synthetic(model, tok, rows, cfg, str(out), max_prompt_length=max_prompt_length, seed=1234,
                             model_path=model_dir, desc="bench")
    return time.perf_counter() - w0, time.process_time() - c0, got


def _run_transformers_cb(model, tok, rows, cfg, max_prompt_length: int) -> tuple[float, float, list]:
    from transformers import GenerationConfig

    from spin_kernels.packing import tokenize_prompt

    prompts = [tokenize_prompt(tok, r["prompt"], max_prompt_length=max_prompt_length) for r in rows]
    gen = GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                           max_new_tokens=cfg.max_new_tokens, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    torch.manual_seed(1234)
    w0, c0 = time.perf_counter(), time.process_time()
    out = model.generate_batch(prompts, generation_config=gen, progress_bar=False)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    got = []
    for o in out.values():
        tokens = list(o.generated_tokens)
        finished = tok.eos_token_id in tokens
        got.append({"synthetic_tokens": tokens.index(tok.eos_token_id) if finished else len(tokens),
                    "finished": finished, "synthetic": None})
    return wall, cpu, got


def run_case(case: str, work: Path, *, repeats: int, only: list[str] | None) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, rows = _case_inputs(case, work)
    prompt_limit = CASES[case]["max_prompt_length"]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    contenders = CASES[case]["contenders"]
    names = [n for n in contenders if only is None or n == REFERENCE or any(n.startswith(o) for o in only)]
    scratch = Path(tempfile.mkdtemp(prefix=f"generation-{case}-", dir=work))
    results: dict[str, dict] = {n: {"wall_s": [], "cpu_s": []} for n in names}

    def once(name: str, subset: list[dict]):
        options = contenders[name]
        if options is None:
            return _run_transformers_cb(model, tok, subset, _generation_config(case, {}), prompt_limit)
        return _run_stage(model, tok, subset, _generation_config(case, options), model_dir, prompt_limit,
                          scratch / f"{name}.jsonl")

    for name in names:  # warm-up: first calls, allocator, oneDNN kernels
        try:
            once(name, rows[:4])
        except Exception as exc:  # noqa: BLE001 - recorded as the contender's status
            results[name]["error"] = f"{type(exc).__name__}: {exc}"
    for _ in range(repeats):
        for name in names:
            if "error" in results[name]:
                continue
            try:
                wall, cpu, got = once(name, rows)
            except Exception as exc:  # noqa: BLE001
                results[name]["error"] = f"{type(exc).__name__}: {exc}"
                continue
            results[name]["wall_s"].append(wall)
            results[name]["cpu_s"].append(cpu)
            results[name]["rows"] = got
    out = []
    for name in names:
        r = results[name]
        entry = {"case": case, "contender": name, "options": contenders[name], "prompts": len(rows),
                 "max_new_tokens": CASES[case]["max_new_tokens"], "status": "error" if "error" in r else "ok"}
        if "error" in r:
            entry["note"] = r["error"]
            out.append(entry)
            continue
        got = r.pop("rows")
        tokens = sum(g["synthetic_tokens"] for g in got)
        best = min(r["wall_s"])
        entry.update(wall_s=r["wall_s"], cpu_s=r["cpu_s"], best_wall_s=best, best_cpu_s=min(r["cpu_s"]),
                     prompts_per_s=len(rows) / best, tokens=tokens, tokens_per_s=tokens / best,
                     finished=sum(bool(g["finished"]) for g in got),
                     mean_tokens=tokens / len(got), sd_tokens=statistics.pstdev(g["synthetic_tokens"] for g in got),
                     rows_digest=_digest([(g["synthetic"], g["finished"]) for g in got]) if got[0]["synthetic"]
                     is not None else None)
        out.append(entry)
    ref = next((e for e in out if e["contender"] == REFERENCE and e["status"] == "ok"), None)
    for e in out:
        if ref is not None and e["status"] == "ok":
            e["speedup"] = ref["best_wall_s"] / e["best_wall_s"]
    model_params = sum(p.numel() for p in model.parameters())
    for e in out:
        e["model_params"] = model_params
    return out


def run_cli_case(work: Path, *, repeats: int) -> list[dict]:
    """``CLI``: whole processes, ``repeats`` rounds of original, default; per round the ratio
    original wall / default wall, and its median."""
    import json
    import subprocess
    import sys

    model_dir = sft_model(work)
    rows = records()
    data = work / f"ultrachat-{CLI['prompts']}.jsonl"
    data.write_text("".join(json.dumps({"prompt": rows[i % len(rows)]["prompt"], "real": rows[i % len(rows)]["real"]})
                            + "\n" for i in range(CLI["prompts"])))
    import resource

    walls: dict[str, list[float]] = {n: [] for n in CLI["contenders"]}
    cpus: dict[str, list[float]] = {n: [] for n in CLI["contenders"]}
    loads: dict[str, list[float]] = {n: [] for n in CLI["contenders"]}
    got: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for name, flags in CLI["contenders"].items():
            out = work / f"cli-{name}.jsonl"
            out.unlink(missing_ok=True)
            loads[name].append(os.getloadavg()[0])
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "spin_kernels.cli", "generate", "--model", model_dir, "--data",
                            str(data), "--output", str(out), *flags], check=True, capture_output=True,
                           env=dict(os.environ, TQDM_DISABLE="1"))
            walls[name].append(time.perf_counter() - t0)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus[name].append(after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime)
            got[name] = [json.loads(line) for line in out.read_text().splitlines()]
            print(f"[generation] cli round {len(walls[name])} {name}: {walls[name][-1]:.1f} s wall, "
                  f"{cpus[name][-1]:.1f} s CPU, load {loads[name][-1]:.1f} before", flush=True)
    ratios = [a / b for a, b in zip(walls["original"], walls["default"])]
    cpu_ratios = [a / b for a, b in zip(cpus["original"], cpus["default"])]
    out = []
    for name, flags in CLI["contenders"].items():
        tokens = sum(g["synthetic_tokens"] for g in got[name])
        median = statistics.median(walls[name])
        out.append({"case": "cli", "contender": name, "options": {"flags": " ".join(flags) or "(defaults)"},
                    "status": "ok", "prompts": CLI["prompts"], "max_new_tokens": 256, "wall_s": walls[name],
                    "cpu_s": cpus[name], "median_cpu_s": statistics.median(cpus[name]),
                    "loadavg_1min": loads[name], "median_wall_s": median, "prompts_per_s": CLI["prompts"] / median,
                    "tokens": tokens, "finished": sum(bool(g["finished"]) for g in got[name]),
                    "mean_tokens": tokens / len(got[name]), "sampling": got[name][0]["source"]["sampling"],
                    **({"ratios": ratios, "speedup": statistics.median(ratios), "cpu_ratios": cpu_ratios,
                        "cpu_speedup": statistics.median(cpu_ratios)} if name == "default" else {})})
    return out


def _digest(rows) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def run_suite(device: torch.device, names: list[str] | None, *, repeats: int = 2, only: list[str] | None = None,
              work_dir: Path | None = None) -> tuple[list[dict], list[str]]:
    if device.type != "cpu":
        raise ValueError("the generation suite runs on CPU here (vLLM, the GPU sampler, cannot be installed)")
    work = Path(work_dir or default_work_dir())
    work.mkdir(parents=True, exist_ok=True)
    cases = []
    for case in names or list(CASES):
        load = os.getloadavg()
        try:
            got = run_cli_case(work, repeats=repeats) if case == "cli" else run_case(case, work, repeats=repeats,
                                                                                        only=only)
        except Exception as exc:  # noqa: BLE001
            got = [{"case": case, "contender": "*", "status": "error", "note": f"{type(exc).__name__}: {exc}"}]
        for e in got:
            e["loadavg_before"], e["loadavg_after"] = load, os.getloadavg()
            wall = e.get("best_wall_s", e.get("median_wall_s"))
            print(f"[generation] {case} {e['contender']}: "
                  + (f"{wall:.1f} s, {e['prompts_per_s']:.2f} prompts/s, x{e.get('speedup', 0):.2f}"
                     if e["status"] == "ok" else e["note"]), flush=True)
        cases += got
    notes = ["Same prompts and sampling distribution for every contender (temperature 1, top_p 1, no top_k); "
             "figures: the fastest of the timed rounds; speed-up: the original sampler's (hf) time / this one's.",
             "Per-example contenders (hf-sorted, continuous-*) sample the same rows (same streams): their rows "
             "digests must agree."]
    return cases, notes


def markdown(record: dict) -> str:
    from .report import header

    lines = header(record)
    by_case: dict[str, list[dict]] = {}
    for e in record["cases"]:
        by_case.setdefault(e["case"], []).append(e)
    for case, entries in by_case.items():
        if case == "cli" and all(e["status"] == "ok" for e in entries):
            lines += _cli_markdown(entries)
            continue
        ok = [e for e in entries if e["status"] == "ok"]
        first = ok[0] if ok else entries[0]
        lines += [f"## {case}", ""]
        if ok:
            load = first["loadavg_before"]
            lines.append(f"{first['prompts']} prompts, max {first['max_new_tokens']} new tokens, model "
                         f"{first['model_params'] / 1e6:.2f}M parameters; load average before the case "
                         f"{' / '.join(f'{x:.1f}' for x in load)}.")
            lines.append("")
        lines += ["| contender | options | best wall | CPU | prompts/s | tokens/s | speed-up vs hf | ended by EOS | "
                  "mean ± sd tokens | rows |", "|---|---|---|---|---|---|---|---|---|---|"]
        digests = {e["rows_digest"] for e in ok if e["contender"] != REFERENCE and e.get("rows_digest")}
        for e in entries:
            opts = "transformers generate_batch" if e.get("options") is None and e["contender"] != "*" else \
                ", ".join(f"{k}={v}" for k, v in (e.get("options") or {}).items()) or "defaults"
            if e["status"] != "ok":
                lines.append(f"| {e['contender']} | {opts} | error: {e['note']} | | | | | | | |")
                continue
            rows = e["rows_digest"] or "n/a"
            if e["contender"] != REFERENCE and e.get("rows_digest") and len(digests) == 1:
                rows += " (= other per-example)"
            lines.append(f"| {e['contender']} | {opts} | {e['best_wall_s']:.1f} s | {e['best_cpu_s']:.1f} s | "
                         f"{e['prompts_per_s']:.2f} | {e['tokens_per_s']:.0f} | {e.get('speedup', 0):.2f}× | "
                         f"{e['finished']}/{e['prompts']} | {e['mean_tokens']:.0f} ± {e['sd_tokens']:.0f} | {rows} |")
        lines.append("")
    return "\n".join(lines)


def _cli_markdown(entries: list[dict]) -> list[str]:
    first = entries[0]
    lines = ["## cli: whole `spin-kernels generate` processes", "",
             f"{first['prompts']} prompts (the UltraChat sample repeated), the CLI's lengths (prompts cut to 512 "
             f"tokens, 256 new tokens), the SFT'd 9.4M Llama; {len(first['wall_s'])} rounds, the processes "
             "alternating; figure: the median over rounds.", "",
             "| contender | flags | wall per round | load (1 min) before each | median wall | prompts/s | median CPU | "
             "ended by EOS | mean tokens | recorded sampling | speed-up: wall, CPU (median of the rounds' ratios) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        sampling = ", ".join(f"{k} {v}" for k, v in e["sampling"].items() if k not in ("temperature", "top_p",
                                                                                          "max_new_tokens", "seed"))
        speed = (f"{e['speedup']:.2f}× (rounds: {', '.join(f'{r:.2f}' for r in e['ratios'])}), CPU "
                 f"{e['cpu_speedup']:.2f}×" if "speedup" in e else "1.00×")
        lines.append(f"| {e['contender']} | `{e['options']['flags']}` | {', '.join(f'{w:.0f} s' for w in e['wall_s'])}"
                     f" | {', '.join(f'{x:.1f}' for x in e['loadavg_1min'])} | {e['median_wall_s']:.0f} s | "
                     f"{e['prompts_per_s']:.2f} | {e['median_cpu_s']:.0f} s | {e['finished']}/{e['prompts']} | {e['mean_tokens']:.0f} | {sampling} "
                     f"| {speed} |")
    return lines + [""]


__all__ = ["CASES", "CLI", "markdown", "run_case", "run_cli_case", "run_suite"]
