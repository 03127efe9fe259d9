"""The end-to-end suite: one SPIN training step of a Llama-architecture model, two ways.

* ``packed-fused`` (ours): the pairs packed without padding (``spin_kernels.packing.pack_batch``),
  the decoder run once with varlen attention (``spin_kernels.models.prepare_model``), and the
  fused SPIN loss straight from the hidden states (``packed_spin_loss``): no [T, V] logits.
* ``padded-full-logits`` (the TRL / official-SPIN way): real and synthetic sequences of the
  same pairs stacked along the batch (all real first, then all synthetic), right-padded to the
  longest, one normal forward with an attention mask (transformers' default sdpa attention),
  full logits cast to fp32, log_softmax, gather, masked sums, ``spin_loss``.

A step is the policy forward + backward (the optimizer update, identical for both, is left
out). The reference log-probs are either precomputed (``ref="precomputed"``: taken once before
timing, with the policy itself, as at the start of a SPIN iteration when policy = opponent) or
computed inside the step by a live frozen copy of the model (``ref="live"``, no gradient; each
variant runs the reference its own way: packed + fused log-probs, or padded + full logits).

Data: (prompt, real) rows of the UltraChat sample, tokenized with the offline BPE tokenizer
(``spin_kernels.packing.sample_tokenizer``); the synthetic response of a pair is the real reply
of the next row (a stand-in with realistic lengths). Both variants see the same token ids and
the same weights, so their losses agree (the table shows both).
"""

from __future__ import annotations

import copy
import itertools
import random
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from . import measure
from .dryrun import miniature_e2e

IGNORE_INDEX = -100
VARIANTS = ("padded-full-logits", "packed-fused")


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-architecture config (random weights)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool
    dtype: str

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
                           tie_word_embeddings=self.tie_embeddings, max_position_embeddings=4096,
                           rope_theta=500000.0, use_cache=False)


