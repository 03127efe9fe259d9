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

from spin_kernels.packing import IGNORE_INDEX

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings the Hub when a trainer is built
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).resolve().parent / "data" / "ultrachat_sample.jsonl"
# fp32 rounding: TRL's padded SDPA attention and chunked log-softmax against packed varlen
# attention and the fused loss sum in different orders. Measured: up to ~2e-5 relative on the
# gradients; a wrong sequence, token mask or reference moves them by 1e-2 or more (one token
# more or less changes a log-prob by ~log V = 8.3).
RTOL, ATOL = 1e-4, 1e-7
# Rewards are beta * (policy - reference) of log-probs of ~ -400: differences of large sums, with
# an fp32 rounding of ~ 1e-7 of the sums (measured: 7e-5 absolute at beta 2). They are compared
# against that scale; accuracies and token counts must match exactly.
METRIC_RTOL = 2e-6
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "num_tokens")
TOKEN_METRICS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")  # TRL's, over tokens


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


def near_tie_rows(n: int = 8) -> list[dict]:
    """``spin_rows`` whose synthetic response is the real one with its words in reverse order:
    pairs of near-equal length, so the chosen-minus-rejected log-prob gaps are a few nats, of the
    order of the policy's noise, and their order across a batch differs between policy and
    reference (what makes "aot"'s sorting matter)."""
    return [{**r, "synthetic": " ".join(reversed(r["real"].split()))} for r in spin_rows(n)]


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


def trained_policy_and_reference(tok, *, steps: int = 40, noise: float = 0.02):
    """(policy, reference) where the reference has learned the rows (``steps`` Adam steps of plain
    next-token loss on prompt + real response): its top-1 predictions hit (~2/3 of the real
    responses' tokens), its entropy is well below log V and its logits' means move away from 0, so
    TRL's per-token metrics discriminate (on a fresh model they are ~0, ~log V and ~0)."""
    ref = tiny_llama(tok)
    sequences = [torch.tensor(tok(r["prompt"] + r["real"])["input_ids"][:96])[None] for r in spin_rows(8)]
    opt = torch.optim.Adam(ref.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = sum(ref(input_ids=x, labels=x).loss for x in sequences) / len(sequences)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return policy, ref.requires_grad_(False)


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


def first_step(trainer) -> dict:
    """Loss, parameter gradients, metrics and per-sequence completion lengths of the first micro-batch."""
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {k: trainer._metrics["train"][k][-1] for k in METRICS + TOKEN_METRICS if trainer._metrics["train"][k]}
    if "completion_mask" in inputs:  # TRL: [chosen_0..B-1, rejected_0..B-1]; counted rows exclude the first token
        counts = inputs["completion_mask"][:, 1:].sum(1)
        b = counts.shape[0] // 2
        lengths = torch.stack([counts[:b], counts[b:]], 1).flatten()
    else:
        counted = (inputs["targets"] != IGNORE_INDEX).long()
        cu = inputs["cu_seqlens"].long()
        lengths = torch.stack([counted[cu[i]:cu[i + 1]].sum() for i in range(cu.numel() - 1)])
    return {"loss": loss.detach(), "grads": grads, "metrics": metrics, "lengths": lengths, "inputs": inputs}


def compare(dpo: dict, spin: dict, beta: float) -> dict:
    """Max abs / rel differences (rel: per tensor, against the tensor's largest entry)."""
    assert torch.equal(dpo["lengths"], spin["lengths"]), (dpo["lengths"], spin["lengths"])
    assert dpo["grads"].keys() == spin["grads"].keys()
    out = {"loss_abs": float((dpo["loss"] - spin["loss"]).abs()), "grad_abs": 0.0, "grad_rel": 0.0}
    out["loss_rel"] = out["loss_abs"] / abs(float(dpo["loss"]))
    for k, g in dpo["grads"].items():
        d = float((g - spin["grads"][k]).abs().max())
        out["grad_abs"] = max(out["grad_abs"], d)
        out["grad_rel"] = max(out["grad_rel"], d / max(float(g.abs().max()), ATOL))
    m, n = dpo["metrics"], spin["metrics"]
    logps = max(abs(m["logps/chosen"]), abs(m["logps/rejected"]))
    scale = {k: (beta * logps if k.startswith("rewards/") else logps) for k in METRICS}
    exact = ("rewards/accuracies", "num_tokens")
    out["metric_rel"] = max(abs(m[k] - n[k]) / scale[k] for k in METRICS if k not in exact)
    out["exact"] = {k: (m[k], n[k]) for k in exact if m[k] != n[k]}
    return out


REFERENCES = ("ref_model", "precomputed", "column", "peft")


def parity_case(out: str, tok, models, loss_type, reference: str, rows: list[dict] | None = None, **config) -> dict:
    """TRL's DPOTrainer and SPINTrainer on the first micro-batch of the same rows.

    ``reference``: "ref_model" (a live frozen copy), "precomputed" (each trainer precomputes its
    own), "column" (TRL's precomputed values handed to SPINTrainer as a ``ref_logps`` column),
    "peft" (a LoRA policy, ``models`` ignored, reference = the adapter disabled). ``loss_type``: a
    name or a list; ``config``: more ``DPOConfig`` fields for both trainers (``loss_weights``,
    ``label_smoothing``, ``f_divergence_type``, ``ld_alpha``, ...); ``rows``: SPIN rows (default
    ``spin_rows(8)``).

    Returns:
        {"dpo": first_step(...), "spin": first_step(...), "diff": compare(...), "trainers": (dpo, spin)}
    """
    import datasets
    from trl import DPOTrainer

    from spin_kernels.integrations.trl import SPINTrainer

    rows = [dict(r) for r in rows] if rows is not None else spin_rows(8)
    kw = {}
    if reference == "peft":
        from peft import LoraConfig

        # init_lora_weights=False: non-zero adapters, so the policy differs from its base (the reference).
        kw = {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                        lora_dropout=0.0, init_lora_weights=False)}
        make = {"model": lambda: tiny_llama(tok), "ref_model": lambda: None}
    else:
        policy, ref = models
        make = {"model": lambda: copy.deepcopy(policy), "ref_model": lambda: copy.deepcopy(ref)}
    precompute = reference in ("precomputed", "column")
    args = dpo_config(os.path.join(out, "dpo"), loss_type=loss_type, precompute_ref_log_probs=precompute, **config)
    dpo = DPOTrainer(model=make["model"](), ref_model=make["ref_model"](), args=args, processing_class=tok,
                     train_dataset=datasets.Dataset.from_list(as_dpo(rows)), **kw)
    want = first_step(dpo)
    if reference == "column":
        ds = dpo.train_dataset
        for row, c, r in zip(rows, ds["ref_chosen_logps"], ds["ref_rejected_logps"]):
            row["ref_logps"] = [c, r]
    args = dpo_config(os.path.join(out, "spin"), loss_type=loss_type, precompute_ref_log_probs=precompute, **config)
    spin = SPINTrainer(model=make["model"](), ref_model=make["ref_model"](), args=args, processing_class=tok,
                       train_dataset=datasets.Dataset.from_list(rows), **kw)
    got = first_step(spin)
    return {"dpo": want, "spin": got, "diff": compare(want, got, spin.beta), "trainers": (dpo, spin)}


