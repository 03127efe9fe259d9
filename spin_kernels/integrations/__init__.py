"""Integrations of spin_kernels into other frameworks' trainers.

Each integration is its own module and imports its framework only when it is imported itself,
so ``import spin_kernels`` never needs them installed:

* ``spin_kernels.integrations.trl``: ``SPINTrainer``, a TRL ``DPOTrainer`` that trains on
  padding-free packed batches with the fused ops, every DPO loss type (needs ``pip install trl``);
* ``spin_kernels.integrations.dpo_losses``: ``DPOLoss``, TRL's DPO losses on per-sequence
  log-probs (plain torch: no TRL needed), what ``SPINTrainer`` feeds the fused log-probs to.

Dependencies point one way: integrations import spin_kernels, never the reverse.
"""
