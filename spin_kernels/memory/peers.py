"""Our plans next to other estimators and published runs, with sources (the reference table).

    python -m spin_kernels.memory.peers        # the Markdown table of docs/scaling.md

* **DeepSpeed ZeRO-3** (``estimate_zero3_model_states_mem_needs``, deepspeed/runtime/zero/stage3.py,
  v0.19.8; ``estimate_zero3_model_states_mem_needs_all_cold`` prints it for each offload option):
  model states only (no activations, no transients), Adam with fp16/bf16 parameters: per GPU
  ``4 x largest layer + 18 x params / GPUs`` without offload, ``4 x largest layer`` with parameters
  and optimizer offloaded; host per node ``18 x params x 1.5`` then.
* **accelerate** (``accelerate estimate-memory``, accelerate/commands/estimate.py,
  ``estimate_training_usage``; needs the hub, so its arithmetic is restated): "Training using Adam",
  one device, batch size 1, no activations: ``max(model, gradients, optimizer, step)``: 16 bytes per
  parameter in float32, 8 in bfloat16 (the optimizer's two fp32 states).
* **Published runs** (``PUBLISHED``): torchtune's README table (Llama 3.1, batch 2 x 2,048 packed
  tokens, torch.compile), Hugging Face's Llama 2 70B FSDP blog, Answer.AI's FSDP-QLoRA post.
"""

from __future__ import annotations

from dataclasses import dataclass

from .estimate import Plan, plan
from .models import resolve_model
from .options import GiB, PlanOptions

GB = 1e9


def deepspeed_zero3(total_params: int, largest_layer_params: int, *, gpus_per_node: int, nodes: int = 1,
                    offload: bool = False, zero_init: bool = True, buffer: float = 1.5) -> tuple[float, float]:
    """(bytes per GPU, host bytes per node) of DeepSpeed's ZeRO-3 estimator (restated from
    deepspeed 0.19.8, ``estimate_zero3_model_states_mem_needs``; ``offload``: optimizer and
    parameters on the CPU)."""
    gpus = gpus_per_node * nodes
    largest = 4 * largest_layer_params
    if offload:
        host = total_params * (18 / nodes if zero_init else max(4 * gpus_per_node, 18 / nodes)) * buffer
        return float(largest), float(host)
    host = (largest_layer_params if zero_init else total_params) * 4 * gpus_per_node * buffer
    return float(largest + int(18 * total_params / gpus)), float(host)


