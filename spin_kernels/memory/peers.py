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
              "DeepSpeed counts model states only (18 B/param: fp16 weights, fp32 masters and two states, fp16 "
              "gradients); we add fp32 gradients, the foreach step's fp32 copy (4 B/param), the root unit, activations "
              "and the process. accelerate is one device, no sharding."),
    Reference("mistral-7b", "8 x 80 GB, full, AdamW", PlanOptions(num_gpus=8, optimizer="adamw", **A100), "", "",
              "As above; the small vocabulary (32k) makes the root unit small."),
    Reference("llama3-70b", "8 x 141 GB, full, RMSprop (SPIN), budget 4096",
              PlanOptions(num_gpus=8, gpu_memory_gib=141.0, token_budget=4096), "", "",
              "DeepSpeed's 18 B/param assumes Adam (2 states); RMSprop has one, but the fp32 gradients and the "
              "foreach copy bring us to 16 B/param of model states: the step's 132.9 GiB does not fit 126.9 usable."),
    Reference("llama3-70b", "8 x 80 GB, full, CPU offload, AdamW, budget 4096",
              PlanOptions(num_gpus=8, optimizer="adamw", cpu_offload=True, token_budget=4096, **A100),
              "13.9 GiB per GPU (Llama 3.1 70B, 8 x A100, CPU offload + fused optimizer, batch 2 x 2,048)",
              "torchtune README, 'Memory and training speed'",
              "DeepSpeed prices the GPU at 4 x largest layer (4.2 GB) and the host at 18 x 1.5 B/param; we count the "
              "unsharded root (embeddings + lm_head, 3.9 GiB in bf16), two layers, activations, the loss and the "
              "process on the GPU; the host: pinned shards rounded to powers of two, fp32 states and rank 0's full "
              "copy. torchtune keeps no fp32 master copy on the GPU either and steps a fused optimizer on the host."),
    Reference("llama3-70b", "8 x 80 GB, LoRA r16, budget 4096",
              PlanOptions(num_gpus=8, finetune="lora", reference_mode="lora-disabled", token_budget=4096, **A100),
              "27.6 GiB per GPU (Llama 3.1 70B LoRA, 8 x A100, batch 2 x 2,048)", "torchtune README",
              "Frozen base in bf16 (17.6 GB per GPU sharded over 8); we add the unsharded root, two layers, "
              "activations (checkpointed) and the process; torchtune's LoRA recipe is the same layout."),
    Reference("llama3-8b", "1 x 48 GB, LoRA r16, budget 4096",
              PlanOptions(num_gpus=1, gpu_memory_gib=48.0, finetune="lora", reference_mode="lora-disabled",
                          token_budget=4096, fsdp=False),
              "30.3 GiB (Llama 3.1 8B LoRA, 1 x A6000, batch 2 x 2,048, compile)", "torchtune README",
              "One process, bf16 base (15 GiB); torchtune computes full logits in chunks (128k vocabulary) where our "
              "fused loss keeps none, and keeps every activation of its compiled graph."),
    Reference("llama3-8b", "1 x 24 GB, QLoRA r16, budget 4096",
              PlanOptions(num_gpus=1, gpu_memory_gib=24.0, finetune="lora", quantize="nf4",
                          reference_mode="lora-disabled", token_budget=4096),
              "7.4 GiB (Llama 3.1 8B QLoRA, 1 x 4090, batch 2 x 2,048)", "torchtune README",
              "NF4 base 3.8 GiB + bf16 embeddings and lm_head (2 GiB); torchtune's QLoRA recipe also offloads "
              "activations to the CPU."),
    Reference("llama2-70b", "16 x 80 GB (2 nodes), full, AdamW, budget 4096",
              PlanOptions(num_gpus=16, optimizer="adamw", token_budget=4096, **A100),
              "ran on 16 x A100 80 GB, 1 TB RAM per node (no per-GPU peak published)",
              "Hugging Face blog 'Fine-tuning Llama 2 70B using PyTorch FSDP'",
              "Our bound says the foreach AdamW step needs more than 72 GiB usable; a fused AdamW (or FSDP1's flat "
              "parameters, one foreach group per flat tensor) removes most of that copy."),
    Reference("llama2-70b", "2 x 24 GB, QLoRA r16, FSDP + CPU offload, budget 2048",
              PlanOptions(num_gpus=2, gpu_memory_gib=24.0, finetune="lora", quantize="nf4",
                          reference_mode="lora-disabled", cpu_offload=True, token_budget=2048, gen_batch=4),
              "trained on 2 x 24 GB (RTX 3090/4090) with gradient checkpointing and CPU offload",
              "Answer.AI, 'You can now train a 70b language model at home' (2024-03-06)",
              "Priced, not run by our trainer (QLoRA is one process there); the NF4 absmax (4 GB at 70B) is "
              "replicated on each rank unless offloaded with the shards."),
]


def _gib(x: float) -> str:
    return f"{x / GiB:,.1f}"


def reference_rows() -> list[dict]:
    rows = []
    for r in PUBLISHED:
        m = resolve_model(r.model)
        p: Plan = plan(m, r.options)
        ds_gpu, ds_host = _ds(m, r.options)
        rows.append({"model": m.name, "params": m.num_params, "setup": r.setup, "ours": p.peak, "usable": p.usable,
                     "fits": p.fits, "set_by": p.peak_summary(), "host": p.host_per_node, "ds_gpu": ds_gpu,
                     "ds_host": ds_host, "accelerate": accelerate_adam(m.num_params,
                                                                       "bfloat16" if r.options.mixed_precision else
                                                                       "float32"),
                     "published": r.published, "source": r.source, "why": r.why})
    return rows


def markdown() -> str:
    lines = ["| model | setup | ours: peak per GPU, GiB (fits?) | ours: host per node, GiB | DeepSpeed ZeRO-3: per GPU "
             "/ host per node, GiB | accelerate (Adam, one device), GiB | published | why they differ |",
             "|---|---|---|---|---|---|---|---|"]
    for r in reference_rows():
        pub = f"{r['published']} ({r['source']})" if r["published"] else "–"
        lines.append(f"| {r['model']} ({r['params'] / 1e9:.2f}B) | {r['setup']} | {_gib(r['ours'])} of "
                     f"{_gib(r['usable'])} ({'yes' if r['fits'] else 'no'}); {r['set_by']} | {_gib(r['host'])} | "
                     f"{_gib(r['ds_gpu'])} / {_gib(r['ds_host'])} | {_gib(r['accelerate'])} | {pub} | {r['why']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
