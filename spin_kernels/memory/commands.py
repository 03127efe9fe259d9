"""The trainer command that runs a planned configuration (``spin-kernels iterate`` or ``torchrun``)."""

from __future__ import annotations

from .options import PlanOptions


def _unsupported(o: PlanOptions) -> list[str]:
    why = {
        o.optimizer not in ("rmsprop", "adamw"): f"optimizer {o.optimizer!r} (the trainer has rmsprop and adamw)",
        o.optimizer_impl != "default": f"the {o.optimizer_impl} optimizer step (the trainer builds torch's default: "
                                       f"foreach on CUDA, for-loop on CPU and offloaded shards)",
        o.mixed_precision == "fp16": "fp16 mixed precision (the trainer refuses it: no loss scaling)",
        o.param_bytes == 2 and o.finetune == "full": "bf16 master weights (SPIN's updates would be lost)",
        o.reference_mode == "frozen-model": "a frozen reference model (the trainer precomputes the reference "
                                            "log-probs, which needs no memory while training)",
        o.attention == "eager": "eager attention (the trainer's models run varlen attention)",
        o.loss_impl == "naive": "the naive full-logits loss (a baseline, not a trainer mode)",
        o.quantize == "nf4" and o.sharded: "QLoRA under FSDP (the trainer holds a 4-bit base in one process only)",
        o.prompt_len + o.max_new_tokens > o.max_seqlen: "prompt + new tokens longer than the max length",
        o.device == "cpu" and o.loss_impl == "fused": "the Triton loss on CPU (use loss_impl 'cpu' or 'torch')",
        o.device == "cuda" and o.loss_impl == "cpu": "the C++ CPU loss on a GPU",
    }
    return [text for bad, text in why.items() if bad]


def trainer_flags(o: PlanOptions) -> tuple[list[str] | None, str]:
    """The ``spin-kernels iterate`` flags that run configuration ``o`` (None and the reason when
    the trainer has no such mode: the planner also prices alternatives for comparison)."""
    reasons = _unsupported(o)
    if reasons:
        return None, "; ".join(reasons)
    flags = ["--token-budget", str(o.token_budget), "--max-length", str(o.max_seqlen), "--max-prompt-length",
             str(o.prompt_len), "--max-new-tokens", str(o.max_new_tokens), "--generation-batch-size",
             str(o.gen_batch), "--optimizer", o.optimizer]
    if o.device == "cpu":
        flags += ["--device", "cpu"]
    if o.loss_impl in ("torch", "cpu"):
        flags += ["--impl", o.loss_impl]
    mp = "bf16" if o.mixed_precision == "bf16" else "none"
    flags += ["--bf16" if o.mixed_precision == "bf16" else "--no-bf16"]
    if o.sharded:
        flags += ["--mixed-precision", mp]
    if o.finetune == "lora":
        flags += ["--lora-rank", str(o.lora_rank)]
        if o.mixed_precision == "bf16":
            flags += ["--dtype", "bfloat16"]
    if o.quantize == "nf4":
        flags += ["--quantize", "nf4"]
    if o.share_prompt:
        flags.append("--share-prompt")
    if o.activation_checkpointing:
        flags.append("--gradient-checkpointing")
    if o.cpu_offload:
        flags.append("--cpu-offload")
    if o.sharded and o.num_gpus == 1:
        flags.append("--fsdp")
    return flags, ""


def launch_command(o: PlanOptions, *, model: str, data: str, output_dir: str) -> tuple[str | None, str]:
    """The whole command line that runs ``o`` (``spin-kernels iterate`` or ``torchrun``), or None
    and the reason. More GPUs than ``gpus_per_node``: one torchrun per node with a c10d rendezvous
    at HEAD_NODE (docs/scaling.md: with SLURM, ``srun`` starts it once per node)."""
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
