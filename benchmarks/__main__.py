"""The runner: ``python -m benchmarks run --suite SUITE --device cpu|cuda [options]``, SUITE one of kernels, e2e,
all, iteration, generation, planner.

Writes ``<out>/<device-slug>/<suite>.json`` (environment, settings, every case with every
repeat), ``<suite>.md`` (the tables) and PNG plots; ``<out>`` defaults to benchmarks/results.
``python -m benchmarks report FILE.json`` re-renders the tables and plots of a JSON.
``--device cuda --dry-run`` runs the CUDA plan on the CPU at miniature sizes (benchmarks/dryrun.py);
``python -m benchmarks check-out DIR`` checks DIR against what a device call brings back.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run suites and write JSON + Markdown + PNG")
    run.add_argument("--suite", choices=("kernels", "e2e", "all", "iteration", "generation", "planner"),
                     default="kernels",
                     help="all = kernels + e2e; iteration (one whole SPIN iteration, its stages' split), "
                          "generation (the sampling stage, old and new ways) and planner (the memory planner's bound "
                          "against measured peaks, its time estimate against the iteration suite) are CPU suites of "
                          "their own")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--shapes", help="kernel cases, comma-separated: cpu-small, tiny, <head>[@N], <head>@sweep "
                                      "(default: cpu-small on CPU, the GPU plan on CUDA)")
    run.add_argument("--ops", help="spin_loss,logprobs (default both)")
    run.add_argument("--modes", help="fwd+bwd,fwd (default both)")
    run.add_argument("--only", help="contenders to run, e.g. torch,cpu,naive,liger,cce,trl (default all)")
    run.add_argument("--e2e-cases", help="e2e cases, comma-separated (default: tiny on CPU, llama-1b on CUDA; "
                                          "'shared-prompt' = the shared-prompt cases)")
    run.add_argument("--iteration-cases", help="iteration cases: before,after (default both)")
    run.add_argument("--generation-cases", help="generation cases: cli,ultrachat-sft,ultrachat-random,demo (default all but cli)")
    run.add_argument("--planner-cases", help="planner: configurations of benchmarks/planner.py GRID (default all)")
    run.add_argument("--iteration-result", type=Path,
                     help="planner: the iteration suite's JSON to check the time estimate against (default: this "
                          "CPU's under --out, else the newest other CPU's)")
    run.add_argument("--work-dir", type=Path, help="iteration/generation: where the SFT'd models and runs go "
                                                   "(default $SPIN_BENCH_WORK or <tmp>/spin_kernels_bench)")
    run.add_argument("--prompts", type=int, help="iteration: use the first N prompts of the sample (default 154)")
    run.add_argument("--max-new-tokens", type=int, help="iteration: tokens sampled per response (default 256)")
    run.add_argument("--sft-steps", type=int, help="iteration/generation: SFT steps of the ~10M Llama (default 40)")
    run.add_argument("--out", type=Path, default=RESULTS, help="results root (default benchmarks/results)")
    run.add_argument("--quick", action="store_true", help="fewer repeats and a shorter GPU plan")
    run.add_argument("--warmup", type=int, help="warm-up runs per contender (default 2)")
    run.add_argument("--repeats", type=int, help="timed runs per contender (default 3 CPU, 5 CUDA; quick 3)")
    run.add_argument("--threads", type=int, help="torch threads on CPU (default: torch's)")
    run.add_argument("--budget-s", type=float, help="stop starting kernel groups after this many seconds")
    run.add_argument("--e2e-budget-s", type=float, help="likewise for the e2e suite")
    run.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    run.add_argument("--dry-run", action="store_true",
                     help="with --device cuda: its plan on the CPU at miniature sizes, Triton interpreted, to catch on "
                          "a CPU what would fail on the GPU (benchmarks/dryrun.py); no warm-up, 1 repeat by default")
    run.add_argument("--tag", help="write <suite>-<tag>.json/.md/.png instead of <suite>.*, beside the suite's "
                                   "main run (e.g. --e2e-cases shared-prompt --tag shared-prompt)")
    rep = sub.add_parser("report", help="re-render Markdown and plots from run JSONs")
    rep.add_argument("json", nargs="+", type=Path)
    chk = sub.add_parser("check-out", help="check a folder against what a device call brings back from $OUT "
                                           "(8 files, 2 folders deep, plain names)")
    chk.add_argument("folder", type=Path)
    return p.parse_args(argv)


def _settings(args: argparse.Namespace, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    if args.dry_run:  # paths, not figures: the fewest runs that take the recording branches
        return {"warmup": args.warmup if args.warmup is not None else 0,
                "repeats": args.repeats if args.repeats is not None else 1,
                "quick": args.quick, "memory": False, "budget_s": args.budget_s, "dry_run": True}
    return {
        "warmup": args.warmup if args.warmup is not None else 2,  # Liger's torch.compile recompiles on call 2
        "repeats": args.repeats if args.repeats is not None else (3 if args.quick or not cuda else 5),
        "quick": args.quick,
        "memory": not args.no_memory,
        "budget_s": args.budget_s,
    }


def _load_average() -> list[float] | None:
    """The system's 1/5/15-minute load averages: how busy a shared machine was around a run."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _portable(argv: list[str]) -> list[str]:
    """``argv`` without this machine's scratch paths (results are committed): the values of
    --work-dir and --out become WORK_DIR and OUT, an --iteration-result outside the repository its
    file name."""
    out, root = list(argv), Path(__file__).resolve().parents[1]
    for i, flag in enumerate(out[:-1]):
        if flag in ("--work-dir", "--out"):
            out[i + 1] = "WORK_DIR" if flag == "--work-dir" else "OUT"
        elif flag == "--iteration-result" and not Path(out[i + 1]).resolve().is_relative_to(root):
            out[i + 1] = Path(out[i + 1]).name
    return out


