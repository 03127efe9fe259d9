"""What the memory planner plans: ``PlanOptions``, one configuration of a SPIN iteration."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2 ** 30
MiB = 2 ** 20
OPTIMIZER_STATES = {"sgd": 0, "rmsprop": 1, "adamw": 2, "adam": 2}
OPTIMIZER_IMPLS = ("default", "foreach", "for-loop", "fused")
#: Optimizers torch implements with ``fused=True`` (RMSprop has no fused kernel).
FUSED_OPTIMIZERS = ("adamw", "adam", "sgd")
REFERENCE_MODES = ("precomputed", "frozen-model", "lora-disabled")
ATTENTION = ("flash", "sdpa_loop", "eager")
LOSS_IMPLS = ("fused", "cpu", "torch", "naive")
FINETUNE = ("full", "lora")
QUANTIZE = ("none", "nf4")
DEVICES = ("cuda", "cpu")

#: Non-tensor memory of one training process on a GPU, bytes: the CUDA context with lazily
#: loaded kernels (~400 MB with CUDA >= 11.7 lazy module loading: pytorch/pytorch#109888;
#: taken as 0.5 GiB for the cuBLAS/Triton modules loaded later).
CUDA_CONTEXT_BYTES = GiB // 2
#: NCCL's buffers of one communicator per GPU: 1.06 GB measured on 8 x H100 before any
#: all-to-all (NVIDIA/nccl#1685), 544-688 MB per group on 4 x A100 (NVIDIA/nccl#964); NVLS
#: (H100 NVSwitch) takes the most (NeMo disables it to save memory: NeMo-Framework-Launcher#127).
NCCL_BUFFER_BYTES = GiB


@dataclass(frozen=True)
class PlanOptions:
    """What is planned. Defaults: the paper's SPIN recipe (RMSprop, bf16, 1024-token sequences,
    256 new tokens) on FSDP2 over GPUs with fp32 master weights and the Triton fused loss.

    Attributes:
        num_gpus: GPUs (or CPU processes) sharding the model: the FSDP world size.
        gpu_memory_gib: memory of one GPU (of one process's share of the host on CPU).
        device: "cuda" (NCCL collectives, torch's foreach optimizer step, a CUDA context per
            process) or "cpu" (gloo: one more copy of each reduce-scatter input; torch's for-loop
            optimizer step; the trainer's CPU paths).
        token_budget: packed tokens in one micro-batch on one GPU.
        max_seqlen: longest sequence (prompt + response); a micro-batch holds at least one pair.
        counted_fraction: share of tokens that predict a response token (the fused loss's rows).
        finetune: "full" or "lora" (adapters of ``lora_rank`` on all 7 linear maps per layer on a
            frozen base in the compute dtype).
        quantize: "nf4" (QLoRA, with ``finetune="lora"``): the frozen base's linear weights in
            4-bit NF4 (bitsandbytes: 0.5 byte per weight + one fp32 absmax per block of 64);
            embeddings, norms and the lm_head stay in the compute dtype. Sharded (FSDP), the packed
            weights are stored as bf16 elements (``bnb_4bit_quant_storage``) and the absmax
            replicated on every rank (Answer.AI's FSDP-QLoRA layout; the trainer runs QLoRA in one
            process only).
        optimizer: "rmsprop" (the paper's; 1 state), "adamw" (2 states) or "sgd" (none).
        optimizer_impl: torch's implementation of the step: "foreach" (one more fp32 copy of the
            whole trainable shard), "for-loop" (one parameter at a time: a copy of the largest
            parameter or two), "fused" (no copy; AdamW/SGD only) or "default": what torch picks
            and the trainer runs (foreach on CUDA, for-loop on CPU and for offloaded shards).
        mixed_precision: "bf16" (compute in bf16, fp32 master weights/gradients/states) or None
            (compute in the parameters' dtype, ``param_bytes``).
        param_bytes: bytes of a stored (master) parameter: 4 (fp32, default) or 2.
        cpu_offload: FSDP2 CPUOffloadPolicy: sharded parameters, gradients and optimizer states
            live in host memory (pinned; the optimizer step runs on the CPU).
        activation_checkpointing: recompute each decoder layer in backward.
        reference_mode: "precomputed" (log-probs from the opponent right after generation: no
            model), "frozen-model" (a second sharded model in the compute dtype),
            "lora-disabled" (the LoRA policy with its adapter off: no extra weights).
        share_prompt: the shared-prompt layout (one segment [prompt | real | synthetic] per pair);
            on CPU its attention gathers each synthetic branch's prefix again.
        gen_batch, prompt_len, max_new_tokens: one ``generate`` call on one GPU.
        attention: "flash" (varlen flash attention, GPU), "sdpa_loop" (the CPU path: sequences of
            similar length batched, padded by up to 25%), "eager" (scores materialised).
        loss_impl: "fused" (Triton: dW and dh in the compute dtype, a fixed workspace, no logits),
            "cpu" (the C++ kernels: fp32 dW/dh, logits of whole pairs kept up to
            ``loss_chunk_bytes``), "torch" (the chunked torch path: fp32 dW/dh, one logits chunk, an
            fp32 copy of a low-precision head), "naive" (full logits).
        loss_chunk_bytes: the torch path's logits chunk / the C++ kernel's logits store (256 MiB).
        fsdp: shard with FSDP2 (default: num_gpus > 1, or bf16 mixed precision without QLoRA).
        grad_accumulation: gradients of earlier micro-batches are alive during the next one.
        fragmentation: share of GPU memory left to the caching allocator's fragmentation.
        reserve_gib: memory set aside besides the priced terms (default none).
        process_gib: non-tensor memory of the process (None: CUDA context + NCCL buffers on CUDA;
            0 on CPU, where the validation measures above the process's own baseline).
        host_memory_gib, gpus_per_node: host memory of one node (default 2 TiB: a DGX H100/H200
            has 2 TB) and GPUs per node (offload checks, multi-node launch commands).
    """

    num_gpus: int = 8
    gpu_memory_gib: float = 80.0
    device: str = "cuda"
    token_budget: int = 8192
    max_seqlen: int = 1024
    counted_fraction: float = 0.5
    finetune: str = "full"
    lora_rank: int = 16
    quantize: str = "none"
    optimizer: str = "rmsprop"
    optimizer_impl: str = "default"
    mixed_precision: str | None = "bf16"
    param_bytes: int = 4
    cpu_offload: bool = False
    activation_checkpointing: bool = True
    reference_mode: str = "precomputed"
    share_prompt: bool = False
    gen_batch: int = 32
    prompt_len: int = 512
    max_new_tokens: int = 256
    attention: str = "flash"
    loss_impl: str = "fused"
    loss_chunk_bytes: int = 256 * MiB
    fsdp: bool | None = None
    grad_accumulation: bool = True
    fragmentation: float = 0.10
    reserve_gib: float = 0.0
    process_gib: float | None = None
    host_memory_gib: float = 2048.0
    gpus_per_node: int = 8

    def __post_init__(self):
        for ok, msg in self._checks():
            if not ok:
                raise ValueError(msg)

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            (self.num_gpus >= 1, "num_gpus must be >= 1"),
            (self.gpu_memory_gib > 0, "gpu_memory_gib must be > 0"),
            (self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}"),
            (self.token_budget >= 1 and self.max_seqlen >= 1, "token_budget and max_seqlen must be >= 1"),
            (0 < self.counted_fraction <= 1, "counted_fraction must be in (0, 1]"),
            (self.finetune in FINETUNE, f"finetune must be one of {FINETUNE}, got {self.finetune!r}"),
            (self.lora_rank >= 1, "lora_rank must be >= 1"),
            (self.quantize in QUANTIZE, f"quantize must be one of {QUANTIZE}, got {self.quantize!r}"),
            (self.quantize == "none" or self.finetune == "lora", "quantize='nf4' (QLoRA) needs finetune='lora'"),
            (self.optimizer in OPTIMIZER_STATES, f"optimizer must be one of {sorted(OPTIMIZER_STATES)}"),
            (self.optimizer_impl in OPTIMIZER_IMPLS, f"optimizer_impl must be one of {OPTIMIZER_IMPLS}"),
            (self.optimizer_impl != "fused" or self.optimizer in FUSED_OPTIMIZERS,
             f"optimizer_impl='fused': torch has no fused {self.optimizer} (only {', '.join(FUSED_OPTIMIZERS)})"),
            (self.mixed_precision in (None, "bf16", "fp16"), "mixed_precision must be 'bf16', 'fp16' or None"),
            (self.param_bytes in (2, 4), "param_bytes must be 2 or 4"),
            (self.reference_mode in REFERENCE_MODES, f"reference_mode must be one of {REFERENCE_MODES}"),
            (self.reference_mode != "lora-disabled" or self.finetune == "lora",
             "reference_mode='lora-disabled' needs finetune='lora'"),
            (self.attention in ATTENTION, f"attention must be one of {ATTENTION}"),
            (self.loss_impl in LOSS_IMPLS, f"loss_impl must be one of {LOSS_IMPLS}"),
            (0 <= self.fragmentation < 1, "fragmentation must be in [0, 1)"),
            (not self.cpu_offload or self.sharded, "cpu_offload is FSDP2's CPUOffloadPolicy: it needs fsdp"),
        ]

    @property
    def sharded(self) -> bool:
        """FSDP2 shards the model (on one GPU too: the trainer's bf16 mixed precision is FSDP's)."""
        if self.fsdp is not None:
            return self.fsdp
        return self.num_gpus > 1 or (self.mixed_precision is not None and self.quantize == "none")

    @property
    def world(self) -> int:
        """Ranks sharing each parameter (1 when unsharded)."""
        return self.num_gpus if self.sharded else 1

    @property
    def compute_bytes(self) -> int:
        return 2 if self.mixed_precision else self.param_bytes

    @property
    def mode(self) -> str:
        """"full", "lora" or "qlora"."""
        return "qlora" if self.quantize == "nf4" else self.finetune

    @property
    def step_impl(self) -> str:
        """The optimizer implementation in force ("default" resolved as torch resolves it)."""
        if self.optimizer_impl != "default":
            return self.optimizer_impl
        # torch's foreach kernels need CUDA tensors; offloaded shards step on the host.
        return "foreach" if self.device == "cuda" and not self.cpu_offload else "for-loop"

    @property
    def process_bytes(self) -> float:
        if self.process_gib is not None:
            return self.process_gib * GiB
        if self.device == "cpu":
            return 0.0
        return CUDA_CONTEXT_BYTES + (NCCL_BUFFER_BYTES if self.num_gpus > 1 else 0)
