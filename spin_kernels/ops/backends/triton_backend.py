"""impl="triton": the fused Triton kernels of spin_kernels/triton behind the Backend contract.

The kernel modules are imported on first use, not here, so that importing spin_kernels
compiles nothing. On CPU tensors the kernels need ``TRITON_INTERPRET=1`` set before Triton is
first imported (tests/conftest.py does it for the test session).

float64 inputs (gradcheck precision) have no tensor-core path: they go to the torch backend.
The kernels read the counted rows of hidden through the row index and write dhidden through it:
no gathered [M, H] copy, no scatter. They take the padded row layout (``pads_rows``): the number
of counted rows stays on the device, so no call of this backend waits for the GPU.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import triton  # noqa: F401  (ImportError here = the backend is unavailable, see backends/__init__)

from .base import Backend, Grads, Needs, RowLogprobs, Upstream
from .torch_chunked import TorchChunked

if TYPE_CHECKING:
    from ..options import HeadOptions

GRAD_FILTER_ENV = "SPIN_KERNELS_GRAD_FILTER"


def filter_eps_for(dtype: torch.dtype, setting: str | float | None) -> float:
    """The gradient-filter threshold: None/"off"/0 → 0 (exact); "auto" → the input dtype's
    threshold in ``AUTO_FILTER``; a number → that number."""
    if setting is None or setting == "off":
        return 0.0
    if setting == "auto":
        return AUTO_FILTER[dtype]
    value = float(setting)
    if not value >= 0:
        raise ValueError(f"grad filter must be 'off', 'auto' or a number >= 0, got {setting!r}")
    return value


# bf16: CCE's threshold (2⁻¹², 4 bits below bf16's unit roundoff 2⁻⁸ near 1); fp16 and fp32
# keep the same 4-bit margin below their own roundoff (2⁻¹¹, 2⁻²⁴).
AUTO_FILTER = {torch.bfloat16: 2.0**-12, torch.float16: 2.0**-15, torch.float32: 2.0**-28}


def _long(index: torch.Tensor | None) -> torch.Tensor | None:
    return None if index is None else index.long().contiguous()


class TritonBackend(Backend):
    """Fused kernels; ``grad_filter`` ("off" default, "auto", or a threshold) controls gradient
    filtering in the backward (default read from $SPIN_KERNELS_GRAD_FILTER); ``workspace_bytes``
    bounds the backward's scratch memory, its buffer of logit gradients and the fp32 ∂hidden of a
    row block (None: the kernels' default, 56 MiB; see ``spin_kernels.triton.backward``)."""

    name = "triton"

    def __init__(self, grad_filter: str | float | None = None, workspace_bytes: int | None = None):
        self.grad_filter = os.environ.get(GRAD_FILTER_ENV, "off") if grad_filter is None else grad_filter
        filter_eps_for(torch.float32, self.grad_filter)  # fail early on a bad setting
        if workspace_bytes is not None and workspace_bytes < 1:
            raise ValueError(f"workspace_bytes must be >= 1, got {workspace_bytes}")
        self.workspace_bytes = workspace_bytes
        self._fallback = TorchChunked()

    def __repr__(self) -> str:
        return f"triton(grad_filter={self.grad_filter!r}, workspace_bytes={self.workspace_bytes})"

    def unavailable_on(self, device: torch.device) -> str | None:
        if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
            return None
        return "it needs CUDA tensors (or TRITON_INTERPRET=1, set before Triton is imported, for CPU tensors)"

    @staticmethod
    def _is_f64(*tensors) -> bool:
        return any(t is not None and t.dtype == torch.float64 for t in tensors)

    def rows_forward(self, hidden, weight, bias, targets, opts: HeadOptions, index=None, count=None):
        if self._is_f64(hidden, weight, bias):
            return self._fallback.rows_forward(hidden, weight, bias, targets, opts, index)
        from ...triton.forward import rows_logprobs

        return RowLogprobs(*rows_logprobs(hidden, weight, bias, targets, opts.temperature, opts.softcap,
                                          index=_long(index), count=count, stats=opts.row_stats))

    def pads_rows(self, hidden, weight, bias) -> bool:
        return not self._is_f64(hidden, weight, bias)  # float64 goes to the torch path: exact rows

    def rows_backward(self, hidden, weight, bias, targets, upstream: Upstream, opts: HeadOptions, needs: Needs,
                      index=None, count=None):
        if self._is_f64(hidden, weight, bias):
            return self._fallback.rows_backward(hidden, weight, bias, targets, upstream, opts, needs, index)
        from ...triton.backward import rows_grads

        budget = {} if self.workspace_bytes is None else {"workspace_bytes": self.workspace_bytes}
        return Grads(*rows_grads(hidden, weight, bias, targets, upstream.lse, upstream.grad, opts.temperature,
                                 opts.softcap, needs.hidden, needs.weight, needs.bias, index=_long(index),
                                 filter_eps=filter_eps_for(weight.dtype, self.grad_filter), count=count,
                                 entropy=upstream.entropy, grad_entropy=upstream.grad_entropy, **budget))


def make_backend() -> Backend:
    return TritonBackend()
