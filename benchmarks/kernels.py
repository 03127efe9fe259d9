"""The kernel suite: plans of (case, op, mode) groups, each run with every contender.

A group builds its inputs once, prepares every available contender on them, times them in
round-robin rounds with the GEMM floor (measure.py), measures peak extra memory, and compares
every contender's output and gradients with the reference (``ours:torch`` if it ran, else
``naive``). Groups run in priority order; once ``budget_s`` has passed the rest are recorded as
skipped, so a GPU run ends in a bounded time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from . import measure
from .contenders import MODES, OPS, Contender, Gemm, select
from .dryrun import miniature_case
from .shapes import (
    GPU_HEADS,
    GPU_SWEEP,
    Case,
    Inputs,
    gpu_case,
    make_inputs,
    resolve_case,
)


@dataclass(frozen=True)
class Group:
    case: str
    op: str
    mode: str


ALL_OP_MODES = [(op, mode) for op in OPS for mode in MODES]  # spin fwd+bwd first: the headline
HEADLINE = ("spin_loss", "fwd+bwd")
REFERENCE_PASS = ("logprobs", "fwd")


def expand_shape(name: str) -> list[str]:
    """``<head>@sweep`` -> the N sweep of that head; anything else -> itself."""
    head, _, tokens = name.partition("@")
    if tokens == "sweep":
        return [gpu_case(head, n).name for n in GPU_SWEEP]
    return [resolve_case(name).name]


def gpu_plan(quick: bool = False) -> list[Group]:
    """The GPU plan in priority order (a time budget cuts it from the end).

    1. llama3-8b: the headline (SPIN loss fwd+bwd) over the whole N sweep; the reference pass.
    2. every other head at 16k: the headline and the reference pass.
    3. llama3-8b@16k: the remaining op/modes.
    4. the N sweep of the other heads (headline only).
    """
    sweep = GPU_SWEEP[:3] if quick else GPU_SWEEP
    plan = [Group(gpu_case("llama3-8b", n).name, *HEADLINE) for n in sweep]
    plan.append(Group("llama3-8b@16k", *REFERENCE_PASS))
    for head in GPU_HEADS[1:]:
        plan += [Group(f"{head}@16k", *HEADLINE), Group(f"{head}@16k", *REFERENCE_PASS)]
    plan += [Group("llama3-8b@16k", op, mode) for op, mode in ALL_OP_MODES
             if (op, mode) not in (HEADLINE, REFERENCE_PASS)]
    if not quick:
        plan += [Group(gpu_case(head, n).name, *HEADLINE) for head in GPU_HEADS[1:] for n in GPU_SWEEP if n != 16384]
    return plan


def make_plan(device: torch.device, shapes: list[str] | None, ops: list[str] | None, modes: list[str] | None,
              quick: bool) -> list[Group]:
    """Explicit shapes x op/modes, or the device's default plan."""
    op_modes = [(o, m) for o, m in ALL_OP_MODES if (not ops or o in ops) and (not modes or m in modes)]
    if shapes:
        names = [n for s in shapes for n in expand_shape(s)]
        return [Group(n, o, m) for n in names for o, m in op_modes]
    if device.type == "cuda":
        return [g for g in gpu_plan(quick) if (g.op, g.mode) in op_modes]
    return [Group("cpu-small", o, m) for o, m in op_modes]


def _summary(case: Case, group: Group, contender: Contender, m: measure.Measured) -> dict:
    rec = {"case": case.name, "op": group.op, "mode": group.mode, "contender": contender.name,
           "kind": contender.kind, "version": contender.version(), "status": m.status, "note": m.note,
           "times_s": m.times_s, "median_s": statistics.median(m.times_s) if m.times_s else None,
           "peak_extra_bytes": m.peak_extra_bytes, "mem_method": m.mem_method}
    if contender.kind == "floor":
        rec["flops"], rec["gemm_rows"] = Gemm().flops(case), Gemm.rows(case)
    else:
        rec["flops"] = case.flops(group.mode)
    return rec


def _add_floor(records: list[dict]) -> None:
    """Achieved TFLOP/s, and the GEMM floor (the work at torch.mm's measured rate)."""
    gemm = next((r for r in records if r["contender"] == "gemm" and r["median_s"]), None)
    rate = gemm["flops"] / gemm["median_s"] if gemm else None
    for r in records:
        if r["kind"] == "floor" and r["median_s"]:
            r["tflops"] = r["flops"] / r["median_s"] / 1e12
        if r["kind"] == "floor" or not r["median_s"]:
            continue
        r["tflops"] = r["flops"] / r["median_s"] / 1e12
        if rate:
            r["floor_s"] = r["flops"] / rate
            r["of_floor"] = r["floor_s"] / r["median_s"]


