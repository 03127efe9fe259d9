"""The op layer, the only caller of kernels. One path per op, in eager and compiled modes alike:

* ``api.py`` — the public functions and module on packed rows (``batched.py``: the same on
  ``[B, T, H]`` inputs with labels, a mask and ``shift``): options built and validated once
  (``options.py``), the tensors checked (``validation.py``), then
* ``autograd.py`` — one autograd Function per op, which calls
* ``library.py`` — the op as a ``torch.library`` custom op (with its fake): value checks,
  counted rows (``layout.py``), the backend's kernels (``backends/``), the SPIN epilogue
  (``objective.py``).

``doc.py`` holds the argument docs the ops share; ``naive.py`` the full-logits oracle.

Backends: ``available_backends(device)`` says which ``impl`` names run on a device
(``{name: None}`` if it does, ``{name: reason}`` if not); ``register_backend`` / ``as_impl`` add a
configured backend under a name of its own (docs/ops.md).
"""

from .api import LinearSPINLoss, linear_logprobs, linear_spin_loss
from .backends import as_impl, available_backends, register_backend
from .batched import batched_linear_logprobs, batched_linear_spin_loss
from .naive import naive_linear_logprobs, naive_linear_spin_loss
from .objective import spin_loss

__all__ = [
    "LinearSPINLoss",
    "as_impl",
    "available_backends",
    "batched_linear_logprobs",
    "batched_linear_spin_loss",
    "linear_logprobs",
    "linear_spin_loss",
    "naive_linear_logprobs",
    "naive_linear_spin_loss",
    "register_backend",
    "spin_loss",
]
