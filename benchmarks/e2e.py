"""The end-to-end suite: one SPIN training step of a Llama-architecture model, two ways.

* ``packed-fused`` (ours): the pairs packed without padding (``spin_kernels.packing.pack_batch``),
  the decoder run once with varlen attention (``spin_kernels.models.prepare_model``), and the
  fused SPIN loss straight from the hidden states (``packed_spin_loss``): no [T, V] logits.
* ``padded-full-logits`` (the TRL / official-SPIN way): real and synthetic sequences of the
  same pairs stacked along the batch (all real first, then all synthetic), right-padded to the
  longest, one normal forward with an attention mask (transformers' default sdpa attention),
  full logits cast to fp32, log_softmax, gather, masked sums, ``spin_loss``.

* ``packed-shared`` (ours, shared prompt): as ``packed-fused`` on ``pack_batch(...,
  share_prompt=True)``: each pair one segment ``[prompt | real | synthetic]``, the prompt run once
  (spin_kernels.packing.batch). The shared-prompt cases compare it with ``packed-fused`` on a
  model where the decoder dominates (H 512, 4 layers, V 4096), on UltraChat pairs with their
  natural lengths and on pairs of fixed prompt / response lengths (a sweep of length buckets).

A step is the policy forward + backward (the optimizer update, identical for both, is left
out). The reference log-probs are either precomputed (``ref="precomputed"``: taken once before
timing, with the policy itself, as at the start of a SPIN iteration when policy = opponent) or
computed inside the step by a live frozen copy of the model (``ref="live"``, no gradient; each
variant runs the reference its own way: packed + fused log-probs, or padded + full logits).

Data: (prompt, real) rows of the UltraChat sample, tokenized with the offline BPE tokenizer
(``spin_kernels.packing.sample_tokenizer``); the synthetic response of a pair is the real reply
of the next row (a stand-in with realistic lengths). Cases with fixed lengths cut their prompts
and responses from the sample's token stream (all rows' prompt + reply tokens, in order). All
variants see the same token ids and the same weights, so their losses agree (the table shows them).
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
SHARED_VARIANTS = ("packed-fused", "packed-shared")
PACKED = ("packed-fused", "packed-shared")


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
    # The decoder dominates (23.6 MFLOP per token forward; the lm_head 4.2, and only on response rows): what
    # prompt sharing saves.
    ModelSpec("decoder-llama", 512, 1408, 4, 8, 4, 4096, False, "float32"),
    ModelSpec("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, True, "bfloat16"),
]}


@dataclass(frozen=True)
class E2ECase:
    """``variants[0]`` is the baseline of the case's speed-up and memory ratios. ``lengths``:
    (prompt, response) tokens of every pair, cut from the sample's token stream; None: UltraChat
    pairs with their own lengths (under max_length / max_prompt_length)."""

    name: str
    model: ModelSpec
    pairs: int
    max_length: int
    max_prompt_length: int
    ref: str  # "precomputed" | "live"
    variants: tuple[str, ...] = VARIANTS
    lengths: tuple[int, int] | None = None


CASES = {c.name: c for c in [
    E2ECase("micro", MODELS["micro-llama"], 2, 96, 48, "precomputed"),  # smoke tests only
    E2ECase("tiny", MODELS["tiny-llama"], 4, 512, 256, "precomputed"),
    E2ECase("tiny-live", MODELS["tiny-llama"], 4, 512, 256, "live"),
    E2ECase("llama-1b", MODELS["llama-3.2-1b"], 8, 1024, 512, "precomputed"),
    E2ECase("llama-1b-live", MODELS["llama-3.2-1b"], 8, 1024, 512, "live"),
    E2ECase("micro-shared", MODELS["micro-llama"], 2, 96, 48, "precomputed", SHARED_VARIANTS),  # smoke tests only
    # Shared prompt: UltraChat pairs as they are (the paper's 1024 / 512), then length buckets of
    # about 2k sequence tokens each, short prompts with long responses to long prompts with short ones.
    E2ECase("shared-ultrachat", MODELS["decoder-llama"], 3, 1024, 512, "precomputed", SHARED_VARIANTS),
    *(E2ECase(f"shared-p{p}-r{r}", MODELS["decoder-llama"], n, p + r, p, "precomputed", SHARED_VARIANTS, (p, r))
      for p, r, n in ((16, 512, 2), (32, 256, 4), (128, 128, 4), (256, 256, 2), (512, 256, 2), (512, 64, 2))),
]}
DEFAULT_CASES = {"cpu": ("tiny", "tiny-live"), "cuda": ("llama-1b", "llama-1b-live")}
#: ``--e2e-cases`` names that stand for several cases.
CASE_GROUPS = {"shared-prompt": tuple(n for n in CASES if n.startswith("shared-"))}


def missing_dependency() -> str | None:
    """Why the packed path cannot run here (its helpers not importable), or None."""
    try:
        from spin_kernels.models import packed_spin_loss, prepare_model  # noqa: F401
        from spin_kernels.packing import pack_batch, sample_tokenizer  # noqa: F401
    except ImportError as exc:
        return f"spin_kernels.packing / spin_kernels.models not importable ({exc})"
    return None


def spin_examples(case: E2ECase, seed: int = 0):
    """``case.pairs`` SpinExamples from the UltraChat sample (a seeded choice of rows, or with
    ``case.lengths`` consecutive cuts of the sample's token stream)."""
    from spin_kernels.packing import (
        SpinExample,
        load_ultrachat_sample,
        sample_tokenizer,
        tokenize_example,
    )

    rows = load_ultrachat_sample()
    tokenizer = sample_tokenizer()
    if case.lengths is not None:
        prompt, response = case.lengths
        stream = [t for r in rows for t in tokenizer(r["prompt"] + r["real"], add_special_tokens=False)["input_ids"]]
        size = prompt + 2 * response
        if case.pairs * size > len(stream):
            raise ValueError(f"case {case.name}: {case.pairs} pairs of {size} tokens exceed the sample's {len(stream)}")
        cuts = [stream[i * size:(i + 1) * size] for i in range(case.pairs)]
        return [SpinExample(c[:prompt], c[prompt:prompt + response], c[prompt + response:], index=i)
                for i, c in enumerate(cuts)]
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

        if variant not in case.variants:
            raise ValueError(f"case {case.name} has variants {case.variants}, not {variant!r}")
        self.case, self.variant, self.device = case, variant, device
        self.cpu_times: list[float] = []
        examples = spin_examples(case, seed)
        self.sequence_tokens = sum(ex.num_tokens for ex in examples)  # both sequences, prompt counted twice
        self.batch = pack_batch(examples, share_prompt=variant == "packed-shared").to(device)
        self.model = build_model(case.model, device, seed)
        self.ref_model = None
        if case.ref == "live":
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        if variant in PACKED:
            prepare_model(self.model)
            if self.ref_model is not None:
                prepare_model(self.ref_model)
        else:
            self.padded = padded_from_packed(self.batch)
        if case.ref == "precomputed":  # the opponent (= the policy at the iteration start), once
            packed_policy = prepare_model(copy.deepcopy(self.model)) if variant not in PACKED else self.model
            self.batch.ref_logps = reference_logps(self.batch, ref_model=packed_policy)
            del packed_policy

    @property
    def tokens(self) -> int:
        """The tokens of the pairs' 2P sequences (prompt counted in each): the same in every
        variant, whatever its layout computes, so tokens/s compare across variants."""
        return self.sequence_tokens

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
        cpu = time.process_time()
        loss = self._packed_loss() if self.variant in PACKED else self._padded_loss()
        loss.backward()
        # The process's CPU time (all threads) of the step: on a shared CPU it varies less than the
        # wall time, which also counts the time the step's threads wait for a core.
        self.cpu_times.append(time.process_time() - cpu)
        return loss.detach()

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def grads(self):
        return None, None


def _summary(case: E2ECase, variant: str, m: measure.Measured, step: Step | None) -> dict:
    rec = {"case": case.name, "variant": variant, "baseline": variant == case.variants[0],
           "status": m.status, "note": m.note, "times_s": m.times_s,
           "median_s": statistics.median(m.times_s) if m.times_s else None,
           "peak_extra_bytes": m.peak_extra_bytes, "mem_method": m.mem_method,
           "case_info": {"model": asdict(case.model), "pairs": case.pairs, "max_length": case.max_length,
                         "max_prompt_length": case.max_prompt_length, "ref": case.ref,
                         "lengths": case.lengths}}
    if step is not None:
        b = step.batch
        longest = b.max_seqlen  # the longest prompt + response, in either packed layout
        rec["tokens"] = step.tokens
        rec["layout_tokens"] = b.num_tokens
        rec["tokens_per_pair"] = b.num_tokens / b.num_pairs
        rec["padded_tokens"] = b.num_sequences * longest
        rec["counted_tokens"] = b.num_counted
        data = (f"prompt {case.lengths[0]} / response {case.lengths[1]} tokens per pair (cut from the sample)"
                if case.lengths else f"UltraChat pairs (max length {case.max_length}, prompt {case.max_prompt_length})")
        rec["case_info"]["summary"] = (
            f"{case.model.name} (H={case.model.hidden}, {case.model.layers} layers, V={case.model.vocab}, "
            f"{case.model.dtype}), {case.pairs} pairs, {data}: {step.tokens:,} sequence tokens "
            f"({b.num_counted:,} counted; padded layout {b.num_sequences}×{longest} = "
            f"{b.num_sequences * longest:,}), reference {case.ref}")
    if step is not None and m.times_s and step.device.type == "cpu":
        rec["cpu_times_s"] = step.cpu_times[-len(m.times_s):]  # the timed runs (warm-ups come first)
        rec["cpu_median_s"] = statistics.median(rec["cpu_times_s"])
    if m.fingerprint is not None:
        rec["loss"] = m.fingerprint["out"].item()
    if rec["median_s"] and step is not None:
        rec["tokens_per_s"] = step.tokens / rec["median_s"]
    return rec


def shared_prompt_note() -> str:
    """Tokens per pair with and without sharing over the whole UltraChat sample (the packer's
    statistics: all 154 rows, max length 1,024 / prompt 512, synthetic responses of other rows
    cut to 256 new tokens, seed 0)."""
    from spin_kernels.packing import load_ultrachat_sample, sample_tokenizer
    from spin_kernels.packing.stats import sample_spin_examples

    rows = load_ultrachat_sample()
    examples = sample_spin_examples(sample_tokenizer(), rows)
    default, shared = (sum(ex.packed_tokens(share) for ex in examples) / len(examples) for share in (False, True))
    prompt = sum(len(ex.prompt_ids) for ex in examples) / len(examples)
    return (f"Tokens per pair on the UltraChat sample (all {len(rows)} rows, 1,024 / 512, synthetic = another row's "
            f"reply cut to 256 tokens): {default:.1f} as two sequences, {shared:.1f} with the prompt shared "
            f"({shared / default - 1:+.1%}; mean prompt {prompt:.1f} tokens).")


def run_case(case: E2ECase, device: torch.device, *, warmup: int, repeats: int, memory: bool,
             dry_run: bool = False) -> list[dict]:
    steps: dict[str, Step] = {}
    measured = {v: measure.Measured() for v in case.variants}
    for v in case.variants:
        try:
            steps[v] = Step(case, v, device)
        except Exception as exc:  # noqa: BLE001
            measured[v].fail(exc)
            measure.free_device_memory(device)
    measure.timed_rounds(steps, measured, device, warmup=warmup, repeats=repeats, dry_run=dry_run)
    if memory and device.type == "cpu":
        for v in case.variants:
            if measured[v].status == "ok":
                probe = measure.cpu_peak_extra(case.name, v, "", "", torch.get_num_threads(),
                                               suite="e2e")
                measured[v].peak_extra_bytes = probe.get("peak_extra_bytes")
                measured[v].mem_method = probe.get("mem_method", probe.get("note"))
    records = [_summary(case, v, measured[v], steps.get(v)) for v in case.variants]
    base = measured[case.variants[0]].times_s
    for r in records:  # rounds are round-robin: a per-round ratio cancels load that drifts between rounds
        times = measured[r["variant"]].times_s
        if base and len(times) == len(base):
            r["speedup_per_round"] = statistics.median(b / t for b, t in zip(base, times))
    steps.clear()
    measure.free_device_memory(device)
    return records


def run_suite(device: torch.device, names: list[str] | None, *, warmup: int, repeats: int,
              budget_s: float | None = None, memory: bool = True, log=print,
              dry_run: bool = False) -> tuple[list[dict], list[str]]:
    """Run e2e cases; returns (records, notes). Skips everything, with a note, if the packed path is missing.
    ``dry_run``: the CUDA cases, each as its miniature, on the CPU (benchmarks/dryrun.py)."""
    names = [n for name in (names or DEFAULT_CASES["cuda" if dry_run else device.type])
             for n in CASE_GROUPS.get(name, (name,))]
    notes = [("A step = policy forward + loss + backward (no optimizer update); tokens/s counts the tokens of "
              "the pairs' sequences, the prompt once per sequence (the padded variant also computes its padding, "
              "the shared-prompt one computes each prompt once).")]
    if any(CASES[n].variants == SHARED_VARIANTS for n in names) and not missing_dependency():
        notes.append(shared_prompt_note())
    why = missing_dependency()
    records = []
    started = time.perf_counter()
    for name in names:
        case = miniature_e2e(CASES[name]) if dry_run else CASES[name]
        if why or (budget_s is not None and time.perf_counter() - started > budget_s):
            skip = measure.Measured(status="skipped", note=why or "time budget used up")
            records += [_summary(case, v, skip, None) for v in case.variants]
            continue
        t0 = time.perf_counter()
        records += run_case(case, device, warmup=warmup, repeats=repeats, memory=memory, dry_run=dry_run)
        log(f"[e2e] {name}: {time.perf_counter() - t0:.1f} s")
        for r in records[-len(case.variants):]:
            log(f"    {r['variant']:<20} {r['status']} {r.get('median_s') or 0:.3f} s "
                f"{r.get('tokens_per_s') or 0:,.0f} tok/s loss {r.get('loss', float('nan')):.4f} {r['note']}")
    if (device.type == "cuda" or dry_run) and not why:
        from spin_kernels.models import varlen_backend

        notes.append(f"Packed attention backend: {varlen_backend(device, torch.bfloat16)}; padded: sdpa.")
    if why:
        notes.append(f"Not run: {why}")
    return records, notes