def _record(suite: str, env: dict, settings: dict, argv: list[str], tag: str | None = None) -> dict:
    from .dryrun import NOTE

    return {"schema": 1, "suite": suite, "tag": tag, "created": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "command": "python -m benchmarks " + shlex.join(_portable(argv)), "env": env,
        "settings": settings, "cases": [], "unavailable": {}, "notes": [NOTE] if settings.get("dry_run") else []}


def run_kernels(args, device, env, settings, argv) -> dict:
    from .kernels import KernelSuite, make_plan

    record = _record("kernels", env, settings, argv, args.tag)
    suite = KernelSuite(device, only=_csv(args.only), warmup=settings["warmup"], repeats=settings["repeats"],
                        memory=settings["memory"], budget_s=args.budget_s, dry_run=args.dry_run)
    plan_device = torch.device("cuda") if args.dry_run else device
    plan = make_plan(plan_device, _csv(args.shapes), _csv(args.ops), _csv(args.modes), args.quick)
    record["plan"] = [dataclasses.asdict(g) for g in plan]
    record["unavailable"] = suite.unavailable
    record["notes"].append("Inputs: random, logits std ~4, equal sequence lengths; reference log-probs are "
                           "zeros for every contender (Liger cannot take precomputed ones; see contenders.py).")
    if device.type == "cpu" and settings["memory"]:
        record["notes"].append("CPU memory: peak RSS growth of one warm run in a fresh subprocess per case.")
    record["cases"] = suite.run(plan)
    return record


def run_e2e(args, device, env, settings, argv) -> dict:
    from .e2e import run_suite

    record = _record("e2e", {**env}, settings, argv, args.tag)
    cases, notes = run_suite(device, _csv(args.e2e_cases), warmup=settings["warmup"], repeats=settings["repeats"],
                             budget_s=args.e2e_budget_s, memory=settings["memory"], dry_run=args.dry_run)
    record["cases"], record["notes"] = cases, record["notes"] + notes
    return record


