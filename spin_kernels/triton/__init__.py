"""Triton kernels of the fused head: per-row log-sum-exp / log-prob and their gradients.

Pure kernels and their launchers: no autograd, no validation, no trainer (the op layer,
``spin_kernels.ops``, owns those). Importing this package compiles nothing; the kernels are
built on first launch.

* ``forward.rows_logprobs``: per-row log-prob and log-sum-exp (2·M·H·V flops, no [M, V] buffer);
* ``backward.rows_grads``: ∂hidden, ∂weight, ∂bias from per-row scales (8·M·H·V, recomputing);
* ``tiles``: the shared on-chip logit tile and its gradient; ``config``: block sizes.

To run on CPU tensors set ``TRITON_INTERPRET=1`` before Triton is first imported in the
process (Triton chooses interpreter or compiler when a kernel, its own ``triton.language``
helpers included, is defined).
"""