def _add_checks(records: list[dict], measured: dict[str, measure.Measured]) -> None:
    ref_name = next((n for n in ("ours:torch", "naive") if measured.get(n) and measured[n].fingerprint), None)
    for r in records:
        fp = measured[r["contender"]].fingerprint
        if ref_name and fp is not None and r["kind"] != "floor":
            r["check_ref"] = ref_name
            r["rel_err"] = measure.rel_errors(fp, measured[ref_name].fingerprint)


class KernelSuite:
    """Runs a plan on one device; ``records`` collects one dict per (group, contender)."""

    def __init__(self, device: torch.device, *, only: list[str] | None, warmup: int, repeats: int,
                 memory: bool, budget_s: float | None, log=print, dry_run: bool = False):
        self.device, self.warmup, self.repeats, self.memory = device, warmup, repeats, memory
        self.budget_s, self.log, self.dry_run = budget_s, log, dry_run
        self.contenders, self.unavailable = select(device, only, dry_run)
        self.records: list[dict] = []
        self._oom: dict[tuple, int] = {}  # (head, op, mode, contender) -> smallest N that ran out of memory
        self._inputs: Inputs | None = None

    def _inputs_for(self, case: Case) -> Inputs:
        if self._inputs is None or self._inputs.case != case:
            self._inputs = None
            measure.free_device_memory(self.device)
            self._inputs = make_inputs(case, self.device)
        return self._inputs

    def _prepare(self, inp: Inputs, group: Group, measured: dict) -> dict:
        runners = {}
        n = inp.case.layout.counted
        for c in self.contenders:
            m = measured[c.name]
            why = c.unsupported(group.op, group.mode)
            oom_at = self._oom.get((inp.case.head.name, group.op, group.mode, c.name))
            if why:
                m.status, m.note = "n/a", why
            elif oom_at is not None and n >= oom_at:
                m.status, m.note = "oom", f"skipped: ran out of memory at {oom_at} counted tokens"
            else:
                try:
                    runners[c.name] = c.prepare(inp, group.op, group.mode)
                except Exception as exc:  # noqa: BLE001
                    m.fail(exc)
        return runners

    def _cpu_memory(self, case: Case, group: Group, measured: dict) -> None:
        for c in self.contenders:
            m = measured[c.name]
            if c.kind == "floor" or m.status != "ok":
                continue
            probe = measure.cpu_peak_extra(case.name, c.name, group.op, group.mode, torch.get_num_threads())
            if probe.get("status") == "ok":
                m.peak_extra_bytes, m.mem_method = probe["peak_extra_bytes"], probe["mem_method"]
            else:
                m.mem_method = probe.get("note", "memory probe failed")

    def _measure(self, case: Case, group: Group) -> dict[str, measure.Measured]:
        measured = {c.name: measure.Measured() for c in self.contenders}
        try:
            inp = self._inputs_for(case)
        except Exception as exc:  # noqa: BLE001 — the inputs alone do not fit
            self._inputs = inp = None
            for m in measured.values():
                m.fail(exc)
        if inp is None:
            measure.free_device_memory(self.device)
            return measured
        runners = self._prepare(inp, group, measured)
        measure.timed_rounds(runners, measured, self.device, warmup=self.warmup, repeats=self.repeats,
                             dry_run=self.dry_run)
        del runners
        if self.memory and self.device.type == "cpu":
            self._cpu_memory(case, group, measured)
        for name, m in measured.items():
            if m.status == "oom" and not m.note.startswith("skipped"):
                self._oom[(case.head.name, group.op, group.mode, name)] = case.layout.counted
        return measured

    def run_group(self, group: Group, started: float) -> None:
        case = resolve_case(group.case)
        if self.dry_run:
            case = miniature_case(case)
        if self.budget_s is not None and time.perf_counter() - started > self.budget_s:
            measured = {c.name: measure.Measured(status="skipped", note="time budget used up")
                        for c in self.contenders}
        else:
            t0 = time.perf_counter()
            measured = self._measure(case, group)
            self.log(f"[kernels] {case.name} {group.op} {group.mode}: {time.perf_counter() - t0:.1f} s")
        records = [_summary(case, group, c, measured[c.name]) for c in self.contenders]
        _add_floor(records)
        _add_checks(records, measured)
        for r in records:
            r["case_info"] = case.describe()
            self.log(_line(r))
        self.records += records

    def run(self, plan: list[Group]) -> list[dict]:
        started = time.perf_counter()
        for group in plan:
            self.run_group(group, started)
        self._inputs = None
        measure.free_device_memory(self.device)
        return self.records


def _line(r: dict) -> str:
    if r["status"] != "ok":
        return f"    {r['contender']:<12} {r['status']}: {r['note']}"
    mem = f"{r['peak_extra_bytes'] / 2**20:9.1f} MiB" if r.get("peak_extra_bytes") is not None else "      - MiB"
    err = max(r.get("rel_err", {}).values(), default=None)
    err_s = f" err {err:.1e}" if err is not None else ""
    return f"    {r['contender']:<12} {r['median_s'] * 1e3:10.2f} ms {mem} {r.get('tflops', 0):7.3f} TFLOP/s{err_s}"
