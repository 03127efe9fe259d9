"""The terms of the plan: bytes per rank of everything alive during a SPIN iteration.

Each function prices one group of terms for a model shape ``m`` and options ``o``; the comments
say which code allocates each term and when it is freed. ``estimate.py`` adds them up moment by
moment. Notation: W ranks share each parameter (1 unsharded), b = bytes of the compute dtype,
E = vocab x hidden (one embedding matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import ModelSpec
from .options import OPTIMIZER_STATES, PlanOptions

#: spin_kernels.triton.backward.DEFAULT_WORKSPACE_BYTES, restated (the planner runs where Triton
#: is not installed); tests/test_triton_kernels.py keeps the two equal.
TRITON_WORKSPACE_BYTES = 56 * 2**20
#: bitsandbytes NF4: 4 bits per weight, one fp32 absmax per block of 64 weights (the trainer's
#: BitsAndBytesConfig: no double quantization).
NF4_BYTES, NF4_ABSMAX_BYTES = 0.5, 4 / 64
#: The CPU attention path batches sequences of similar length, padded to the longest by up to
#: this share (spin_kernels.models.attention._length_buckets, max_waste).
SDPA_LOOP_PADDING = 0.25
#: The C++ kernel's largest row tile and its vocabulary tile (spin_kernels.ops.backends.cpu_backend).
CPU_MAX_ROW_TILE, CPU_VOCAB_TILE = 512, 512


def trainable_params(m: ModelSpec, o: PlanOptions) -> int:
    return m.num_params if o.finetune == "full" else m.lora_params(o.lora_rank)


def trainable_bytes(o: PlanOptions) -> int:
    """Bytes of a trainable (master) parameter, its gradient and each optimizer state: fp32
    adapters under LoRA, ``param_bytes`` masters under full fine-tuning."""
    return o.param_bytes if o.finetune == "full" else 4


def frozen_base_bytes(m: ModelSpec, o: PlanOptions) -> float:
    """Bytes of the frozen base of LoRA/QLoRA (whole model): compute dtype, or NF4 for the linear
    weights with their absmax (replicated on every rank when sharded; the caller divides the
    rest by W)."""
    if o.quantize == "nf4":
        linear = m.num_layers * m.layer_linear_params
        return linear * NF4_BYTES + (m.num_params - linear) * o.compute_bytes
    return m.num_params * o.compute_bytes


def nf4_absmax(m: ModelSpec, o: PlanOptions) -> float:
    return m.num_layers * m.layer_linear_params * NF4_ABSMAX_BYTES if o.quantize == "nf4" else 0.0


def cpu_mapped_checkpoint(m: ModelSpec, o: PlanOptions) -> float:
    """One CPU process loads a checkpoint zero-copy: the parameters it keeps unquantized are views
    of the safetensors mapping, so the mapping stays, and with it the pages of the full-precision
    linear weights read to quantize them to NF4 (measured: +10.7 MiB for 12 MB of fp32 linear
    weights). Clean page cache, but resident. Taken in the compute dtype (the checkpoint's)."""
    if o.device != "cpu" or o.quantize != "nf4" or o.sharded:
        return 0.0
    return float(m.num_layers * m.layer_linear_params * o.compute_bytes)


#: On CPU, memory the steps leave resident beyond their tensors: glibc heap growth from small
#: allocations (LoRA adapters, their gradients and states, autograd's bookkeeping) and library
#: caches filled on the first steps: up to ~3 MiB above the tensors on the validation models
#: (benchmarks/planner.py: the wide model's LoRA runs), priced at 5 MiB.
CPU_RUNTIME_SLACK = 5 * 2**20


def model_states(m: ModelSpec, o: PlanOptions) -> dict[str, float]:
    """Per-rank bytes of what persists across the iteration: parameters (and NF4 absmax),
    sharded gradients (during a training step only), optimizer states, a frozen reference."""
    w, tb, s = o.world, trainable_bytes(o), OPTIMIZER_STATES[o.optimizer]
    t = trainable_params(m, o)
    if o.finetune == "full":
        params = m.num_params * tb / w
    else:
        params = (frozen_base_bytes(m, o) + t * 4) / w
    return {
        "parameters": params,
        "NF4 absmax (replicated)": nf4_absmax(m, o),
        "checkpoint pages kept mapped (CPU QLoRA)": cpu_mapped_checkpoint(m, o),
        "CPU runtime slack (heap, caches)": float(CPU_RUNTIME_SLACK) if o.device == "cpu" else 0.0,
        "gradients (sharded)": t * tb / w,
        f"optimizer states ({o.optimizer}: {s})": s * t * tb / w,
        "reference model (frozen, sharded)": m.num_params * o.compute_bytes / w
        if o.reference_mode == "frozen-model" else 0.0,
    }


# -- the optimizer step ---------------------------------------------------------------------

#: Temporaries of torch's single-tensor (for-loop) step per parameter, as multiples of it: RMSprop
#: ``square_avg.sqrt().add_(eps)``: 1; Adam(W) ``(exp_avg_sq.sqrt() / bias_correction2_sqrt)``: 2
#: (the quotient is made while the root is alive). The previous parameter's temporary is still
#: bound to its Python name while the next one is made (measured on CPU: 32 + 8 MiB for an 8 MiB
#: tensor before a 32 MiB one with RMSprop, 2 x 32 + 8 with AdamW).
FOR_LOOP_COPIES = {"rmsprop": 1, "adamw": 2, "adam": 2, "sgd": 0}


def optimizer_step_copy(m: ModelSpec, o: PlanOptions) -> float:
    """Bytes the optimizer step allocates beyond states and gradients, on this rank's shard.

    ``foreach``: ``torch._foreach_sqrt(square_avgs)`` (RMSprop) / ``torch._foreach_sqrt(exp_avg_sqs)``
    (AdamW) returns a new list as large as the whole trainable shard, alive until the update
    (measured: +96 MiB for 96 MiB of fp32 parameters, both optimizers). ``for-loop``: one
    parameter at a time (``FOR_LOOP_COPIES``). ``fused``: none (measured +4 KiB). Weight decay is 0
    in the paper's recipe (RMSprop with it would add one more copy of the gradient)."""
    tb, w = trainable_bytes(o), o.world
    sizes = [-(-n // w) * tb for n in m.tensor_sizes(o.lora_rank if o.finetune == "lora" else 0)]
    impl = o.step_impl
    if impl == "fused" or o.optimizer == "sgd":
        return 0.0
    if impl == "foreach":
        return float(sum(sizes))
    k = FOR_LOOP_COPIES[o.optimizer]
    return float(max(k * s + (sizes[i - 1] if i else 0) for i, s in enumerate(sizes)))


# -- FSDP2 -------------------------------------------------------------------------------------

def unit_bytes(m: ModelSpec, o: PlanOptions) -> tuple[float, float]:
    """(root, one layer): bytes of FSDP units all-gathered in the compute dtype. The root holds
    the embeddings, final norm and lm_head; a layer its weights (LoRA: + adapters; QLoRA: the
    packed 4-bit weights, dequantized one matmul at a time)."""
    b = o.compute_bytes
    root = m.root_params * b
    layer = m.layer_params * b
    if o.quantize == "nf4":
        layer = m.layer_linear_params * NF4_BYTES + (m.layer_params - m.layer_linear_params) * b
    if o.finetune == "lora":
        layer += m.lora_params(o.lora_rank) / m.num_layers * b
    return root, layer


def all_gather_buffer(unit: float, o: PlanOptions) -> float:
    """FSDP2's flat all-gather output, alive with the unit's unsharded parameters while they are
    copied out of it (fsdp/_fully_shard/_fsdp_collectives.py: foreach_all_gather,
    foreach_all_gather_copy_out); gloo's copy of the output during the collective (measured: one
    copy of the output) takes the place of the not yet allocated parameters. With mixed
    precision the shard is first cast into a flat input (1/W of the unit)."""
    return unit + (unit / o.world if o.mixed_precision else 0.0)


def reduce_dtype_bytes(o: PlanOptions) -> int:
    """Gradients are reduce-scattered in fp32 with mixed precision (apply_fsdp2's reduce_fp32)."""
    return 4 if o.mixed_precision else o.param_bytes if o.finetune == "full" else 4


def grads_in_flight(m: ModelSpec, o: PlanOptions) -> float:
    """Unsharded gradients of one layer in backward: the layer's own (compute dtype, made by
    autograd) and the previous layer's reduce-scatter input (reduce dtype), which FSDP keeps until
    the next layer's post-backward (reduce_scatter_max_input_buffers = 1). gloo copies the input
    during the collective (measured: one copy of the input), when the layer's own are freed."""
    n = m.layer_params if o.finetune == "full" else m.lora_params(o.lora_rank) / m.num_layers
    own = n * (o.compute_bytes if o.finetune == "full" else 4)
    rs = n * reduce_dtype_bytes(o)
    return rs + max(own, rs if o.device == "cpu" else 0.0)


def root_reduce(m: ModelSpec, o: PlanOptions) -> dict[str, float]:
    """End of backward, full fine-tuning under FSDP: the root's unsharded gradients (lm_head: the
    fused loss's dW; embeddings: made last) are copied into one flat reduce-scatter input after
    the root's parameters are resharded, then freed; gloo copies that input again during the
    collective, whose output is the next sharded gradient. The loss's own dW stays referenced by
    its autograd node until the backward pass ends (``LinearSPINLossFunction`` saves it and hands
    the same tensor back, so AccumulateGrad gives the unsharded parameter a copy). Measured on the
    wide model, 2 gloo ranks: the input, gloo's copy, the output and one [V, H] at once."""
    if o.finetune != "full" or not o.sharded:
        return {}
    rd, w = reduce_dtype_bytes(o), o.world
    rs = m.root_params * rd
    copy = {"gloo's copy of the reduce-scatter input": rs} if o.device == "cpu" else {}
    return {"the loss's dW (held by its autograd node)": m.embedding_params * o.compute_bytes,
            "reduce-scatter input (root)": rs, **copy, "reduce-scatter output (root)": rs / w}


# -- activations and the loss ------------------------------------------------------------------

def layer_activation_bytes(m: ModelSpec, o: PlanOptions) -> float:
    """Bytes saved for backward per token by one decoder layer (HF Llama-style block).

    Counted from what autograd keeps: each RMSNorm saves its fp32 input (``x.to(float32)``,
    the same tensor when the model is fp32), the normalised input in the compute dtype (for its
    weight's gradient: not under LoRA, where the weight is frozen) and its output (kept by the
    next linear maps): 4 + 2b bytes per hidden unit (4 + b under LoRA), twice. Attention keeps
    q, k, v and its output (CPU "sdpa_loop": the gathered, padded copies of q, k, v and of the
    output; under the shared-prompt layout the synthetic branch's prefix is gathered again).
    The gated MLP keeps gate, up, silu(gate) and their product. LoRA: each adapter's rank-r
    intermediate; QLoRA: nothing more (bitsandbytes saves the packed weight).
    """
    b = o.compute_bytes
    norms = 2 * norm_saved_bytes(o) * m.hidden
    attn = b * (2 * m.q_dim + 2 * m.kv_dim)
    if o.attention == "sdpa_loop":
        attn += b * (2 * m.q_dim + 2 * m.kv_dim) * (SDPA_LOOP_PADDING + shared_prefix_share(o))
        attn += b * m.q_dim
    attn += 4 * m.num_heads  # log-sum-exp of flash/SDPA kernels, fp32
    mlp = 4 * b * m.intermediate
    lora = 7 * b * o.lora_rank if o.finetune == "lora" else 0
    return norms + attn + mlp + lora


def norm_saved_bytes(o: PlanOptions) -> int:
    """Bytes an RMSNorm keeps per hidden unit (see ``layer_activation_bytes``)."""
    b = o.compute_bytes
    return 4 + (b if o.finetune == "lora" else 2 * b)


def shared_prefix_share(o: PlanOptions) -> float:
    """Under the shared-prompt layout on CPU ("sdpa_gather"), the prefix rows gathered again per
    token of the batch: at most prompt / (prompt + 2 responses) (a pair is one segment)."""
    if not o.share_prompt or o.attention != "sdpa_loop":
        return 0.0
    return 1.0 - o.counted_fraction if o.counted_fraction < 1 else 0.0


def nf4_dequantized(m: ModelSpec, o: PlanOptions) -> float:
    """QLoRA: bitsandbytes dequantizes one 4-bit weight to the compute dtype per matmul (forward,
    and again for the input's gradient in backward): the largest linear map's weight."""
    if o.quantize != "nf4":
        return 0.0
    return float(max(a * b for a, b in m.linear_shapes()) * o.compute_bytes)


@dataclass(frozen=True)
class StepMemory:
    """The dynamic memory of one micro-batch's forward/backward, by lifetime (bytes)."""

    saved: float           # activations kept from forward to backward (incl. the final norm's)
    layer_forward: float   # transients inside one layer's forward (attention, a dequantized NF4 weight)
    backward: float        # one layer recomputed (checkpointing) + one layer's backward workspace
    scores: float          # attention scores (eager attention only), transient
    loss_persist: float    # the loss's dh (and dW of a trainable head): loss forward -> backward
    loss_transient: float  # logits chunk / store / workspace, during the loss only
    loss_backward: float = 0.0  # the naive loss's logits gradient, at the start of backward
    head_grad: float = 0.0  # dW of the lm_head inside loss_persist (a gradient from then on)
    loss_no_grad: float = 0.0  # the reference pass's log-probs without gradients: chunk / tiles / workspace


def step_memory(m: ModelSpec, o: PlanOptions) -> StepMemory:
    """Activations and loss memory of one micro-batch of ``token_budget`` tokens.

    With checkpointing only each layer's input survives the forward; in backward one layer is
    recomputed at a time. The backward workspace is one layer's gradients of its output, of the
    residual stream and of the MLP's intermediate. The fused losses compute the head's gradients in their forward; they
    live until the backward starts and then become the lm_head's gradient. Triton ("fused"): dW
    [V, H] (none when the head is frozen under LoRA) and dh [tokens, H] in the compute dtype,
    plus its fixed workspace during the loss; C++ ("cpu"): both in fp32 (dh over all tokens) and
    the logits of a group of whole pairs (at least two row tiles, at most the store budget);
    the torch path: fp32 dW and dh over the counted rows, one logits chunk, and an fp32 copy
    of a low-precision head during the loss. The naive loss keeps [rows, V] fp32 log-probs for
    backward, where their gradient of the same size appears; its dW is made in backward.
    """
    t, b = o.token_budget, o.compute_bytes
    per_layer = layer_activation_bytes(m, o) * t
    final_norm = norm_saved_bytes(o) * m.hidden * t
    if o.activation_checkpointing:
        saved, recompute = m.num_layers * b * m.hidden * t + final_norm, per_layer
    else:
        saved, recompute = m.num_layers * per_layer + final_norm, 0.0
    # A layer's backward: the gradient of its output and of the residual stream (2H) and the
    # gradient its MLP produces (I) at once; the recomputed activations are freed as it goes.
    backward = recompute + b * (2 * m.hidden + m.intermediate) * t
    scores = 2 * 4 * m.num_heads * o.max_seqlen ** 2 if o.attention == "eager" else 0.0
    layer_forward = b * (m.q_dim + 2 * m.kv_dim) * t if o.attention == "sdpa_loop" else 0.0
    layer_forward += nf4_dequantized(m, o)
    backward += nf4_dequantized(m, o)
    rows = o.counted_fraction * t
    if o.loss_impl == "naive":
        logits = 4 * m.vocab * rows
        return StepMemory(saved, layer_forward, backward, scores, logits, 0.0, logits, loss_no_grad=logits)
    head = m.embedding_params if o.finetune == "full" else 0
    if o.loss_impl == "fused":
        workspace = float(TRITON_WORKSPACE_BYTES)
        return StepMemory(saved, layer_forward, backward, scores, b * (t * m.hidden + head) + 8 * rows, workspace,
                          head_grad=b * head, loss_no_grad=workspace)
    dh_rows = t if o.loss_impl == "cpu" else rows
    persist = 4 * (dh_rows * m.hidden + head) + 8 * rows
    if o.loss_impl == "cpu":
        # The logits store of one group of whole pairs (at least two row tiles), and one thread's
        # [row tile, vocab tile] logits and [row tile, H] dhidden share per torch thread (one here);
        # a forward without gradients keeps no store.
        tile = min(CPU_MAX_ROW_TILE, max(64, (1 << 19) // m.hidden))
        no_grad = 4 * tile * (CPU_VOCAB_TILE + m.hidden)
        transient = no_grad + 4 * m.vocab * min(rows, max(o.max_seqlen * 2 * o.counted_fraction, 2 * tile),
                                                o.loss_chunk_bytes // (4 * m.vocab))
    else:
        transient = no_grad = min(o.loss_chunk_bytes, 4 * m.vocab * rows)
    if b != 4:
        transient += 4 * m.embedding_params  # the fp32 copy of a low-precision head
        no_grad += 4 * m.embedding_params
    return StepMemory(saved, layer_forward, backward, scores, persist, transient, head_grad=4 * head,
                      loss_no_grad=no_grad)


# -- generation ----------------------------------------------------------------------------------

def generation_terms(m: ModelSpec, o: PlanOptions) -> dict[str, float]:
    """One ``generate`` call: the KV cache of ``gen_batch`` sequences of prompt + new tokens (compute
    dtype), the prefill of one layer (no autograd) and the fp32 logits of the last position (and the
    sampler's copy)."""
    b = o.compute_bytes
    kv = o.gen_batch * (o.prompt_len + o.max_new_tokens) * m.num_layers * 2 * m.kv_dim * b
    prefill = o.gen_batch * o.prompt_len * b * (2 * m.hidden + 2 * m.intermediate)
    return {"generation KV cache": kv,
            "generation transients (prefill, logits)": prefill + 2 * 4 * o.gen_batch * m.vocab}


# -- host memory ---------------------------------------------------------------------------------

def _pow2(n: float) -> float:
    """torch's pinned-memory (CachingHostAllocator) block: the request rounded up to a power of two."""
    return float(1 << (max(int(n), 1) - 1).bit_length())


def host_terms(m: ModelSpec, o: PlanOptions) -> dict[str, float]:
    """Host memory of one node, bytes.

    Rank 0 reads the whole checkpoint into host memory to broadcast it (``load_full_weights``:
    ``read_safetensors`` in the stored dtype, fp32 for full fine-tuning) and gathers the full
    state dict again to export each iteration's model. With CPU offload every rank also keeps
    its shard of parameters and gradients in pinned memory (torch's pinned allocator rounds each
    tensor up to a power of two), its optimizer states (ordinary memory) and the step's
    temporaries on the host (torch's for-loop step on CPU tensors)."""
    per_node = min(o.num_gpus, o.gpus_per_node)
    stored = m.num_params * (o.param_bytes if o.finetune == "full" else o.compute_bytes)
    rows = {"rank 0's full copy (load / export)": float(stored)}
    if not o.cpu_offload:
        return rows
    states = model_states(m, o)
    tb, w = trainable_bytes(o), o.world
    trainable = [_pow2(-(-n // w) * tb) for n in m.tensor_sizes(o.lora_rank if o.finetune == "lora" else 0)]
    frozen = []
    if o.finetune == "lora":  # the frozen base, each tensor pinned (NF4: at its packed size)
        per_param = frozen_base_bytes(m, o) / m.num_params
        frozen = [_pow2(-(-n // w) * per_param) for n in m.tensor_sizes()]
    pinned_grads, pinned_params = sum(trainable), sum(trainable) + sum(frozen)
    opt_key = next(k for k in states if k.startswith("optimizer states"))
    rows.update({
        "offloaded parameters (pinned, per rank x GPUs)": pinned_params * per_node,
        "offloaded gradients (pinned)": pinned_grads * per_node,
        "offloaded optimizer states": states[opt_key] * per_node,
        "offloaded optimizer step temporaries": optimizer_step_copy(m, o) * per_node,
    })
    return rows