def run_iteration(args, device, env, settings, argv) -> dict:
    from .iteration import run_suite

    record = _record("iteration", env, settings, argv)
    record["cases"], notes, record["info"] = run_suite(
        device, _csv(args.iteration_cases), work_dir=args.work_dir, prompts=args.prompts,
        max_new_tokens=args.max_new_tokens, sft_steps=args.sft_steps)
    record["notes"] += notes
    record["settings"] = {**settings, "repeats": 1, "warmup": 0,
                          "timing": "one run of each case, one after the other, in one process (wall and process "
                                    "CPU seconds)."}
    return record


def run_generation(args, device, env, settings, argv) -> dict:
    from .generation import run_suite

    record = _record("generation", env, settings, argv)
    record["cases"], notes = run_suite(device, _csv(args.generation_cases), repeats=args.repeats or 2,
                                       only=_csv(args.only), work_dir=args.work_dir)
    record["notes"] += notes
    reps = args.repeats or 2
    record["settings"] = {**settings, "repeats": reps, "warmup": 1,
                          "timing": f"1 warm-up on 4 prompts + {reps} timed rounds per contender, round-robin in one "
                                    "process; the fastest round."}
    return record


def run_planner(args, device, env, settings, argv) -> dict:
    from .planner import run_suite, time_check

    if device.type != "cpu":
        raise SystemExit("--suite planner measures CPU processes (its GPU form is not written yet)")
    record = _record("planner", env, settings, argv)
    record["cases"], notes = run_suite(_csv(args.planner_cases), work_dir=args.work_dir)
    record["time_check"] = time_check(env, args.out, args.work_dir, args.iteration_result)
    record["notes"] += notes
    record["settings"] = {**settings, "repeats": 1, "warmup": 1,
                          "timing": "memory, not time: peak resident set per configuration in fresh processes (one "
                                    "warm-up step each); the time check reads the iteration suite's stage times."}
    return record


RUNNERS = {"kernels": run_kernels, "e2e": run_e2e, "iteration": run_iteration, "generation": run_generation,
           "planner": run_planner}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.command == "report":
        from .report import render

        for path in args.json:
            for out in render(json.loads(path.read_text()), path.parent):
                print(out)
        return 0
    if args.command == "check-out":
        from .dryrun import check_layout

        problems = check_layout(args.folder)
        for line in problems:
            print(f"[check-out] {line}", file=sys.stderr)
        print(f"[check-out] {args.folder}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dry_run:
        if args.device != "cuda":
            print("--dry-run stands in for --device cuda; run it with --device cuda", file=sys.stderr)
            return 2
        # Before spin_kernels.triton is imported: Triton picks interpreter or compiler when a
        # kernel is defined.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    from .env import environment
    from .report import write_run

    env = environment(device)
    if args.dry_run:
        env["device_slug"] = f"dry-run-{env['device_slug']}"
    settings = _settings(args, device)
    print(f"[benchmarks] {env['device_name']} ({env['device_slug']}), torch {env['versions']['torch']}, "
          f"{env['torch_threads']} threads, settings {settings}", flush=True)
    suites = ("kernels", "e2e") if args.suite == "all" else (args.suite,)
    failed = 0
    for suite in suites:
        t0 = time.perf_counter()
        runner = RUNNERS[suite]
        load_start = _load_average()
        record = runner(args, device, env, settings, argv)
        record["wall_s"] = time.perf_counter() - t0
        record["load_average"] = {"start": load_start, "end": _load_average()}
        for path in write_run(record, args.out):
            print(f"[benchmarks] wrote {path}", flush=True)
        if args.dry_run:  # a failure is what a dry run is for: it fails the command, not just a cell
            for r in (r for r in record["cases"] if r["status"] == "error"):
                failed += 1
                print(f"[dry-run] {suite}: {r['case']} {r.get('op', '')} {r.get('mode', '')} "
                      f"{r.get('contender') or r.get('variant')}: {r['note']}", file=sys.stderr)
    if failed:
        print(f"[dry-run] {failed} run(s) failed (above): to look at before a GPU call", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
