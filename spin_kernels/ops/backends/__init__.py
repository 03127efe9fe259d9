"""Backend registry: ``impl`` name + device -> a Backend.

* "torch"  — chunked PyTorch (any device), always available.
* "triton" — fused Triton kernels (CUDA; CPU tensors only under TRITON_INTERPRET=1).
* "cpu"    — the C++/OpenMP kernels of csrc/ (CPU tensors).
* "auto"   — triton on CUDA, cpu on CPU, falling back to torch where those are unavailable.

A backend whose module is missing is registered as unavailable, with the reason; asking for it
by name then raises an error that gives it. A *configured* backend (other tiles, a workspace
budget, a gradient filter) is registered under a name of its own (``register_backend``, or
``as_impl`` which names it after its configuration) and used as ``impl=<name>``: the name, not
the instance, travels through the custom ops (a ``torch.library`` op takes no Python objects),
so the configured backend runs in eager and compiled mode alike, backward included.

``available_backends(device)`` says which names run on a device: ``{name: None}`` for those that
do, ``{name: reason}`` for the others.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from .base import STAT_ROWS, Backend, Grads, Needs, RowLogprobs, SpinResult, Upstream
from .torch_chunked import TorchChunked

Factory = Callable[[], Backend]
_FACTORIES: dict[str, Factory] = {"torch": TorchChunked}
_UNAVAILABLE: dict[str, str] = {}  # name -> why it is not installed here
_warned: set[str] = set()
_BUILTIN = ("torch", "triton", "cpu")


def register_backend(name: str, backend: Backend | Factory | None, why_unavailable: str = "") -> None:
    """Register ``backend`` (an instance, used as is, or a zero-argument factory) under ``name``,
    replacing any backend of that name; None records why ``name`` cannot be used here."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"a backend name must be a non-empty string other than 'auto', got {name!r}")
    if backend is None:
        _FACTORIES.pop(name, None)
        _UNAVAILABLE[name] = why_unavailable
        return
    _FACTORIES[name] = (lambda: backend) if isinstance(backend, Backend) else backend
    _UNAVAILABLE.pop(name, None)


def as_impl(backend: Backend) -> str:
    """Register a configured backend instance under its ``repr`` (its name and configuration,
    e.g. ``"cpu(store_bytes=0, parts=2, row_tile=None, vocab_tile=512, gemm='auto')"``) and
    return that name, to pass as ``impl=``. Registering an equal configuration again replaces
    the entry, so the registry grows with the configurations used, not with the calls."""
    name = repr(backend)
    register_backend(name, backend)
    return name


def known_impls() -> tuple[str, ...]:
    """Every ``impl`` an op accepts: "auto" and every registered name, available or not (the
    built-in ones first)."""
    names = sorted(set(_FACTORIES) | set(_UNAVAILABLE), key=lambda n: (n not in _BUILTIN, _BUILTIN.index(n)
                                                                      if n in _BUILTIN else 0, n))
    return ("auto", *names)


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


def available_backends(device: torch.device | str) -> dict[str, str | None]:
    """Every registered backend name -> None if it runs on ``device``, else why not.

    None (not "") marks an available backend, so that ``available_backends(d)[name] is None``
    reads as what it means, and a reason is always a non-empty clause, e.g. "the C++ extension
    spin_kernels._C is not built (...)" or "it needs CUDA tensors (...)". The built-in names come
    first ("torch", "triton", "cpu"), then configured ones. "auto" is not a backend: it picks one
    of these (``resolve_backend``).
    """
    device = torch.device(device)
    return {name: _UNAVAILABLE[name] if name in _UNAVAILABLE else _FACTORIES[name]().unavailable_on(device)
            for name in known_impls()[1:]}


def resolve_backend(impl: str, device: torch.device) -> Backend:
    """The backend for ``impl`` on ``device``; raises ValueError/RuntimeError if unusable."""
    if impl == "auto":
        wanted = "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else "torch"
        if wanted in _FACTORIES:
            backend = _FACTORIES[wanted]()
            if backend.unavailable_on(device) is None:
                return backend
        if wanted in _UNAVAILABLE and wanted not in _warned:
            _warned.add(wanted)
            warnings.warn(f"spin_kernels: impl='auto' falls back to impl='torch' on {device.type}: "
                          f"{_UNAVAILABLE[wanted]}", RuntimeWarning, stacklevel=3)
        return _FACTORIES["torch"]()
    if impl not in _FACTORIES:
        raise RuntimeError(f"impl={impl!r} is not available: {_UNAVAILABLE.get(impl, 'no backend of that name')}")
    backend = _FACTORIES[impl]()
    why = backend.unavailable_on(device)
    if why is not None:
        raise ValueError(f"impl={impl!r} cannot run on {device}: {why}")
    return backend


__all__ = ["STAT_ROWS", "Backend", "Grads", "Needs", "RowLogprobs", "SpinResult", "TorchChunked", "Upstream", "as_impl",
           "available_backends", "known_impls", "register_backend", "resolve_backend"]
