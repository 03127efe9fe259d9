"""pytest-benchmark suites of benchmarks/ (``pytest benchmarks/ --benchmark-only``).

The repository's pytest.ini disables benchmarks (``--benchmark-disable``) so that the unit tests
under tests/ never time anything; this folder is collected only when named on the command
line, and then its benchmarks are enabled here. Select what runs with environment variables:

* ``SPIN_BENCH_DEVICE``  cpu | cuda (default: cuda when available)
* ``SPIN_BENCH_SHAPES``  kernel cases, comma-separated (default: cpu-small on CPU, llama3-8b@16k on CUDA)
* ``SPIN_BENCH_ONLY``    contenders, comma-separated (default: all available)
* ``SPIN_BENCH_E2E``     e2e cases, comma-separated (default: tiny on CPU, llama-1b on CUDA)
* ``SPIN_BENCH_REPEATS`` timed rounds per benchmark (default 3)

Peak memory and the GEMM floor ratios are figures of the runner (``python -m benchmarks run``),
not of pytest-benchmark, which only times.
"""

from __future__ import annotations

import os

import pytest
import torch


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.option.benchmark_enable = True


def bench_device() -> torch.device:
    return torch.device(os.environ.get("SPIN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    return [v.strip() for v in value.split(",") if v.strip()] if value else default


def bench_repeats() -> int:
    return int(os.environ.get("SPIN_BENCH_REPEATS", "3"))


def sync_after(fn, device: torch.device):
    """``fn`` followed by a device synchronisation (so that the timer sees the whole work)."""

    def wrapped():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return wrapped