MODELS = {m.name: m for m in [
    ModelSpec("micro-llama", 64, 128, 1, 2, 1, 4096, False, "float32"),  # vocab >= the BPE tokenizer's
    ModelSpec("tiny-llama", 256, 704, 2, 4, 2, 32000, False, "float32"),
    ModelSpec("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, True, "bfloat16"),
]}


@dataclass(frozen=True)
class E2ECase:
    name: str
    model: ModelSpec
    pairs: int
    max_length: int
    max_prompt_length: int
    ref: str  # "precomputed" | "live"


CASES = {c.name: c for c in [
    E2ECase("micro", MODELS["micro-llama"], 2, 96, 48, "precomputed"),  # smoke tests only
    E2ECase("tiny", MODELS["tiny-llama"], 4, 512, 256, "precomputed"),
    E2ECase("tiny-live", MODELS["tiny-llama"], 4, 512, 256, "live"),
    E2ECase("llama-1b", MODELS["llama-3.2-1b"], 8, 1024, 512, "precomputed"),
    E2ECase("llama-1b-live", MODELS["llama-3.2-1b"], 8, 1024, 512, "live"),
]}
DEFAULT_CASES = {"cpu": ("tiny", "tiny-live"), "cuda": ("llama-1b", "llama-1b-live")}


def missing_dependency() -> str | None:
    """Why the packed path cannot run here (its helpers not importable), or None."""
    try:
        from spin_kernels.models import packed_spin_loss, prepare_model  # noqa: F401
        from spin_kernels.packing import pack_batch, sample_tokenizer  # noqa: F401
    except ImportError as exc:
        return f"spin_kernels.packing / spin_kernels.models not importable ({exc})"
    return None


def spin_examples(case: E2ECase, seed: int = 0):
    """``case.pairs`` SpinExamples from the UltraChat sample (a seeded choice of rows)."""
    from spin_kernels.packing import (
        load_ultrachat_sample,
        sample_tokenizer,
        tokenize_example,
    )

    rows = load_ultrachat_sample()
    tokenizer = sample_tokenizer()
    chosen = random.Random(seed).sample(range(len(rows)), case.pairs)
    return [tokenize_example(tokenizer, rows[i]["prompt"], rows[i]["real"], rows[(i + 1) % len(rows)]["real"],
                             max_length=case.max_length, max_prompt_length=case.max_prompt_length, index=i)
            for i in chosen]


def build_model(spec: ModelSpec, device: torch.device, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(spec.config())
    return model.to(getattr(torch, spec.dtype)).train()


def padded_from_packed(batch) -> tuple[Tensor, Tensor, Tensor]:
    """TRL's layout from a PackedBatch: [2P, T] input_ids, attention_mask, per-row targets;
    rows 0..P-1 the real sequences, P..2P-1 the synthetic ones, right-padded."""
    cu = batch.cu_seqlens.tolist()
    lengths = [b - a for a, b in itertools.pairwise(cu)]
    order = list(range(0, len(lengths), 2)) + list(range(1, len(lengths), 2))
    width = max(lengths)
    ids = batch.input_ids.new_zeros(len(lengths), width)
    targets = batch.targets.new_full((len(lengths), width), IGNORE_INDEX)
    mask = batch.input_ids.new_zeros(len(lengths), width)
    for row, s in enumerate(order):
        a, b = cu[s], cu[s + 1]
        ids[row, : b - a] = batch.input_ids[a:b]
        targets[row, : b - a] = batch.targets[a:b]
        mask[row, : b - a] = 1
    return ids, mask, targets


def full_logits_logps(model, ids: Tensor, mask: Tensor, targets: Tensor) -> Tensor:
    """Per-sequence log-probs the TRL / official-SPIN way: full fp32 logits, log_softmax, gather."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    counted = targets != IGNORE_INDEX
    logp = logits.log_softmax(-1).gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    return (logp * counted).sum(-1)


class Step:
    """One training step of a variant, on prepared inputs; ``run()`` returns the detached loss."""

    def __init__(self, case: E2ECase, variant: str, device: torch.device, seed: int = 0):
        from spin_kernels.models import prepare_model, reference_logps
        from spin_kernels.packing import pack_batch

        self.case, self.variant, self.device = case, variant, device
        self.batch = pack_batch(spin_examples(case, seed)).to(device)
        self.model = build_model(case.model, device, seed)
        self.ref_model = None
        if case.ref == "live":
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        if variant == "packed-fused":
            prepare_model(self.model)
            if self.ref_model is not None:
                prepare_model(self.ref_model)
        else:
            self.padded = padded_from_packed(self.batch)
        if case.ref == "precomputed":  # the opponent (= the policy at the iteration start), once
            packed_policy = prepare_model(copy.deepcopy(self.model)) if variant != "packed-fused" else self.model
            self.batch.ref_logps = reference_logps(self.batch, ref_model=packed_policy)
            del packed_policy

    @property
    def tokens(self) -> int:
        return self.batch.num_tokens

    def _packed_loss(self) -> Tensor:
        from spin_kernels.models import packed_spin_loss, reference_logps

        ref = (reference_logps(self.batch, ref_model=self.ref_model) if self.ref_model is not None
               else self.batch.ref_logps)
        return packed_spin_loss(self.model, self.batch, ref_logps=ref)[0]

    def _padded_loss(self) -> Tensor:
        from spin_kernels.ops import spin_loss

        ids, mask, targets = self.padded
        p = ids.shape[0] // 2
        seq = full_logits_logps(self.model, ids, mask, targets)
        if self.ref_model is not None:
            with torch.no_grad():
                ref = full_logits_logps(self.ref_model, ids, mask, targets)
        else:
            packed_ref = self.batch.ref_logps
            ref = torch.cat([packed_ref[0::2], packed_ref[1::2]])
        return spin_loss(seq[:p], seq[p:], ref[:p], ref[p:], beta=0.1)[0]

    def run(self) -> Tensor:
        loss = self._packed_loss() if self.variant == "packed-fused" else self._padded_loss()
        loss.backward()
        return loss.detach()

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def grads(self):
        return None, None


def _summary(case: E2ECase, variant: str, m: measure.Measured, step: Step | None) -> dict:
    rec = {"case": case.name, "variant": variant, "baseline": variant == "padded-full-logits",
           "status": m.status, "note": m.note, "times_s": m.times_s,
           "median_s": statistics.median(m.times_s) if m.times_s else None,
           "peak_extra_bytes": m.peak_extra_bytes, "mem_method": m.mem_method,
           "case_info": {"model": asdict(case.model), "pairs": case.pairs, "max_length": case.max_length,
                         "max_prompt_length": case.max_prompt_length, "ref": case.ref}}
    if step is not None:
        b = step.batch
        lengths = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
        rec["tokens"] = b.num_tokens
        rec["padded_tokens"] = len(lengths) * max(lengths)
        rec["counted_tokens"] = b.num_counted
        rec["case_info"]["summary"] = (
            f"{case.model.name} (H={case.model.hidden}, {case.model.layers} layers, V={case.model.vocab}, "
            f"{case.model.dtype}), {case.pairs} pairs, {b.num_tokens:,} tokens ({b.num_counted:,} counted; padded "
            f"layout {len(lengths)}×{max(lengths)} = {len(lengths) * max(lengths):,}), reference {case.ref}")
    if m.fingerprint is not None:
        rec["loss"] = m.fingerprint["out"].item()
    if rec["median_s"] and step is not None:
        rec["tokens_per_s"] = step.tokens / rec["median_s"]
    return rec


def run_case(case: E2ECase, device: torch.device, *, warmup: int, repeats: int, memory: bool,
             dry_run: bool = False) -> list[dict]:
    steps: dict[str, Step] = {}
    measured = {v: measure.Measured() for v in VARIANTS}
    for v in VARIANTS:
        try:
            steps[v] = Step(case, v, device)
        except Exception as exc:  # noqa: BLE001
            measured[v].fail(exc)
            measure.free_device_memory(device)
    measure.timed_rounds(steps, measured, device, warmup=warmup, repeats=repeats, dry_run=dry_run)
    if memory and device.type == "cpu":
        for v in VARIANTS:
            if measured[v].status == "ok":
                probe = measure.cpu_peak_extra(case.name, v, "", "", torch.get_num_threads(),
                                               suite="e2e")
                measured[v].peak_extra_bytes = probe.get("peak_extra_bytes")
                measured[v].mem_method = probe.get("mem_method", probe.get("note"))
    records = [_summary(case, v, measured[v], steps.get(v)) for v in VARIANTS]
    steps.clear()
    measure.free_device_memory(device)
    return records


def run_suite(device: torch.device, names: list[str] | None, *, warmup: int, repeats: int,
              budget_s: float | None = None, memory: bool = True, log=print,
              dry_run: bool = False) -> tuple[list[dict], list[str]]:
    """Run e2e cases; returns (records, notes). Skips everything, with a note, if the packed path is missing.
    ``dry_run``: the CUDA cases, each as its miniature, on the CPU (benchmarks/dryrun.py)."""
    names = names or list(DEFAULT_CASES["cuda" if dry_run else device.type])
    notes = [("A step = policy forward + loss + backward (no optimizer update); tokens/s counts real tokens "
              "(the padded variant also computes its padding).")]
    why = missing_dependency()
    records = []
    started = time.perf_counter()
    for name in names:
        case = miniature_e2e(CASES[name]) if dry_run else CASES[name]
        if why or (budget_s is not None and time.perf_counter() - started > budget_s):
            skip = measure.Measured(status="skipped", note=why or "time budget used up")
            records += [_summary(case, v, skip, None) for v in VARIANTS]
            continue
        t0 = time.perf_counter()
        records += run_case(case, device, warmup=warmup, repeats=repeats, memory=memory, dry_run=dry_run)
        log(f"[e2e] {name}: {time.perf_counter() - t0:.1f} s")
        for r in records[-len(VARIANTS):]:
            log(f"    {r['variant']:<20} {r['status']} {r.get('median_s') or 0:.3f} s "
                f"{r.get('tokens_per_s') or 0:,.0f} tok/s loss {r.get('loss', float('nan')):.4f} {r['note']}")
    if (device.type == "cuda" or dry_run) and not why:
        from spin_kernels.models import varlen_backend

        notes.append(f"Packed attention backend: {varlen_backend(device, torch.bfloat16)}; padded: sdpa.")
    if why:
        notes.append(f"Not run: {why}")
    return records, notes
