"""Per-GPU memory of one SPIN iteration under FSDP2, and the cheapest configuration that fits.

Every term is a closed formula in the model shape and the options; each is explained where it
is computed. Units: bytes. The phases of an iteration and what is alive in each:

* training step (the peak of a forward/backward of one packed micro-batch):
  sharded parameters + sharded gradients (accumulated over micro-batches) + optimizer states
  + a frozen reference model if any + FSDP's all-gathered compute copies and in-flight
  unsharded gradients + saved activations + attention state + the fused loss's workspace;
* generation (and the reference pass, a no-grad forward): sharded parameters + optimizer
  states (they persist between steps; gradients are freed) + the all-gathered copies + the
  KV cache of one generate call + its transient logits and prefill activations.

The peak is the larger of the two. It fits when it is below the usable memory:
``gpu_memory * (1 - fragmentation) - reserve`` (CUDA context, NCCL buffers, allocator slack).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

from .models import ModelSpec, resolve_model

GiB = 2 ** 30
OPTIMIZER_STATES = {"sgd": 0, "rmsprop": 1, "adamw": 2, "adam": 2}
REFERENCE_MODES = ("precomputed", "frozen-model", "lora-disabled")
ATTENTION = ("flash", "sdpa_loop", "eager")
LOSS_IMPLS = ("fused", "torch", "naive")
# spin_kernels.triton.backward.DEFAULT_WORKSPACE_BYTES, restated (the planner runs where Triton
# is not installed); tests/test_triton_kernels.py keeps the two equal.
TRITON_WORKSPACE_BYTES = 56 * 2**20


@dataclass(frozen=True)
class PlanOptions:
    """What is planned. Defaults: the paper's SPIN recipe (RMSprop, bf16, 1024-token sequences,
    256 new tokens) on FSDP2 with fp32 master weights and a Triton fused loss.

    Attributes:
        num_gpus: GPUs sharding the model (FSDP world size).
        gpu_memory_gib: memory of one GPU.
        token_budget: packed tokens in one micro-batch on one GPU.
        max_seqlen: longest sequence (prompt + response); a micro-batch holds at least one pair.
        counted_fraction: share of tokens that predict a response token (the fused loss's rows).
        finetune: "full" or "lora" (adapters of ``lora_rank`` on all 7 linear maps per layer,
            frozen base in the compute dtype).
        optimizer: "rmsprop" (the paper's; 1 state), "adamw" (2 states) or "sgd" (none).
        mixed_precision: "bf16" (compute in bf16, fp32 master weights/gradients/states) or None
            (compute in the parameters' dtype, ``param_bytes``).
        param_bytes: bytes of a stored (master) parameter: 4 (fp32, default) or 2.
        cpu_offload: FSDP2 CPUOffloadPolicy: sharded parameters, gradients and optimizer states
            live in host memory.
        activation_checkpointing: recompute each decoder layer in backward.
        reference_mode: "precomputed" (log-probs from the opponent right after generation: no
            model), "frozen-model" (a second sharded model in the compute dtype),
            "lora-disabled" (the LoRA policy with its adapter off: no extra weights).
        gen_batch, prompt_len, max_new_tokens: one ``generate`` call on one GPU.
        attention: "flash" (varlen flash attention, GPU), "sdpa_loop" (the CPU path: a loop
            of fused SDPA calls, one extra output copy), "eager" (scores materialised).
        loss_impl: "fused" (Triton: dW and dh in the compute dtype, a fixed workspace, no logits),
            "torch" (the chunked torch path:
            + an fp32 copy of a low-precision head and one logits chunk), "naive" (full logits).
        loss_chunk_bytes: the torch path's logits chunk (its DEFAULT_LOGITS_BUDGET).
        fsdp: shard with FSDP2 (default: num_gpus > 1 or mixed precision).
        grad_accumulation: gradients of earlier micro-batches are alive during the next one.
        reserve_gib, fragmentation: what the usable memory leaves aside.
        host_memory_gib, gpus_per_node: host memory of one node, for offload checks.
    """

    num_gpus: int = 8
    gpu_memory_gib: float = 80.0
    token_budget: int = 8192
    max_seqlen: int = 1024
    counted_fraction: float = 0.5
    finetune: str = "full"
    lora_rank: int = 16
    optimizer: str = "rmsprop"
    mixed_precision: str | None = "bf16"
    param_bytes: int = 4
    cpu_offload: bool = False
    activation_checkpointing: bool = True
    reference_mode: str = "precomputed"
    gen_batch: int = 32
    prompt_len: int = 512
    max_new_tokens: int = 256
    attention: str = "flash"
    loss_impl: str = "fused"
    loss_chunk_bytes: int = 256 * 2 ** 20
    fsdp: bool | None = None
    grad_accumulation: bool = True
    reserve_gib: float = 2.0
    fragmentation: float = 0.10
    host_memory_gib: float = 1024.0
    gpus_per_node: int = 8

    def __post_init__(self):
        checks = [
            (self.num_gpus >= 1, "num_gpus must be >= 1"),
            (self.gpu_memory_gib > 0, "gpu_memory_gib must be > 0"),
            (self.token_budget >= 1 and self.max_seqlen >= 1, "token_budget and max_seqlen must be >= 1"),
            (0 < self.counted_fraction <= 1, "counted_fraction must be in (0, 1]"),
            (self.finetune in ("full", "lora"), f"finetune must be 'full' or 'lora', got {self.finetune!r}"),
            (self.optimizer in OPTIMIZER_STATES, f"optimizer must be one of {sorted(OPTIMIZER_STATES)}"),
            (self.mixed_precision in (None, "bf16", "fp16"), "mixed_precision must be 'bf16', 'fp16' or None"),
            (self.param_bytes in (2, 4), "param_bytes must be 2 or 4"),
            (self.reference_mode in REFERENCE_MODES, f"reference_mode must be one of {REFERENCE_MODES}"),
            (self.reference_mode != "lora-disabled" or self.finetune == "lora",
             "reference_mode='lora-disabled' needs finetune='lora'"),
            (self.attention in ATTENTION, f"attention must be one of {ATTENTION}"),
            (self.loss_impl in LOSS_IMPLS, f"loss_impl must be one of {LOSS_IMPLS}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def sharded(self) -> bool:
        return self.fsdp if self.fsdp is not None else (self.num_gpus > 1 or self.mixed_precision is not None)

    @property
    def compute_bytes(self) -> int:
        return 2 if self.mixed_precision else self.param_bytes


@dataclass
class Plan:
    """The per-GPU breakdown (bytes) of one configuration; ``table()`` renders it."""

    model: ModelSpec
    options: PlanOptions
    rows: dict[str, float]
    train_peak: float
    generation_peak: float
    usable: float
    host_per_node: float
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(self.train_peak, self.generation_peak)

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable and self.host_per_node <= self.options.host_memory_gib * GiB

    def table(self) -> str:
        o, m = self.options, self.model
        head = (f"{m.name}: {m.num_params / 1e9:.2f}B params | {o.num_gpus} x {o.gpu_memory_gib:g} GiB | "
                f"{o.finetune} fine-tuning, {o.optimizer}, {o.mixed_precision or 'no'} mixed precision | "
                f"token budget {o.token_budget}/GPU | AC {'on' if o.activation_checkpointing else 'off'} | "
                f"CPU offload {'on' if o.cpu_offload else 'off'} | reference {o.reference_mode} | "
                f"generation {o.gen_batch} x ({o.prompt_len}+{o.max_new_tokens})")
        lines = [head, f"{'per GPU':<50}{'GiB':>9}"]
        lines += [f"  {k:<48}{v / GiB:>9.2f}" for k, v in self.rows.items()]
        lines += [
            f"{'peak, training step':<50}{self.train_peak / GiB:>9.2f}",
            f"{'peak, generation / reference pass':<50}{self.generation_peak / GiB:>9.2f}",
            f"{'usable (after reserve and fragmentation)':<50}{self.usable / GiB:>9.2f}",
            f"{'host memory per node (offload)':<50}{self.host_per_node / GiB:>9.2f}",
            f"fits: {'YES' if self.fits else 'NO'}",
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def trainer_flags(o: PlanOptions) -> tuple[list[str] | None, str]:
    """The ``spin-kernels iterate`` flags that run configuration ``o`` (None and the reason when
    the trainer has no such mode: the planner also prices alternatives for comparison)."""
    why = {o.optimizer not in ("rmsprop", "adamw"): f"optimizer {o.optimizer!r} (the trainer has rmsprop and adamw)",
           o.mixed_precision == "fp16": "fp16 mixed precision (the trainer refuses it: no loss scaling)",
           o.param_bytes == 2 and o.finetune == "full": "bf16 master weights (SPIN's updates would be lost)",
           o.reference_mode == "frozen-model": "a frozen reference model (the trainer precomputes the reference "
                                               "log-probs, which needs no memory while training)",
           o.attention == "eager": "eager attention (the trainer's models run varlen attention)",
           o.loss_impl == "naive": "the naive full-logits loss (a baseline, not a trainer mode)",
           o.prompt_len + o.max_new_tokens > o.max_seqlen: "prompt + new tokens longer than the max length"}
    reasons = [text for bad, text in why.items() if bad]
    if reasons:
        return None, "; ".join(reasons)
    flags = ["--token-budget", str(o.token_budget), "--max-length", str(o.max_seqlen), "--max-prompt-length",
             str(o.prompt_len), "--max-new-tokens", str(o.max_new_tokens), "--generation-batch-size",
             str(o.gen_batch), "--optimizer", o.optimizer]
    if o.attention == "sdpa_loop":  # the CPU path
        flags += ["--device", "cpu"]
    if o.loss_impl == "torch":
        flags += ["--impl", "torch"]
    if o.mixed_precision == "bf16":
        flags += ["--bf16"] + (["--mixed-precision", "bf16"] if o.sharded else [])
    else:
        flags += ["--no-bf16"] + (["--mixed-precision", "none"] if o.sharded else [])
    if o.finetune == "lora":
        flags += ["--lora-rank", str(o.lora_rank)] + (["--dtype", "bfloat16"] if o.mixed_precision == "bf16" else [])
    if o.activation_checkpointing:
        flags.append("--gradient-checkpointing")
    if o.cpu_offload:
        flags.append("--cpu-offload")
    if o.sharded and o.num_gpus == 1:
        flags.append("--fsdp")
    return flags, ""


def launch_command(o: PlanOptions, *, model: str, data: str, output_dir: str) -> tuple[str | None, str]:
    """The whole command line that runs ``o`` (``spin-kernels iterate`` or ``torchrun``), or None
    and the reason."""
    flags, why = trainer_flags(o)
    if flags is None:
        return None, why
    args = ["iterate", "--model", model, "--data", data, "--output-dir", output_dir, *flags]
    if o.num_gpus == 1:
        return " ".join(["spin-kernels", *args]), ""
    per_node = min(o.num_gpus, o.gpus_per_node)
    nodes = -(-o.num_gpus // per_node)
    launcher = ["torchrun", "--nproc_per_node", str(per_node)]
    if nodes > 1:
        launcher += ["--nnodes", str(nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", "HEAD_NODE:29500"]
    return " ".join([*launcher, "-m", "spin_kernels.cli", *args]), ""


def _layer_activation_bytes(m: ModelSpec, o: PlanOptions) -> float:
    """Bytes saved for backward per token by one decoder layer (HF Llama-style block).

    Counted from what autograd keeps: each RMSNorm saves its fp32 input (``x.to(float32)``,
    the same tensor when the model is fp32), the normalised input in the compute dtype and its
    output (kept by the next linear maps): 4 + 2b bytes per hidden unit, twice. Attention keeps
    the rotated q and k, v and its output (+ a copy for the CPU SDPA loop, + nothing for the
    scores with flash kernels). The gated MLP keeps gate, up, silu(gate) and their product.
    """
    b = o.compute_bytes
    norms = 2 * (4 + 2 * b) * m.hidden
    attn = b * (2 * m.q_dim + 2 * m.kv_dim) + (b * m.q_dim if o.attention == "sdpa_loop" else 0)
    attn += 4 * m.num_heads  # log-sum-exp of flash/SDPA kernels, fp32
    mlp = 4 * b * m.intermediate
    lora = 7 * b * o.lora_rank if o.finetune == "lora" else 0
    return norms + attn + mlp + lora


@dataclass(frozen=True)
class _StepMemory:
    """The dynamic memory of one micro-batch's forward/backward, by lifetime."""

    saved: float          # activations kept from forward to backward (incl. the final norm's)
    backward: float       # one layer recomputed (checkpointing) + one layer's backward workspace
    scores: float         # attention scores (eager attention only), transient
    loss_persist: float   # the loss's dW/dh/lse: from the loss forward to the start of backward
    loss_transient: float  # one logits chunk (torch path), forward only
    loss_backward: float = 0.0  # the naive loss's logits gradient, at the start of backward


def _step_memory(m: ModelSpec, o: PlanOptions) -> _StepMemory:
    """Activations and loss memory of one micro-batch of ``token_budget`` tokens.

    With checkpointing only each layer's input survives the forward; in backward one layer is
    recomputed at a time. The backward workspace is one layer's gradients of the residual
    stream and of the MLP. The loss (ours) computes the head's gradients in its forward; they
    live until the backward starts. Triton ("fused"): dW [V, H] (none when the head is frozen
    under LoRA) and dh [tokens, H] in the compute dtype, plus its fixed workspace during the
    loss; the torch path: both in fp32, dh over the counted rows, plus one logits chunk and an
    fp32 copy of a low-precision head during the loss forward only. The naive loss (logits + log_softmax) keeps [rows, V]
    fp32 log-probabilities for backward, where their gradient of the same size appears; its dW
    is an ordinary gradient, made in backward.
    """
    t, b = o.token_budget, o.compute_bytes
    per_layer = _layer_activation_bytes(m, o) * t
    final_norm = (4 + 2 * b) * m.hidden * t
    if o.activation_checkpointing:
        saved, recompute = m.num_layers * b * m.hidden * t + final_norm, per_layer
    else:
        saved, recompute = m.num_layers * per_layer + final_norm, 0.0
    backward = recompute + b * (2 * m.hidden + 2 * m.intermediate) * t
    scores = 2 * 4 * m.num_heads * o.max_seqlen ** 2 if o.attention == "eager" else 0.0

    rows = o.counted_fraction * t
    if o.loss_impl == "naive":
        logits = 4 * m.vocab * rows
        return _StepMemory(saved, backward, scores, logits, 0.0, logits)
    head_grad = m.vocab * m.hidden if o.finetune == "full" else 0
    if o.loss_impl == "fused":
        persist = b * (t * m.hidden + head_grad) + 8 * rows
        return _StepMemory(saved, backward, scores, persist, float(TRITON_WORKSPACE_BYTES))
    persist = 4 * rows * m.hidden + 8 * rows + 4 * head_grad
    transient = 0.0
    if o.loss_impl == "torch":
        transient = min(o.loss_chunk_bytes, 4 * m.vocab * rows)
        if o.compute_bytes != 4:
            transient += 4 * m.vocab * m.hidden
    return _StepMemory(saved, backward, scores, persist, transient)


def plan(model: str | ModelSpec | dict, options: PlanOptions | None = None, **overrides) -> Plan:
    """The per-GPU memory of one SPIN iteration of ``model`` under ``options``.

    Args:
        model: a preset name (llama3-8b, llama3-70b, qwen2.5-72b, mistral-7b), a config.json
            path, a config dict or a ModelSpec.
        options: PlanOptions; keyword ``overrides`` replace its fields.
    """
    m = resolve_model(model)
    o = dataclasses.replace(options or PlanOptions(), **overrides)
    n = o.num_gpus if o.sharded else 1
    b, mb, s = o.compute_bytes, o.param_bytes, OPTIMIZER_STATES[o.optimizer]
    p = m.num_params

    if o.finetune == "full":
        params, trainable = p * mb / n, p
    else:  # frozen base in the compute dtype + fp32 adapters
        trainable = m.lora_params(o.lora_rank)
        params = (p * b + trainable * 4) / n
        mb = 4
    grads = trainable * mb / n
    optim = s * trainable * mb / n
    reference = p * b / n if o.reference_mode == "frozen-model" else 0.0

    # FSDP's compute copies: the root (embeddings, lm_head; kept from forward to backward) and
    # two layers (the current one and the prefetched next).
    gathered = (m.root_params + 2 * m.layer_params) * b if o.sharded else 0.0
    # Unsharded gradients alive in backward: the layer being differentiated (compute dtype)
    # plus the previous layer's fp32 reduce-scatter input, and the lm_head's gradient, which
    # exists from the start of backward until the root's reduce-scatter at its end. Unsharded
    # (one process), the gradients are the resident ones already counted.
    grads_in_flight = 0.0
    if o.sharded:
        if o.finetune == "full":
            grads_in_flight = m.layer_params * (b + 4) + m.vocab * m.hidden * b
        else:
            grads_in_flight = m.lora_params(o.lora_rank) / m.num_layers * 8
    step = _step_memory(m, o)
    gen_tokens = o.prompt_len + o.max_new_tokens
    kv_cache = o.gen_batch * gen_tokens * m.num_layers * 2 * m.kv_dim * b
    # One generate call's transients: the prefill of one layer (no autograd) and the fp32
    # logits of the last position (plus the sampler's copy).
    gen_transient = o.gen_batch * o.prompt_len * b * (2 * m.hidden + 2 * m.intermediate) + 2 * 4 * o.gen_batch * m.vocab

    on_host = params + grads + optim + reference if o.cpu_offload else 0.0
    resident = 0.0 if o.cpu_offload else params + grads + optim + reference
    resident_gen = 0.0 if o.cpu_offload else params + optim + reference
    # Two candidate peaks: the end of the loss forward (every saved activation, the loss's
    # dW/dh and its transient logits chunk) and the start of backward (the first recomputed
    # layer, the backward workspace, unsharded gradients in flight; ours has handed dW/dh over
    # by then, the naive loss still holds its logits and adds their gradient).
    # Attention scores are transient in either.
    forward_end = step.loss_persist + step.loss_transient
    backward_start = step.backward + grads_in_flight + (
        step.loss_persist + step.loss_backward if o.loss_impl == "naive" else 0.0)
    dynamic = step.saved + step.scores + max(forward_end, backward_start)
    train_peak = resident + gathered + dynamic
    if not o.grad_accumulation and not o.sharded:  # gradients only appear as activations are freed
        train_peak = resident - grads + gathered + max(grads, dynamic)
    generation_peak = resident_gen + gathered + kv_cache + gen_transient

    rows = {
        "parameters (sharded; fp32 masters if full)": 0.0 if o.cpu_offload else params,
        "gradients (sharded)": 0.0 if o.cpu_offload else grads,
        f"optimizer states ({o.optimizer}: {s})": 0.0 if o.cpu_offload else optim,
        "reference model (frozen, sharded)": 0.0 if o.cpu_offload else reference,
        "all-gathered params (root + 2 layers)": gathered,
        "unsharded grads in flight": grads_in_flight,
        f"activations saved ({'checkpointed' if o.activation_checkpointing else 'all layers'})": step.saved,
        "activations in backward (recompute, workspace)": step.backward,
        f"attention scores ({o.attention})": step.scores,
        f"loss workspace, fwd->bwd ({o.loss_impl})": step.loss_persist,
        "loss workspace, during the loss (chunk, kernels)": step.loss_transient,
        "loss workspace, backward (logits grad)": step.loss_backward,
        "generation KV cache": kv_cache,
        "generation transients (prefill, logits)": gen_transient,
    }
    usable = o.gpu_memory_gib * GiB * (1 - o.fragmentation) - o.reserve_gib * GiB
    host_per_node = on_host * min(o.num_gpus, o.gpus_per_node)
    notes = []
    if o.mixed_precision and o.param_bytes == 2 and o.finetune == "full":
        notes.append("bf16 master weights: updates below bf16 resolution (SPIN's lr 5e-7) are lost")
    if o.token_budget < 2 * o.max_seqlen:
        notes.append(f"token budget {o.token_budget} < one pair of max_seqlen ({2 * o.max_seqlen} tokens)")
    return Plan(m, o, rows, train_peak, generation_peak, usable, host_per_node, notes)


def _powers_of_two_down(start: int, stop: int) -> Iterable[int]:
    v = start
    while v >= stop:
        yield v
        v //= 2


def gpu_counts(max_gpus: int, gpus_per_node: int = 8) -> list[int]:
    """1, 2, 4, ... up to a node, then whole nodes, up to ``max_gpus``."""
    counts = [g for g in (1, 2, 4, 8, 16, 32) if g <= min(max_gpus, gpus_per_node)]
    counts += list(range(2 * gpus_per_node, max_gpus + 1, gpus_per_node))
    if max_gpus not in counts:
        counts.append(max_gpus)
    return sorted(set(counts))


def recommend(model: str | ModelSpec | dict, options: PlanOptions | None = None, *, max_gpus: int | None = None,
              **overrides) -> Plan | None:
    """The cheapest configuration that fits, or None.

    "Cheapest", in this order of priority:
      1. no CPU offload (offload moves the optimizer step to the host and every parameter over
         PCIe twice a step: several times slower), then the fewest GPUs (up to ``max_gpus``,
         default ``options.num_gpus``);
      2. if only offload fits: all ``max_gpus`` GPUs (with offload the GPUs wait on the host;
         fewer GPUs would only make the iteration longer);
      3. the largest token budget per GPU (powers of two down from the requested one, never
         below one pair of ``max_seqlen``): fewer, larger micro-batches;
      4. no activation checkpointing (it costs one extra forward, about +33% compute);
      5. the largest generation batch (halving down from the requested one).
    Fixed: fine-tuning mode, optimizer, precision, reference mode, lengths.
    """
    base = dataclasses.replace(options or PlanOptions(), **overrides)
    top = max_gpus or base.num_gpus
    min_budget = min(base.token_budget, 2 * base.max_seqlen)

    def first_fit(gpus: Iterable[int], offload: bool) -> Plan | None:
        for g in gpus:
            for budget in _powers_of_two_down(base.token_budget, min_budget):
                for ac in (False, True):
                    for gen in _powers_of_two_down(base.gen_batch, 1):
                        p = plan(model, base, num_gpus=g, cpu_offload=offload, token_budget=budget,
                                 activation_checkpointing=ac, gen_batch=gen)
                        if p.fits:
                            return p
        return None

    return first_fit(gpu_counts(top, base.gpus_per_node), False) or first_fit([top], True)
