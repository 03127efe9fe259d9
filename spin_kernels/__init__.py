"""spin_kernels: fused kernels and a packed trainer for SPIN (Self-Play Fine-Tuning).

Public API: the fused ops (per-sequence log-probs and the SPIN loss straight from hidden
states and the lm_head), and — as later layers land — the packed batch, the model helper and
the trainer entry points.
"""

from .ops import LinearSPINLoss, linear_logprobs, linear_spin_loss, spin_loss

__version__ = "0.1.0"

__all__ = ["LinearSPINLoss", "linear_logprobs", "linear_spin_loss", "spin_loss", "__version__"]
