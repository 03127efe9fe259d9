"""Peak RSS growth of one CPU run, measured in this fresh process (called by measure.py).

Usage: ``python -m benchmarks.memprobe '{"suite": "kernels", "case": "cpu-small", "contender": "naive",
"op": "spin_loss", "mode": "fwd+bwd", "threads": 2}'`` (``"suite": "e2e"``: ``contender`` is the
variant, ``op``/``mode`` unused); prints one JSON line:
``{"status": "ok", "peak_extra_bytes": ..., "mem_method": ...}``.

Method: build the inputs; if the kernel lets this process reset its peak RSS (writing 5 to
/proc/self/clear_refs resets VmHWM), run once to warm up (compilation, caches), drop the
outputs, read VmRSS, reset VmHWM, run once more: extra = VmHWM - VmRSS before. Otherwise run
once, cold: extra = ru_maxrss after the run - ru_maxrss after building the inputs.

The e2e suite runs the probe with ``MALLOC_MMAP_THRESHOLD_=65536`` (measure.cpu_peak_extra):
glibc then returns every freed tensor above 64 KiB to the system, so VmRSS after the warm run
holds no leftovers of its activations; the method string says so.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys

import torch


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS; True if the kernel allowed it."""
    before = _status_kib("VmHWM")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    after = _status_kib("VmHWM")
    return before is not None and after is not None and after <= before


def _runner(spec: dict):
    """The prepared work of ``spec``: a kernel contender on its case, or an e2e step."""
    device = torch.device("cpu")
    if spec.get("suite") == "e2e":
        from .e2e import CASES, Step

        return Step(CASES[spec["case"]], spec["contender"], device)
    from .contenders import all_contenders
    from .shapes import make_inputs, resolve_case

    contender = next(c for c in all_contenders(device) if c.name == spec["contender"])
    return contender.prepare(make_inputs(resolve_case(spec["case"]), device), spec["op"], spec["mode"])


def measure(spec: dict) -> dict:
    torch.set_num_threads(int(spec["threads"]))
    runner = _runner(spec)
    gc.collect()
    maxrss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if _reset_peak():
        runner.run()
        runner.zero_grad()
        gc.collect()
        base = _status_kib("VmRSS")
        _reset_peak()
        out = runner.run()
        peak = _status_kib("VmHWM")
        del out
        threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        return {"status": "ok", "peak_extra_bytes": (peak - base) * 1024,
                "mem_method": "VmHWM - VmRSS around one warm run (peak reset via /proc/self/clear_refs)"
                              + (f", MALLOC_MMAP_THRESHOLD_={threshold}" if threshold else "")}
    out = runner.run()
    del out
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_inputs
    return {"status": "ok", "peak_extra_bytes": grown * 1024,
            "mem_method": "ru_maxrss after one cold run - ru_maxrss after building inputs"}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    try:
        result = measure(spec)
    except Exception as exc:  # noqa: BLE001
        result = {"status": "oom" if "memory" in str(exc).lower() else "error",
                  "note": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
