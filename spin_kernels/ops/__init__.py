"""The op layer, the only caller of kernels. One path per op, in eager and compiled modes alike:

* ``api.py`` — the public functions and module: options built and validated once
  (``options.py``), the tensors checked (``validation.py``), then
* ``autograd.py`` — one autograd Function per op, which calls
* ``library.py`` — the op as a ``torch.library`` custom op (with its fake): value checks,
  counted rows (``layout.py``), the backend's kernels (``backends/``), the SPIN epilogue
  (``objective.py``).

``doc.py`` holds the argument docs the ops share; ``naive.py`` the full-logits oracle.
"""

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
