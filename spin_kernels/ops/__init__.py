"""The op layer: validation, autograd and dispatch by device; the only caller of kernels."""

from .api import LinearSPINLoss, linear_logprobs, linear_spin_loss
from .naive import naive_linear_logprobs, naive_linear_spin_loss
from .objective import spin_loss

__all__ = [
    "LinearSPINLoss",
    "linear_logprobs",
    "linear_spin_loss",
    "naive_linear_logprobs",
    "naive_linear_spin_loss",
    "spin_loss",
]
