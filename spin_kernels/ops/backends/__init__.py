"""Backend registry: ``impl`` name + device -> a Backend.

* "torch"  — chunked PyTorch (any device), always available.
* "triton" — fused Triton kernels (CUDA; CPU tensors only under TRITON_INTERPRET=1).
* "cpu"    — the C++/OpenMP kernels of csrc/ (CPU tensors).
* "auto"   — triton on CUDA, cpu on CPU, falling back to torch where those are unavailable.

A backend whose module is missing is simply not registered; asking for it by name then raises
a clear error.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from .base import Backend, HeadSpec, Needs
from .torch_chunked import TorchChunked

_FACTORIES: dict[str, Callable[[], Backend]] = {"torch": TorchChunked}
_UNAVAILABLE: dict[str, str] = {}
_warned: set[str] = set()


def register_backend(name: str, factory: Callable[[], Backend] | None, why_unavailable: str = "") -> None:
    """Add a backend (or record why it cannot be used on this installation)."""
    if factory is None:
        _UNAVAILABLE[name] = why_unavailable
    else:
        _FACTORIES[name] = factory
        _UNAVAILABLE.pop(name, None)


def _load_optional_backends() -> None:
    try:
        from .triton_backend import make_backend as make_triton
    except ImportError as exc:  # triton itself missing, or the kernels module not built yet
        register_backend("triton", None, f"Triton is not importable ({exc})")
    else:
        register_backend("triton", make_triton)
    try:
        from .cpu_backend import make_backend as make_cpu
    except ImportError as exc:  # the C++ extension was not built
        register_backend("cpu", None, f"the C++ extension spin_kernels._C is not built ({exc})")
    else:
        register_backend("cpu", make_cpu)


_load_optional_backends()


def _triton_can_run(device: torch.device) -> bool:
    import os

    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(impl: str, device: torch.device) -> Backend:
    """The backend for ``impl`` on ``device``; raises ValueError/RuntimeError if unusable."""
    if impl == "auto":
        wanted = "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else "torch"
        if wanted in _FACTORIES and (wanted != "triton" or _triton_can_run(device)):
            return _FACTORIES[wanted]()
        if wanted in _UNAVAILABLE and wanted not in _warned:
            _warned.add(wanted)
            warnings.warn(f"spin_kernels: impl='auto' falls back to impl='torch' on {device.type}: "
                          f"{_UNAVAILABLE[wanted]}", RuntimeWarning, stacklevel=3)
        return _FACTORIES["torch"]()
    if impl not in _FACTORIES:
        raise RuntimeError(f"impl={impl!r} is not available: {_UNAVAILABLE.get(impl, 'not implemented')}")
    if impl == "triton" and not _triton_can_run(device):
        raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got device {device}")
    if impl == "cpu" and device.type != "cpu":
        raise ValueError(f"impl='cpu' needs CPU tensors, got device {device}")
    return _FACTORIES[impl]()


__all__ = ["Backend", "HeadSpec", "Needs", "TorchChunked", "register_backend", "resolve_backend"]
