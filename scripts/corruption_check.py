"""Damage each file a SPIN run saved, resume, and check that the damaged file is never used:
every case is rebuilt (``--resume``: a warning names the file and the run ends bit-equal to an
uninterrupted run) or refused (``--resume --on-stale error``: an error names the file and what to
delete).

    python scripts/corruption_check.py --out benchmarks/results/corruption-check.md
    python scripts/corruption_check.py --procs 2 --damage flip

The run is scripts/kill_resume_check.py's (tiny Llama, 20 prompts, 2 iterations of 5 optimizer
steps, a checkpoint every step, CPU). It runs once uninterrupted (the reference), then once more,
killed (SIGKILL) as soon as iteration 1 has a step checkpoint: iteration 0's final model and
iteration 1's checkpoint are on disk. Each file of the two (``iter0/model/*``: weights, config,
tokenizer, spin_info.json; ``iter1/checkpoints/index.json`` and every file of the step directory
it names) and the rows of both iterations (generated.jsonl, pairs.jsonl) is then damaged in
turn, in a copy of that run directory:

* ``flip``: one byte (the middle one) XOR 0x01, the size and the mtime kept;
* ``truncate``: cut to half its size;
* ``zero``: emptied (0 bytes).

and the copy is resumed twice: ``--resume`` (expected: rebuilt, the damaged file named in a
warning, generated.jsonl, pairs.jsonl, metrics and model.safetensors of both iterations equal to
the reference's: scripts/kill_resume_check.compare) and ``--resume --on-stale error``
(expected: exit 2 (torchrun: 1), the error naming the damaged file and what to delete or
remove; or, where the damage is
what a killed writer leaves, a truncated generated.jsonl, rebuilt). A run that ends other than
the reference is reported as USED, any other exit as FAILED. The report also gives what the
digests cost on this model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kill_resume_check as krc  # noqa: E402  (the run, its start and the comparison of two runs)

DAMAGES = ("flip", "truncate", "zero")


def damage(path: str | Path, how: str) -> None:
    """Damage the file ``path``: ``flip`` one byte (the middle one, XOR 0x01) keeping its size and
    mtime (what a resume must still see), ``truncate`` it to half, ``zero`` it (0 bytes) or
    ``remove`` it. (The tests damage files with this too.)"""
    path = Path(path)
    stat = path.stat()
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    elif how == "truncate":
        path.write_bytes(bytes(data[:len(data) // 2]))
    elif how == "zero":
        path.write_bytes(b"")
    else:
        path.unlink()


def interrupted_run(procs: int, args: list[str], run: Path, tries: int = 5) -> None:
    """Run into ``run`` and kill it as soon as iteration 1 has a step checkpoint."""
    index = run / "iter1" / "checkpoints" / "index.json"
    for _ in range(tries):
        shutil.rmtree(run, ignore_errors=True)
        proc = krc._start(procs, [*args, "--output-dir", str(run)])
        while proc.poll() is None and not index.exists():
            time.sleep(0.002)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if index.exists() and (run / "iter0" / "model").is_dir():
                return
        proc.wait()
    raise RuntimeError(f"could not stop a run with iteration 1 checkpointed in {tries} tries")


def saved_files(run: Path) -> list[Path]:
    """The files of iter0's final model and of iter1's latest step checkpoint (with its index),
    and the rows both iterations wrote (generated.jsonl, pairs.jsonl)."""
    index = run / "iter1" / "checkpoints" / "index.json"
    step = index.parent / json.loads(index.read_text())["dir"]
    rows = [run / f"iter{t}" / name for t in (0, 1) for name in ("generated.jsonl", "pairs.jsonl")]
    return sorted((run / "iter0" / "model").rglob("*")) + [index] + sorted(step.iterdir()) + rows


def _resume(procs: int, args: list[str], run: Path, *extra: str) -> tuple[int, str]:
    proc = krc._start(procs, [*args, "--output-dir", str(run), "--resume", *extra])
    _, err = proc.communicate()
    return proc.returncode, " ".join(err.split())


def check_case(procs: int, args: list[str], snapshot: Path, ref: Path, rel: str, how: str, work: Path) -> dict:
    """Both resumes of the snapshot with ``rel`` damaged as ``how``: what each did."""
    out = {"file": rel, "damage": how}
    for mode, extra in (("regenerate", ()), ("error", ("--on-stale", "error"))):
        run = work / f"{mode}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(snapshot, run)
        target = run / rel
        damage(target, how)
        rc, err = _resume(procs, args, run, *extra)
        named = str(target) in err
        diffs = krc.compare(run, ref) if rc == 0 else []
        if rc == 0 and not diffs:
            out[mode] = "rebuilt" + (", file named" if named else " (as after a kill: no warning)")
        elif (rc == 2 or (procs > 1 and rc != 0)) and named and "spin-kernels iterate: error:" in err \
                and ("delete " in err or "remove " in err):
            out[mode] = "refused, file named"  # (torchrun exits 1 when its ranks stop with the error)
        elif rc == 0:
            out[mode] = "USED: " + ", ".join(diffs)
        else:
            out[mode] = f"FAILED (exit {rc}, file {'named' if named else 'not named'})"
        out[f"{mode}_ok"] = out[mode].startswith(("rebuilt", "refused"))
        out[f"{mode}_message"] = next((s for s in err.split("spin-kernels") if str(target) in s), "")[:400]
        shutil.rmtree(run, ignore_errors=True)
    return out


def digest_cost(snapshot: Path, ref_seconds: float) -> dict:
    """What the digests cost here: hashing a final model and a step checkpoint (each read again,
    as a resume does), against the run's wall time, and xxh3's rate on 256 MiB."""
    from spin_kernels.training import provenance

    model = snapshot / "iter0" / "model"
    index = snapshot / "iter1" / "checkpoints" / "index.json"
    step = index.parent / json.loads(index.read_text())["dir"]
    sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in (model, step)}
    t0 = time.perf_counter()
    for _ in range(20):
        for p in (model, step):
            for f in p.rglob("*"):
                if f.is_file():
                    provenance.file_digest(str(f), fresh=True)
    per_check = (time.perf_counter() - t0) / 20
    with tempfile.NamedTemporaryFile() as big:
        big.write(os.urandom(1 << 20) * 256)
        big.flush()
        provenance.file_digest(big.name, fresh=True)  # into the page cache
        t0 = time.perf_counter()
        provenance.file_digest(big.name, fresh=True)
        rate = (256 << 20) / (time.perf_counter() - t0) / 1e9
    # each run hashes every saved model and checkpoint once when written and once when read back
    saves = 2 + 2 * 4  # two final models; a checkpoint after each step but the last, in each iteration
    return {"model_bytes": sizes[model], "checkpoint_bytes": sizes[step], "check_ms": per_check * 1e3,
            "run_ms": saves * per_check * 1e3, "run_share": saves * per_check / ref_seconds, "rate_gbs": rate}


def run_check(procs: int, root: Path, damages: tuple[str, ...], log=print) -> dict:
    args = krc._setup(root)
    ref = root / "uninterrupted"
    t0 = time.perf_counter()
    proc = krc._start(procs, [*args, "--output-dir", str(ref)])
    if proc.wait() != 0:
        raise RuntimeError(f"the uninterrupted run failed: {proc.stderr.read()[-3000:]}")
    wall = time.perf_counter() - t0
    log(f"uninterrupted run: {wall:.1f} s")
    snapshot = root / "snapshot"
    interrupted_run(procs, args, snapshot)
    step = json.loads((snapshot / "iter1" / "checkpoints" / "index.json").read_text())["step"]
    log(f"killed with iter0 done and iter1 after step-{step}")
    cases = []
    for path in saved_files(snapshot):
        rel = str(path.relative_to(snapshot))
        for how in damages:
            case = check_case(procs, args, snapshot, ref, rel, how, root / "trial")
            cases.append(case)
            log(f"{rel} {how}: --resume {case['regenerate']}; --on-stale error {case['error']}")
    return {"procs": procs, "reference_s": wall, "step": step, "cases": cases, "cost": digest_cost(snapshot, wall),
            "ok": all(c["regenerate_ok"] and c["error_ok"] for c in cases)}


def report(result: dict, command: str) -> str:
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    cases, cost = result["cases"], result["cost"]
    lines = [f"# Corruption check: {result['procs']} process(es)", "",
             f"`{command}` on {cpu}, torch {torch.__version__}, Python {platform.python_version()}. The run of "
             f"scripts/kill_resume_check.py (tiny Llama, 20 prompts, 2 iterations of 5 optimizer steps, a checkpoint "
             f"every step; {result['reference_s']:.1f} s uninterrupted) was killed with iteration 0 finished and "
             f"iteration 1 after step-{result['step']}. Each file of iter0's final model, of iter1's step checkpoint "
             f"and the rows of both iterations ({len({c['file'] for c in cases})} files) was then damaged in turn in "
             f"a copy of that directory (flip: one byte XOR 0x01, size and mtime kept; truncate: half; zero: 0 bytes) "
             f"and resumed twice: `--resume` must rebuild (a warning names the file; both iterations' "
             f"generated.jsonl, pairs.jsonl, metrics and weights equal to the uninterrupted run's) and `--resume "
             f"--on-stale error` must refuse (exit 2 naming the file and what to delete).", "",
             f"A truncated or emptied generated.jsonl is what a writer killed while appending leaves: its "
             f"missing rows are sampled again without a warning, in both modes.", "",
             f"**{len(cases)} damaged files (file x damage), each resumed both ways: "
             f"{sum(c[m].startswith('rebuilt') for c in cases for m in ('regenerate', 'error'))} rebuilt, "
             f"{sum(c[m].startswith('refused') for c in cases for m in ('regenerate', 'error'))} refused, "
             f"{sum(not c[m + '_ok'] for c in cases for m in ('regenerate', 'error'))} used or failed: "
             f"{'none used' if result['ok'] else 'SOME USED OR FAILED'}.**", "",
             "| file | damage | `--resume` | `--resume --on-stale error` |", "|---|---|---|---|"]
    lines += [f"| {c['file']} | {c['damage']} | {c['regenerate']} | {c['error']} |" for c in cases]
    example = next((c for c in cases if c["error"].startswith("refused") and c["damage"] == "flip"
                    and c["file"].endswith(".safetensors")), None)
    if example:
        lines += ["", f"What a refusal says (`{example['file']}`, one byte flipped):", "",
                  f"> spin-kernels{example['error_message']}"]
    lines += ["", "## What the digests cost", "",
              f"Every file is hashed (xxh3-128) when written and read again before a resume reuses it. Here a final "
              f"model is {cost['model_bytes']} bytes and a step checkpoint {cost['checkpoint_bytes']} bytes; checking "
              f"both takes {cost['check_ms']:.2f} ms (read again, page cache warm). The run writes 10 of them (2 final "
              f"models, 8 checkpoints): about {cost['run_ms']:.0f} ms to write their digests, "
              f"{100 * cost['run_share']:.2f}% of its {result['reference_s']:.1f} s. xxh3-128 reads "
              f"{cost['rate_gbs']:.1f} GB/s from the page cache on this CPU: a 15 GB 7B model in bf16 costs about "
              f"{15 / cost['rate_gbs']:.0f} s per check (once when saved, once when a resume reuses it; within a "
              f"command a file is hashed once, by inode, size and mtime, for the rows' provenance)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, default=1, choices=(1, 2))
    parser.add_argument("--damage", choices=DAMAGES, action="append", help="damages to apply (default: all)")
    parser.add_argument("--out", help="write the Markdown report here")
    parser.add_argument("--workdir", help="where the runs go (default: a temporary directory, removed)")
    args = parser.parse_args(argv)
    result = krc.in_workdir(args.workdir, "spin-corrupt-",
                            lambda root: run_check(args.procs, root, tuple(args.damage or DAMAGES)))
    return krc.publish(result, report, "corruption_check.py", argv, args.out)

if __name__ == "__main__":
    raise SystemExit(main())
