"""The tiny TRL setting shared by the TRL trainer tests (one and two processes).

A Llama built from a config (vocabulary of the offline UltraChat BPE, 4,096 tokens; H = 64,
2 layers, fp32), SPIN rows from the bundled UltraChat sample (synthetic responses borrowed from
other rows), and DPOConfig defaults fit for CPU tests (no bf16, no gradient checkpointing, no
reports, no checkpoints).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings the Hub when a trainer is built
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).resolve().parent / "data" / "ultrachat_sample.jsonl"


def tokenizer():
    from spin_kernels.packing import sample_tokenizer

    return sample_tokenizer()


def spin_rows(n: int = 8, *, offset: int = 0) -> list[dict]:
    """``n`` rows {prompt, real, synthetic}: texts cut to a few hundred characters, each synthetic
    response another row's real one (so that prompts and responses differ in length)."""
    with open(DATA) as f:
        rows = [json.loads(line) for line in f][offset:offset + n + 1]
    return [{"prompt": r["prompt"][:160 + 20 * (i % 3)], "real": r["real"][:120 + 40 * (i % 4)],
             "synthetic": rows[i + 1]["real"][:90 + 30 * (i % 5)]} for i, r in enumerate(rows[:n])]


def as_dpo(rows: list[dict]) -> list[dict]:
    """The same rows with DPO's column names."""
    return [{"prompt": r["prompt"], "chosen": r["real"], "rejected": r["synthetic"]} for r in rows]


def tiny_llama(tok, *, seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def policy_and_reference(tok, *, noise: float = 0.02, seed: int = 0):
    """(policy, reference): the policy is the reference plus noise, so that rewards are not all 0."""
    ref = tiny_llama(tok, seed=seed)
    policy = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return policy, ref.requires_grad_(False)


def dpo_config(out: str, **overrides):
    from trl import DPOConfig

    kw = dict(output_dir=out, per_device_train_batch_size=4, max_steps=2, bf16=False, gradient_checkpointing=False,
              report_to=[], logging_steps=1, use_cpu=True, save_strategy="no", max_length=96, beta=2.0,
              train_sampling_strategy="sequential", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    kw.update(overrides)
    return DPOConfig(**kw)
