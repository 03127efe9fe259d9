"""spin_kernels: fused kernels and a packed trainer for SPIN (Self-Play Fine-Tuning).

Public API:
* the fused ops — ``linear_logprobs``, ``linear_spin_loss``, ``LinearSPINLoss``, ``spin_loss``;
* packed batches — ``SpinExample``, ``tokenize_example``, ``PackedBatch``, ``pack_batch``,
  ``plan_micro_batches``;
* the model helpers — ``prepare_model``, ``packed_spin_loss``, ``reference_logps``;
* the trainer entry points — ``SpinConfig``, ``train_spin``, ``run_iterations``.

The packing, model and trainer names are imported on first use so that ``import spin_kernels``
stays as light as the ops.
"""

from __future__ import annotations

import importlib

from .ops import LinearSPINLoss, linear_logprobs, linear_spin_loss, spin_loss

__version__ = "0.1.0"

_LAZY = {
    "SpinExample": "spin_kernels.packing",
    "tokenize_example": "spin_kernels.packing",
    "PackedBatch": "spin_kernels.packing",
    "pack_batch": "spin_kernels.packing",
    "plan_micro_batches": "spin_kernels.packing",
    "prepare_model": "spin_kernels.models",
    "packed_spin_loss": "spin_kernels.models",
    "reference_logps": "spin_kernels.models",
    "SpinConfig": "spin_kernels.training",
    "train_spin": "spin_kernels.training",
    "run_iterations": "spin_kernels.training",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spin_kernels' has no attribute {name!r}")


__all__ = ["LinearSPINLoss", "linear_logprobs", "linear_spin_loss", "spin_loss", "__version__", *_LAZY]