# Every TRL loss type, alone with the options it reads, lists of them with loss_weights, the
# f-divergences and ld_alpha; run by ``loss_case`` at beta 0.5: the fp32 rounding of TRL's and our
# sums of ~100 log-probs (~4e-5 absolute, either side) moves a gradient by about
# beta * |l''/l'| * 4e-5 relative; at beta 2 apo_down's two opposing sigmoid terms reach 1.2e-4
# (measured), at 0.5 every case stays under 3e-5.
LOSS_CASES = [
    ("sigmoid", {}), ("hinge", {}), ("ipo", {}), ("exo_pair", {"label_smoothing": 1e-3}), ("nca_pair", {}),
    ("robust", {"label_smoothing": 0.1}), ("bco_pair", {}), ("sppo_hard", {}), ("aot", {"label_smoothing": 0.1}),
    ("aot_unpaired", {"label_smoothing": 0.1}), ("apo_zero", {}), ("apo_down", {}), ("discopop", {}),
    ("sft", {}), ("sigmoid_norm", {}),
    (["sigmoid", "sft"], {"loss_weights": [1.0, 0.5]}),
    (["hinge", "ipo", "aot", "bco_pair"], {"loss_weights": [0.3, 1.0, 2.0, 0.7], "label_smoothing": 0.2}),
    ("sigmoid", {"f_divergence_type": "forward_kl"}), ("ipo", {"f_divergence_type": "js_divergence"}),
    ("robust", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5, "label_smoothing": 0.1}),
    ("sigmoid", {"ld_alpha": 0.5}), (["ipo", "sft"], {"ld_alpha": 0.3}),
]
# The other reference sources with loss types that take the generic path (linear_logprobs into DPOLoss).
REFERENCE_CASES = [(("ipo", {}), "precomputed"), ((["sigmoid", "sft"], {"loss_weights": [1.0, 1.0]}), "column"),
                   (("apo_zero", {}), "peft"), (("sigmoid", {"ld_alpha": 0.5}), "precomputed")]
SORTING = ("aot", "aot_unpaired")  # sort across the batch: run on near_tie_rows, where the sort matters


def loss_case(out: str, tok, models, case, reference: str = "ref_model") -> dict:
    """``parity_case`` for one of ``LOSS_CASES``: beta 0.5, the sorting losses on ``near_tie_rows``."""
    loss_type, config = case
    rows = near_tie_rows() if loss_type in SORTING else None
    return parity_case(out, tok, models, loss_type, reference, rows=rows, **{"beta": 0.5, **config})
