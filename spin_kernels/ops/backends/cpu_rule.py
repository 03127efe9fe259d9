"""How the C++ CPU kernel runs on this machine: its matrix engine and whether it keeps logits.

Two choices decide the speed of ``impl="cpu"`` (and ``impl="auto"`` on CPU) and neither has one
right answer for every x86-64 CPU:

* the **matrix engine** of its tile products: oneDNN (JIT code for the widest vector unit the
  CPU has) or BLAS (MKL in the x86 torch wheels). On AMD EPYC the wheel's MKL runs its AVX2 code
  (MKL dispatches on the CPU vendor) and oneDNN is ~2× faster; on an Intel Xeon both run
  AVX-512 at about the same rate.
* **keep or recompute the logits** in the SPIN path: keeping a group of whole pairs' logits from
  the forward to the gradient pass costs 6·N·H·V flops and the memory of those logits;
  recomputing them costs 8·N·H·V and no memory.

So the kernel measures both once per machine (a probe of about two seconds: the kernel's own
forward on [512, 1024] × [8192, 1024] with each engine, then the SPIN forward+backward of two
pairs kept and recomputed, each timed three times alternately, the minimum kept), and caches
the *rule* on disk. Later processes read the cached rule, so a machine's numerics never change
between runs (the two engines round differently, and keeping logits changes the order of
the ∂weight sums): a rule changes only when the cache file is removed, when ``SPIN_KERNELS_CPU_RULE``
says otherwise, or when the key changes (CPU model, its vector extensions, torch threads, torch
version, oneDNN available or not).

Override (``SPIN_KERNELS_CPU_RULE``):

* unset or ``auto``: the cached rule, measured on first use;
* ``measure``: measure again now and replace the cached rule;
* ``default``: no measurement: oneDNN when torch exports it, keep logits within the budget;
* ``<engine>:<logits>[:<budget>]``, e.g. ``onednn:keep``, ``blas:recompute``, ``blas:keep:96M``:
  exactly that (engine ``onednn`` or ``blas``, logits ``keep`` or ``recompute``, budget bytes
  with an optional K/M/G suffix, default 256 MiB).

Cache: ``$SPIN_KERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/spin_kernels``, else
``~/.cache/spin_kernels``; one ``cpu-rule-<key digest>.json`` per key. ``CpuFused(gemm=...,
store_bytes=...)`` given explicitly bypasses the rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ENV_RULE = "SPIN_KERNELS_CPU_RULE"
ENV_CACHE_DIR = "SPIN_KERNELS_CACHE_DIR"
#: Bump when the measurement or the meaning of a rule changes: older cache files are then ignored.
RULE_VERSION = 1
#: The most logits the SPIN path keeps: the torch path's logits budget (the same bytes buy the
#: same 6·N·H·V pairs), so impl="cpu" never recomputes a pair that impl="torch" keeps.
DEFAULT_STORE_BUDGET = 256 * 2**20
#: The probe: the kernel's forward on [PROBE_ROWS, PROBE_HIDDEN] rows against a [PROBE_VOCAB,
#: PROBE_HIDDEN] head, and the SPIN path on two pairs of the same rows.
PROBE_ROWS, PROBE_HIDDEN, PROBE_VOCAB, PROBE_REPEATS = 512, 1024, 8192, 3
ENGINES = ("onednn", "blas")
_VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "asimd", "sve")

_RULES: dict[str, CpuRule] = {}  # per key: one rule per process


@dataclasses.dataclass(frozen=True)
class CpuRule:
    """The C++ kernel's choices on this machine.

    Attributes:
        gemm: "onednn" or "blas", the matrix engine of the tile products.
        keep_logits: the SPIN path keeps the logits of groups of whole pairs within
            ``store_budget`` bytes (6·N·H·V) rather than recomputing them (8·N·H·V).
        store_budget: bytes of logits the SPIN path may keep (used only with keep_logits).
        source: "measured" (now), "cache" (a file of an earlier measurement), "env" (forced by
            SPIN_KERNELS_CPU_RULE) or "default" (no measurement).
        key: what the rule is valid for (CPU model, vector extensions, threads, torch, oneDNN).
        measurements: the probe's timings in seconds ({} without a measurement).
        path: the cache file, when there is one.
    """

    gemm: str
    keep_logits: bool
    store_budget: int = DEFAULT_STORE_BUDGET
    source: str = "default"
    key: dict[str, Any] = dataclasses.field(default_factory=dict)
    measurements: dict[str, Any] = dataclasses.field(default_factory=dict)
    path: str | None = None

    @property
    def store_bytes(self) -> int:
        """The ``CpuFused(store_bytes=...)`` this rule stands for (0: recompute)."""
        return self.store_budget if self.keep_logits else 0

    def describe(self) -> str:
        logits = f"keep logits <= {self.store_budget / 2**20:.0f} MiB (6NHV)" if self.keep_logits \
            else "recompute logits (8NHV)"
        return f"gemm={self.gemm}, {logits} [{self.source}]"

    def to_json(self) -> dict[str, Any]:
        return {"gemm": self.gemm, "keep_logits": self.keep_logits, "store_budget": self.store_budget,
                "key": self.key, "measurements": self.measurements}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), e.g. "AMD EPYC" or "Intel(R) Xeon(R) ..."."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _vector_flags() -> list[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in _VECTOR_FLAGS if f in have]
    return []


def onednn_available() -> bool:
    from .cpu_backend import default_gemm

    return default_gemm() == "onednn"


@functools.cache
def _machine() -> tuple[str, tuple[str, ...], str, bool]:
    return cpu_model(), tuple(_vector_flags()), torch.__version__, onednn_available()


def machine_key(threads: int | None = None) -> dict[str, Any]:
    """What a measured rule holds for: this CPU model and vector extensions, the torch thread
    count (``threads``, default torch's), the torch version and whether oneDNN is exported."""
    cpu, flags, version, onednn = _machine()
    return {"cpu": cpu, "flags": list(flags), "threads": threads or torch.get_num_threads(), "torch": version,
            "onednn": onednn, "version": RULE_VERSION}


def cache_dir() -> Path:
    """Where measured rules are kept (see the module docstring)."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spin_kernels"


def _key_text(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def cache_path(key: dict[str, Any]) -> Path:
    return cache_dir() / f"cpu-rule-{hashlib.sha256(_key_text(key).encode()).hexdigest()[:16]}.json"


def parse_budget(text: str) -> int:
    """"256M" -> bytes (suffixes K, M, G: powers of 1024); a plain integer is bytes."""
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    value = float(t[:-1]) * mult[t[-1]] if t and t[-1] in mult else float(t)
    if value < 0:
        raise ValueError("negative")
    return int(value)


def parse_rule(text: str, key: dict[str, Any]) -> CpuRule:
    """A forced rule ``<engine>:<logits>[:<budget>]`` (see the module docstring)."""
    parts = text.strip().split(":")
    problem = None
    if len(parts) not in (2, 3) or parts[0] not in ENGINES or parts[1] not in ("keep", "recompute"):
        problem = "expected <engine>:<logits>[:<budget>] with engine onednn|blas and logits keep|recompute"
    budget = DEFAULT_STORE_BUDGET
    if problem is None and len(parts) == 3:
        try:
            budget = parse_budget(parts[2])
        except (ValueError, IndexError):
            problem = f"budget {parts[2]!r} is not a byte count (e.g. 96M)"
    if problem is None and parts[0] == "onednn" and not key["onednn"]:
        problem = "this torch does not export oneDNN's matmul; use blas"
    if problem:
        raise ValueError(f"{ENV_RULE}={text!r}: {problem}; or one of auto, measure, default")
    return CpuRule(parts[0], parts[1] == "keep", budget, "env", key)


def default_rule(key: dict[str, Any]) -> CpuRule:
    """The rule without a measurement: oneDNN where torch exports it, logits kept."""
    return CpuRule("onednn" if key["onednn"] else "blas", True, DEFAULT_STORE_BUDGET, "default", key)


# -- the measurement ----------------------------------------------------------------------------

def _probe_inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(PROBE_ROWS, PROBE_HIDDEN, generator=g)
    w = torch.randn(PROBE_VOCAB, PROBE_HIDDEN, generator=g) * (4.0 / PROBE_HIDDEN**0.5)
    y = torch.randint(0, PROBE_VOCAB, (PROBE_ROWS,), generator=g)
    return h, w, y


def measure_rule(key: dict[str, Any]) -> CpuRule:
    """Time the kernel on the probe with each engine, then keep vs recompute with the faster one.

    Each candidate runs once to warm up (oneDNN compiles its kernels on first use), then
    ``PROBE_REPEATS`` times in alternation, so that a load on a shared machine hits all alike;
    the minimum time of each is compared (the least disturbed run). Ties go to the first
    candidate: oneDNN, and keeping the logits.
    """
    from ..layout import CountedRows
    from ..options import SpinOptions
    from .base import Needs
    from .cpu_backend import CpuFused

    h, w, y = _probe_inputs()
    ops = torch.ops.spin_kernels_cpu
    engines = [e for e in ENGINES if e != "onednn" or key["onednn"]]
    tiling = CpuFused(gemm="blas", store_bytes=0)._tiling(PROBE_HIDDEN)

    def forward(engine):
        return lambda: ops.rows_forward(h, w, None, y, 1.0, 0.0, None, *tiling, None, engine)

    forward_s = _alternate({e: forward(e) for e in engines})
    gemm = min(engines, key=lambda e: min(forward_s[e]))

    # Two pairs of PROBE_ROWS / 2 counted rows each (4 sequences of PROBE_ROWS / 4).
    cu = torch.arange(0, PROBE_ROWS + 1, PROBE_ROWS // 4, dtype=torch.int32)
    rows = CountedRows.build(y, cu, -100)
    ref = torch.zeros(4)
    args = (w, None, rows, ref, SpinOptions(beta=0.1, loss_type="sigmoid"), Needs())

    def spin(store_bytes):
        backend = CpuFused(gemm=gemm, store_bytes=store_bytes)
        return lambda: backend.spin_forward_backward(h, *args)

    spin_s = _alternate({"keep": spin(DEFAULT_STORE_BUDGET), "recompute": spin(0)})
    keep = min(spin_s["keep"]) <= min(spin_s["recompute"])
    probe = {"rows": PROBE_ROWS, "hidden": PROBE_HIDDEN, "vocab": PROBE_VOCAB, "repeats": PROBE_REPEATS}
    return CpuRule(gemm, keep, DEFAULT_STORE_BUDGET, "measured", key,
                   {"probe": probe, "forward_s": forward_s, "spin_fwd_bwd_s": spin_s})


def _alternate(runs: dict[str, Any]) -> dict[str, list[float]]:
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(PROBE_REPEATS):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(round(time.perf_counter() - t0, 6))
    return times


# -- the cache ----------------------------------------------------------------------------------

def _read_cached(path: Path, key: dict[str, Any]) -> CpuRule | None:
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key or data["gemm"] not in ENGINES:
            return None
        if data["gemm"] == "onednn" and not key["onednn"]:
            return None
        return CpuRule(data["gemm"], bool(data["keep_logits"]), int(data["store_budget"]), "cache", key,
                       data.get("measurements", {}), str(path))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cached(path: Path, rule: CpuRule) -> CpuRule:
    """Write atomically (concurrent processes see the old file or the new one, never a torn one)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump({**rule.to_json(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, fh, indent=1)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: the rule still holds for this process
        print(f"spin_kernels: could not cache the CPU kernel rule in {path} ({exc})", file=sys.stderr)
        return rule
    return dataclasses.replace(rule, path=str(path))


@contextlib.contextmanager
def _machine_lock(path: Path):
    """One measuring process at a time (several ranks on one machine would disturb each other's
    timings, and could pick different rules): the others wait and read its result."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(str(path) + ".lock", "w")  # noqa: SIM115 - held for the with-block
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def cpu_rule(threads: int | None = None) -> CpuRule:
    """The rule for ``threads`` torch threads (default: torch's current count); see the module
    docstring for where it comes from. Decided once per process and key."""
    key = machine_key(threads)
    mode = os.environ.get(ENV_RULE, "auto").strip() or "auto"
    memo = f"{mode}|{cache_dir()}|{_key_text(key)}"
    if memo in _RULES:
        return _RULES[memo]
    if mode == "default":
        rule = default_rule(key)
    elif mode in ("auto", "measure"):
        path = cache_path(key)
        with _machine_lock(path):
            rule = _read_cached(path, key) if mode == "auto" else None
            if rule is None:
                rule = _write_cached(path, measure_rule(key))
                print(f"spin_kernels: measured the CPU kernel's rule for {key['cpu']} ({key['threads']} threads): "
                      f"{rule.describe()}; cached in {rule.path or 'memory only'} ({ENV_RULE} overrides)",
                      file=sys.stderr)
    else:
        rule = parse_rule(mode, key)
    _RULES[memo] = rule
    return rule


__all__ = ["CpuRule", "DEFAULT_STORE_BUDGET", "ENV_CACHE_DIR", "ENV_RULE", "cache_dir", "cache_path", "cpu_model",
           "cpu_rule", "default_rule", "machine_key", "measure_rule", "parse_rule"]
