"""Kill -9 a SPIN run at random points, resume it each time, and check it ends exactly like an
uninterrupted run: bit-equal weights and identical data files.

    python scripts/kill_resume_check.py --procs 1 --kills 20 --out benchmarks/results/kill-resume-1proc.md
    python scripts/kill_resume_check.py --procs 2 --kills 20 --out benchmarks/results/kill-resume-2proc.md
    python scripts/kill_resume_check.py --procs 1 --kills 10 --at checkpoint

A 2-iteration run of a tiny Llama (CPU, float32) is first run uninterrupted. Then trials: each
starts a fresh run directory, kills it after a random delay (uniform from the start-up time to
the uninterrupted run's wall time), resumes with ``--resume``, kills again, ... until a resume
finishes; the
trial's files are then compared with the uninterrupted run's. Trials repeat until ``--kills``
kills happened. ``--at checkpoint`` kills instead 0-0.1 s after each step checkpoint the trial has
not seen yet is complete (its index written): every kill then resumes from a checkpoint, which
random delays reach only in the short training windows of this run. With ``--procs 2`` the run is ``torchrun --nproc_per_node 2`` (FSDP2, gloo);
kills alternate between the launcher alone (its ranks must then end by themselves: they are
tied to it, spin_kernels.training.runlock.end_with_parent) and the whole process group.

Compared per iteration: generated.jsonl and pairs.jsonl byte for byte, metrics.jsonl without
the timing columns (tokens_per_s, peak_mem_mib), and every tensor of model.safetensors with
torch.equal.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMING = ("tokens_per_s", "peak_mem_mib")
ARGS = ["iterate", "--iterations", "2", "--device", "cpu", "--max-length", "40", "--max-prompt-length", "8",
        "--max-new-tokens", "12", "--learning-rate", "1e-3", "--epochs", "1", "--global-batch-pairs", "4",
        "--generation-batch-size", "2", "--token-budget", "120", "--save-every", "1"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(procs: int, args: list[str]) -> list[str]:
    if procs == 1:
        return [sys.executable, "-m", "spin_kernels.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
            str(_port()), "-m", "spin_kernels.cli", *args]


def _start(procs: int, args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.Popen(_command(procs, args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _lock_free(run: Path) -> bool:
    path = run / ".spin-kernels.lock"
    if not path.exists():
        return True
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
    return True


def _where(run: Path) -> str:
    """What the run had done when it was killed (from its files)."""
    for t in (1, 0):
        it = run / f"iter{t}"
        if (it / "model").is_dir():
            return f"iter{t} done"
        index = it / "checkpoints" / "index.json"
        if index.exists():  # the latest complete checkpoint (spin_kernels.training.checkpoint)
            return f"iter{t} training after step-{json.loads(index.read_text())['step']}"
        if (it / "pairs.jsonl").exists():
            return f"iter{t} training (no checkpoint yet)"
        if (it / "generated.jsonl").exists():
            n = sum(1 for line in open(it / "generated.jsonl") if line.endswith("\n"))
            return f"iter{t} generating ({n} rows)"
    return "starting"


def _metrics(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(path)]


def compare(run: Path, ref: Path) -> list[str]:
    """Differences between two finished runs (empty when identical)."""
    import torch
    from safetensors.torch import load_file

    diffs = []
    for t in (0, 1):
        a, b = run / f"iter{t}", ref / f"iter{t}"
        for name in ("generated.jsonl", "pairs.jsonl"):
            if (a / name).read_bytes() != (b / name).read_bytes():
                diffs.append(f"iter{t}/{name}")
        if _metrics(a / "metrics.jsonl") != _metrics(b / "metrics.jsonl"):
            diffs.append(f"iter{t}/metrics.jsonl")
        wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
        if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
            diffs.append(f"iter{t}/model")
    return diffs


def _setup(root: Path) -> list[str]:
    from spin_kernels.demo.task import MarkovTask
    from spin_kernels.demo.tiny import save_tiny_model

    model = save_tiny_model(str(root / "sft"), layers=2)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MarkovTask().sample(20, seed=1)))
    return [*ARGS, "--model", model, "--data", str(data)]


def _checkpoints(run: Path) -> set:
    """(iteration, step) of each complete step checkpoint of ``run`` (named by an index)."""
    found = set()
    for index in run.glob("iter*/checkpoints/index.json"):
        try:
            found.add((index.parent.parent.name, json.loads(index.read_text())["step"]))
        except (OSError, ValueError, KeyError):
            continue
    return found


def _after_new_checkpoint(proc: subprocess.Popen, run: Path, seen: set, rng: random.Random) -> float | None:
    """Wait until a step checkpoint not in ``seen`` is complete, then 0-0.1 s (a step of this run
    takes about that long); the seconds waited (None: the run ended first)."""
    t0 = time.perf_counter()
    while proc.poll() is None:
        new = _checkpoints(run) - seen
        if new:
            seen |= new
            time.sleep(rng.uniform(0, 0.1))
            return time.perf_counter() - t0
        time.sleep(0.002)
    return None


def run_check(procs: int, kills: int, seed: int, root: Path, log=print, at: str = "random") -> dict:
    """The experiment; returns {"kills": [...], "trials": [...], "reference_s": float, "ok": bool}."""
    rng = random.Random(seed)
    args = _setup(root)
    ref = root / "uninterrupted"
    t0 = time.perf_counter()
    proc = _start(procs, [*args, "--output-dir", str(ref)])
    first = ref / "iter0" / "generated.jsonl"
    startup = None
    while proc.poll() is None:  # when the first output appears: the start-up (imports, checks) before it
        if startup is None and first.exists() and first.stat().st_size:
            startup = time.perf_counter() - t0
        time.sleep(0.01)
    if proc.wait() != 0:
        raise RuntimeError(f"the uninterrupted run failed: {proc.stderr.read()[-3000:]}")
    wall = time.perf_counter() - t0
    startup = min(startup or 0.0, wall)
    log(f"uninterrupted run: {wall:.1f} s, first output after {startup:.1f} s")
    records, trials = [], []
    trial = 0
    while len(records) < kills:
        run = root / f"trial{trial}"
        starts, resume, seen = 0, [], set()
        while True:
            seen |= _checkpoints(run)  # the one it resumes from is not new
            proc = _start(procs, [*args, "--output-dir", str(run), *resume])
            starts += 1
            rc = None
            if len(records) >= kills:  # enough kills: let it finish
                rc = proc.wait()
            elif at == "checkpoint":
                delay = _after_new_checkpoint(proc, run, seen, rng)
                rc = proc.wait() if delay is None else None
            else:
                # Uniform over the part of the run that does work (most kills during start-up would
                # only test that an empty start resumes).
                delay = rng.uniform(0.8 * startup, wall)
                try:
                    rc = proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    rc = None
            if rc is not None:
                if rc != 0:
                    raise RuntimeError(f"trial {trial}: a resumed run failed: {proc.stderr.read()[-3000:]}")
                break
            how = "group"
            if procs > 1 and len(records) % 2 == 0:
                how = "launcher"
                proc.send_signal(signal.SIGKILL)  # the ranks must follow their launcher
            else:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            deadline = time.monotonic() + 15
            while not _lock_free(run):  # the old writer (rank 0) must be gone before a resume
                if time.monotonic() > deadline:
                    raise RuntimeError(f"trial {trial}: the run directory is still locked 15 s after the kill "
                                       f"(a rank outlived its launcher)")
                time.sleep(0.05)
            where = _where(run)
            records.append({"trial": trial, "after_s": round(delay, 2), "killed": how, "where": where})
            log(f"kill {len(records)}: trial {trial}, after {delay:.2f} s ({how}): {where}")
            resume = ["--resume"]
        diffs = compare(run, ref)
        trials.append({"trial": trial, "starts": starts, "identical": not diffs, "differences": diffs})
        log(f"trial {trial}: {starts} start(s), {'identical' if not diffs else 'DIFFERENT: ' + ', '.join(diffs)}")
        shutil.rmtree(run)
        trial += 1
    return {"procs": procs, "at": at, "kills": records, "trials": trials, "reference_s": wall, "startup_s": startup,
            "ok": all(t["identical"] for t in trials)}


_WHEN = {"random": "after random delays (uniform from 0.8 x that start-up to the whole run's time)",
         "checkpoint": "0-0.1 s after each step checkpoint it had not yet reached was complete"}


def report(result: dict, command: str) -> str:
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    lines = [f"# Kill -9 and resume: {result['procs']} process(es)", "",
             f"`{command}` on {cpu}, torch {torch.__version__}, Python {platform.python_version()}. A 2-iteration "
             f"run (tiny Llama, 20 prompts, 2 x 5 optimizer steps, a checkpoint every step) took "
             f"{result['reference_s']:.1f} s uninterrupted (first output after {result['startup_s']:.1f} s); every "
             f"trial was killed {_WHEN[result['at']]} and resumed until it finished, then compared with the uninterrupted run: "
             f"generated.jsonl and pairs.jsonl byte for byte, metrics.jsonl without its timing columns, "
             f"model.safetensors tensor for tensor (torch.equal).", "",
             f"**{len(result['kills'])} kills in {len(result['trials'])} trials: "
             f"{'all identical' if result['ok'] else 'DIFFERENCES FOUND'}.**", "",
             "| kill | trial | after (s) | killed | what the run was doing |", "|---|---|---|---|---|"]
    lines += [f"| {i + 1} | {k['trial']} | {k['after_s']} | {k['killed']} | {k['where']} |"
              for i, k in enumerate(result["kills"])]
    lines += ["", "| trial | starts | identical to the uninterrupted run |", "|---|---|---|"]
    lines += [f"| {t['trial']} | {t['starts']} | {'yes' if t['identical'] else 'no: ' + ', '.join(t['differences'])} |"
              for t in result["trials"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, default=1, choices=(1, 2))
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--at", choices=("random", "checkpoint"), default="random",
                        help="kill after random delays, or right after each new step checkpoint")
    parser.add_argument("--out", help="write the Markdown report here")
    parser.add_argument("--workdir", help="where the runs go (default: a temporary directory, removed)")
    args = parser.parse_args(argv)
    result = in_workdir(args.workdir, "spin-kill-",
                        lambda root: run_check(args.procs, args.kills, args.seed, root, at=args.at))
    return publish(result, report, "kill_resume_check.py", argv, args.out)


def in_workdir(workdir: str | None, prefix: str, run) -> dict:
    """``run(root)`` in ``workdir`` (kept) or in a new temporary directory (removed after)."""
    root = Path(workdir or tempfile.mkdtemp(prefix=prefix))
    root.mkdir(parents=True, exist_ok=True)
    try:
        return run(root)
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)


def portable(text: str, argv: list[str]) -> str:
    """``text`` without this machine's paths: the ``--workdir`` value becomes ``WORKDIR`` and an
    ``--out`` path inside the repository its path relative to the repository (reports are committed)."""
    root = Path(__file__).resolve().parents[1]
    for flag, name in (("--workdir", "WORKDIR"), ("--out", None)):
        if flag in argv[:-1]:
            value = argv[argv.index(flag) + 1]
            full = Path(value).resolve()
            rel = name or (str(full.relative_to(root)) if full.is_relative_to(root) else full.name)
            text = text.replace(str(full), rel)
            if os.path.isabs(value):  # a relative value names no machine path; never replace a short word
                text = text.replace(value, rel)
    return text


def publish(result: dict, report, script: str, argv: list[str] | None, out: str | None) -> int:
    """Print ``report(result, command)`` (and write it to ``out``); the exit code of the check."""
    argv = list(argv if argv is not None else sys.argv[1:])
    text = portable(report(result, f"python scripts/{script} " + " ".join(argv)), argv)
    print(text)
    if out:
        Path(out).write_text(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