def accelerate_adam(total_params: int, dtype: str = "float32") -> float:
    """accelerate's "Training using Adam" for one device, bytes (``estimate_training_usage``:
    model, gradients, optimizer, step; the largest; the model's size taken in float32)."""
    fp32 = 4 * total_params
    if dtype == "float32":
        sizes = [fp32, fp32, 2 * fp32, 4 * fp32]
    else:  # bf16/fp16 mixed precision
        sizes = [fp32, fp32 + fp32 // 2, 2 * fp32, 2 * fp32]
    return float(max(sizes))


@dataclass(frozen=True)
class Reference:
    """One row: our plan of ``options`` for ``model`` next to DeepSpeed, accelerate and a published run."""

    model: str
    setup: str
    options: PlanOptions
    published: str          # the figure and its conditions ("" if none)
    source: str             # where it is published
    why: str                # why the figures differ


def _ds(m, o: PlanOptions) -> tuple[float, float]:
    largest = max(m.tensor_sizes())  # DeepSpeed: the largest module's own parameters (an embedding)
    nodes = -(-o.num_gpus // o.gpus_per_node)
    return deepspeed_zero3(m.num_params, largest, gpus_per_node=min(o.num_gpus, o.gpus_per_node), nodes=nodes,
                           offload=o.cpu_offload)


A100 = dict(gpu_memory_gib=80.0)
PUBLISHED = [
    Reference("llama3-8b", "8 x 80 GB, full, AdamW", PlanOptions(num_gpus=8, optimizer="adamw", **A100), "", "",
              "DeepSpeed: 18 B/param of model states (fp16 weights, fp32 masters, two states, fp16 gradients) + 4 x "
              "the largest layer, nothing else. Ours: 16 B/param (FSDP casts each unit to bf16 when it is gathered, "
              "no standing bf16 copy) + the foreach step's copy, and in backward the unsharded root (2 GiB), two "
              "layers, an 8,192-token micro-batch's activations, gradients in flight, the loss's dW and the process "
              "(1.5 GiB). accelerate: one device, no sharding, no activations."),
    Reference("mistral-7b", "8 x 80 GB, full, AdamW", PlanOptions(num_gpus=8, optimizer="adamw", **A100), "", "",
              "As for Llama-3-8B; a 32k vocabulary makes the root unit and the loss's dW 4 x smaller."),
    Reference("llama3-70b", "8 x 141 GB, full, RMSprop (SPIN), budget 4096",
              PlanOptions(num_gpus=8, gpu_memory_gib=141.0, token_budget=4096), "", "",
              "DeepSpeed's 18 B/param assumes Adam; with RMSprop our model states are 12 B/param, but the foreach "
              "step's fp32 copy of the shard makes the step 16 B/param: 132.9 GiB with the process, above the 126.9 "
              "usable at any token budget (recommended instead: CPU offload, or 16 GPUs)."),
    Reference("llama3-70b", "8 x 80 GB, full, CPU offload, AdamW, budget 4096",
              PlanOptions(num_gpus=8, optimizer="adamw", cpu_offload=True, token_budget=4096, **A100),
              "13.9 GiB per GPU (Llama 3.1 70B, 8 x A100, CPU offload + fused optimizer, batch 2 x 2,048)",
              "torchtune README, 'Memory and training speed'",
              "DeepSpeed prices the GPU at 4 x the largest layer only and the host at 18 x 1.5 B/param. Our GPU "
              "bound adds to torchtune's layout the unsharded root kept through backward with its gradient and the "
              "loss's dW (3.9 + 3.9 GiB at a 128k vocabulary: apply_fsdp2 does not reshard the root after forward), "
              "gradients in flight (4.8 GiB) and the process (1.5 GiB); torchtune reports allocated memory."),
    Reference("llama3-70b", "8 x 80 GB, LoRA r16, budget 4096",
              PlanOptions(num_gpus=8, finetune="lora", reference_mode="lora-disabled", token_budget=4096, **A100),
              "27.6 GiB per GPU (Llama 3.1 70B LoRA, 8 x A100, batch 2 x 2,048)", "torchtune README",
              "The frozen bf16 base is 16.5 GiB per GPU either way; ours adds the unsharded root (3.9 GiB) and the "
              "process (1.5 GiB). DeepSpeed and accelerate have no LoRA mode."),
    Reference("llama3-8b", "1 x 48 GB, LoRA r16, budget 4096",
              PlanOptions(num_gpus=1, gpu_memory_gib=48.0, finetune="lora", reference_mode="lora-disabled",
                          token_budget=4096, fsdp=False),
              "30.3 GiB (Llama 3.1 8B LoRA, 1 x A6000, batch 2 x 2,048, compile)", "torchtune README",
              "Ours holds no [tokens, vocabulary] logits (the fused loss), torchtune's cross-entropy materialises "
              "them in fp32 chunks (4,096 x 128,256 x 4 B = 2 GiB, and their gradient); the rest of the gap is its "
              "recipe's settings (compile, activation checkpointing) that the README row does not state."),
    Reference("llama3-8b", "1 x 24 GB, QLoRA r16, budget 4096",
              PlanOptions(num_gpus=1, gpu_memory_gib=24.0, finetune="lora", quantize="nf4",
                          reference_mode="lora-disabled", token_budget=4096),
              "7.4 GiB (Llama 3.1 8B QLoRA, 1 x 4090, batch 2 x 2,048)", "torchtune README",
              "Ours: NF4 base 3.25 GiB + absmax 0.4 GiB (bitsandbytes without double quantization) + bf16 "
              "embeddings and lm_head 2 GiB + the process 0.5 GiB; torchtune (torchao NF4, double-quantized "
              "scales) reports allocated memory."),
    Reference("llama2-70b", "16 x 80 GB (2 nodes), full, AdamW, budget 4096",
              PlanOptions(num_gpus=16, optimizer="adamw", token_budget=4096, **A100),
              "ran on 16 x A100 80 GB, 1 TB RAM per node (no per-GPU peak published)",
              "Hugging Face blog 'Fine-tuning Llama 2 70B using PyTorch FSDP'",
              "Model states alone are 64 GiB per GPU (16 B/param over 16 GPUs); the backward (82.9 GiB) and the "
              "foreach step (81.8 GiB) are above 72 GiB usable in our bound, so the published run's settings must "
              "differ (its FSDP1 flat parameters, optimizer implementation and batch are not all stated)."),
    Reference("llama2-70b", "2 x 24 GB, QLoRA r16, FSDP + CPU offload, budget 2048",
              PlanOptions(num_gpus=2, gpu_memory_gib=24.0, finetune="lora", quantize="nf4",
                          reference_mode="lora-disabled", cpu_offload=True, token_budget=2048, gen_batch=4),
              "trained on 2 x 24 GB (RTX 3090/4090) with gradient checkpointing and CPU offload",
              "Answer.AI, 'You can now train a 70b language model at home' (2024-03-06)",
              "Consistent: our bound is 7.4 GiB per GPU at 2,048 tokens. Priced, not run by our trainer (its QLoRA "
              "is one process); offloaded, the NF4 absmax (4 GB at 70B) is on the host."),
]


def _gib(x: float | None) -> str:
    return "–" if x is None else f"{x / GiB:,.1f}"


def reference_rows() -> list[dict]:
    rows = []
    for r in PUBLISHED:
        m = resolve_model(r.model)
        p: Plan = plan(m, r.options)
        ds_gpu, ds_host = _ds(m, r.options)
        full = r.options.finetune == "full"  # DeepSpeed's and accelerate's estimates know full fine-tuning only
        dtype = "bfloat16" if r.options.mixed_precision else "float32"
        rows.append({"model": m.name, "params": m.num_params, "setup": r.setup, "train": p.train_peak,
                     "ours": p.peak, "usable": p.usable, "fits": p.fits, "host": p.host_per_node,
                     "set_by": p.peak_summary(("forward", "backward", "optimizer step")),
                     "ds_gpu": ds_gpu if full else None, "ds_host": ds_host if full else None,
                     "accelerate": accelerate_adam(m.num_params, dtype) if full else None,
                     "published": r.published, "source": r.source, "why": r.why})
    return rows


def markdown() -> str:
    lines = ["| model | setup | ours: training peak per GPU, GiB, and what sets it | ours: iteration peak (with "
             "generation) of usable, GiB | ours: host per node, GiB | DeepSpeed ZeRO-3: per GPU / host per node, GiB | "
             "accelerate (Adam, one device), GiB | published | why they differ |", "|---|---|---|---|---|---|---|---|---|"]
    for r in reference_rows():
        pub = f"{r['published']} ({r['source']})" if r["published"] else "–"
        ds = "–" if r["ds_gpu"] is None else f"{_gib(r['ds_gpu'])} / {_gib(r['ds_host'])}"
        lines.append(f"| {r['model']} ({r['params'] / 1e9:.2f}B) | {r['setup']} | {_gib(r['train'])}: {r['set_by']} | "
                     f"{_gib(r['ours'])} of {_gib(r['usable'])} ({'fits' if r['fits'] else 'does not fit'}) | "
                     f"{_gib(r['host'])} | {ds} | {_gib(r['accelerate'])} | {pub} | {r['why']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
