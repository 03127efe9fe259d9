"""The environment record of a run (device, versions, commit) and the results folder's name.

Every JSON the runner writes carries this record; tables are written per run, so figures from
different devices or versions never share a table.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "triton", "transformers", "liger-kernel", "cut-cross-entropy", "trl", "spin_kernels", "numpy")


def cpu_model() -> str:
    from spin_kernels.ops.backends.cpu_rule import cpu_model as model

    return model()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    """e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc-2threads``."""
    if device.type == "cuda":
        return slugify(device_name(device))
    return f"cpu-{slugify(cpu_model())}-{torch.get_num_threads()}threads"


def git_commit() -> dict:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def versions() -> dict:
    out = {}
    for dist in PACKAGES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    out["torch"] = torch.__version__  # the one imported (a local build may differ from the metadata)
    out["cuda"] = torch.version.cuda
    out["python"] = platform.python_version()
    return out


def environment(device: torch.device) -> dict:
    """Everything needed to tell whether two runs are comparable."""
    from spin_kernels.ops import available_backends

    impls = available_backends(device)

    env = {
        "device_type": device.type,
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": versions(),
        "git": git_commit(),
        "impls": {"available": sorted(n for n, why in impls.items() if why is None),
                  "unavailable": {n: why for n, why in impls.items() if why is not None}},
    }
    if device.type == "cpu" and impls.get("cpu", "") is None:  # the rule impl="cpu" runs under (measured once, cached)
        from spin_kernels.ops.backends.cpu_rule import cpu_rule

        rule = cpu_rule()
        env["cpu_rule"] = {"describe": rule.describe(), **rule.to_json(), "source": rule.source}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {"name": props.name, "total_memory_bytes": props.total_memory,
                      "multiprocessors": props.multi_processor_count,
                      "capability": f"{props.major}.{props.minor}"}
    return env


def comparable_key(env: dict) -> tuple:
    """Two runs may share a table only if this key is equal (device and every version)."""
    return env["device_slug"], tuple(sorted((k, str(v)) for k, v in env["versions"].items()))
