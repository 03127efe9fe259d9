"""Packing: tokenised SPIN pairs, the padding-free PackedBatch, and the micro-batch planner."""

from .batch import IGNORE_INDEX, PackedBatch, pack_batch
from .example import SpinExample, tokenize_example, tokenize_prompt, tokenize_response
from .planner import PackPlan, PackStats, plan_micro_batches
from .tokenizer import build_bpe_tokenizer, load_ultrachat_sample, sample_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "PackPlan",
    "PackStats",
    "PackedBatch",
    "SpinExample",
    "build_bpe_tokenizer",
    "load_ultrachat_sample",
    "pack_batch",
    "plan_micro_batches",
    "sample_tokenizer",
    "tokenize_example",
    "tokenize_prompt",
    "tokenize_response",
]
