"""Hugging Face integration: varlen attention for packed batches, hidden states without the
lm_head, and the SPIN loss / reference pass on a PackedBatch."""

from .attention import (
    ATTN_IMPLEMENTATION,
    register_attention,
    varlen_attention,
    varlen_backend,
)
from .integration import (
    check_supported,
    is_prepared,
    lm_head_kwargs,
    packed_hidden_states,
    packed_spin_loss,
    prepare_model,
    reference_logps,
    sequence_logps,
    unwrap_model,
)
from .shared_prompt import SharedPromptLayout, shared_prompt_backend

__all__ = [
    "ATTN_IMPLEMENTATION",
    "check_supported",
    "is_prepared",
    "lm_head_kwargs",
    "packed_hidden_states",
    "packed_spin_loss",
    "prepare_model",
    "reference_logps",
    "register_attention",
    "sequence_logps",
    "SharedPromptLayout",
    "shared_prompt_backend",
    "unwrap_model",
    "varlen_attention",
    "varlen_backend",
]
