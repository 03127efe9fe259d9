"""How things are measured: timed rounds, peak memory, output fingerprints.

* Time: every prepared contender of a group is warmed up, then timed in round-robin rounds
  (round r runs each contender once), so slow drifts of a shared machine hit all of them alike.
  Each run: gradients of the previous run dropped (not timed), device synchronised, wall clock
  around ``run()`` and a final synchronise. Figures: the median (and every repeat) per contender.
* Peak extra memory, CUDA: ``torch.cuda.max_memory_allocated()`` after
  ``reset_peak_memory_stats()`` minus ``memory_allocated()`` just before the run (inputs and
  other contenders' state excluded; outputs and gradients the run creates included); the
  largest over the timed repeats.
* Peak extra memory, CPU: a fresh subprocess per case (``benchmarks.memprobe``): build the
  inputs, one warm-up run (compilation), drop its outputs, then peak RSS growth of one run
  (VmHWM reset through /proc/self/clear_refs; where that is not possible, ru_maxrss after the
  run minus ru_maxrss after building the inputs, with no warm-up). The method is recorded.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .contenders import Runner
from .env import ROOT


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Measured:
    """What one contender gave in one group."""

    status: str = "ok"  # ok | oom | error | n/a | skipped
    note: str = ""
    times_s: list[float] = field(default_factory=list)
    peak_extra_bytes: int | None = None
    mem_method: str | None = None
    fingerprint: dict[str, Tensor] | None = None

    def fail(self, exc: BaseException) -> None:
        self.status = "oom" if is_oom(exc) else ("n/a" if isinstance(exc, NotImplementedError) else "error")
        self.note = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


def fingerprint(out: Tensor, grads: tuple[Tensor | None, Tensor | None]) -> dict[str, Tensor]:
    """Small float64 summaries to compare contenders: the output, row norms of the gradients."""
    fp = {"out": out.detach().double().reshape(-1).cpu()}
    for key, g in zip(("dhidden", "dweight"), grads):
        if g is not None:
            fp[key] = g.detach().float().norm(dim=-1).double().cpu()
    return fp


def rel_errors(fp: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, float]:
    """max |a - b| / max |b| per common key (what tells a wrong result from rounding)."""
    errs = {}
    for key in fp.keys() & ref.keys():
        a, b = fp[key], ref[key]
        if a.shape != b.shape:
            errs[key] = float("inf")
            continue
        scale = b.abs().max().item() if b.numel() else 0.0
        errs[key] = (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()
    return errs


def _one_run(runner: Runner, device: torch.device, track_memory: str | None) -> tuple[float, int | None, Tensor]:
    runner.zero_grad()
    sync(device)
    base = None
    if track_memory == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    out = runner.run()
    sync(device)
    elapsed = time.perf_counter() - t0
    peak = None
    if track_memory == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    elif track_memory == "dry-run":
        from .dryrun import output_bytes

        peak = output_bytes(out, runner.grads())
    return elapsed, peak, out


def timed_rounds(runners: dict[str, Runner], results: dict[str, Measured], device: torch.device, *,
                 warmup: int, repeats: int, want_fingerprint: bool = True, dry_run: bool = False) -> None:
    """Warm up, then time ``repeats`` round-robin rounds; fills ``results`` (failures recorded).
    ``dry_run``: the memory column gets benchmarks/dryrun.py's stand-in."""
    from .dryrun import MEM_METHOD

    track_memory = "cuda" if device.type == "cuda" else "dry-run" if dry_run else None
    mem_method = "cuda max_memory_allocated - memory_allocated before the run" if track_memory == "cuda" else MEM_METHOD
    live = dict(runners)

    def attempt(name: str, record: bool) -> None:
        runner = live[name]
        try:
            elapsed, peak, out = _one_run(runner, device, track_memory)
        except Exception as exc:  # noqa: BLE001 — a failure (OOM, a missing kernel) must not end the group
            results[name].fail(exc)
            elapsed = None
        if elapsed is None:  # outside the except block: its traceback no longer pins the run's tensors
            del live[name]
            runner.zero_grad()
            free_device_memory(device)
            return
        if record:
            m = results[name]
            m.times_s.append(elapsed)
            if peak is not None:
                m.peak_extra_bytes = max(peak, m.peak_extra_bytes or 0)
                m.mem_method = mem_method
            if want_fingerprint and len(m.times_s) == repeats:
                m.fingerprint = fingerprint(out, runner.grads())
        del out
        runner.zero_grad()  # free this run's gradients before the next contender runs

    for _ in range(warmup):
        for name in list(live):
            attempt(name, record=False)
    for _ in range(repeats):
        for name in list(live):
            attempt(name, record=True)
    for runner in runners.values():
        runner.zero_grad()
    free_device_memory(device)


def cpu_peak_extra(case: str, contender: str, op: str, mode: str, threads: int, *, suite: str = "kernels",
                   timeout_s: float = 900.0) -> dict:
    """Peak RSS growth of one run in a fresh subprocess (see benchmarks/memprobe.py).

    ``contender`` is a kernel contender name, or an e2e variant when ``suite == "e2e"``.
    """
    spec = json.dumps({"suite": suite, "case": case, "contender": contender, "op": op, "mode": mode,
                       "threads": threads})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if suite == "e2e":
        # A model step frees and reallocates many tensors below glibc's (dynamic, up to 32 MiB) mmap
        # threshold; glibc keeps such freed memory resident, so the warm run's activations would already
        # be in VmRSS and the measured growth would be noise (0 to 160 MiB for the same step). A fixed
        # 64 KiB threshold maps every tensor of consequence on its own and unmaps it when freed.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memprobe", spec], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "error", "note": f"memory probe timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "error", "note": f"memory probe failed (rc={proc.returncode}): {tail[:300]}"}
    return json.loads(lines[-1])
