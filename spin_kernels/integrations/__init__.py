"""Integrations of spin_kernels into other frameworks' trainers.

Each integration is its own module and imports its framework only when it is imported itself,
so ``import spin_kernels`` never needs them installed:

* ``spin_kernels.integrations.trl``: ``SPINTrainer``, a TRL ``DPOTrainer`` that trains on
  padding-free packed batches with the fused ``linear_spin_loss`` (needs ``pip install trl``).

Dependencies point one way: integrations import spin_kernels, never the reverse.
"""
