"""Time and GPU-hours of one SPIN iteration by stage, from FLOP and byte counts and device rates.

    from spin_kernels.memory import plan, estimate_time, DataSize
    p = plan("llama3-70b", num_gpus=8, gpu_memory_gib=80, cpu_offload=True)
    print(estimate_time(p, DataSize(prompts=50_000), "h100").table())

Each stage's time on one GPU is the largest of its compute time (FLOPs / (peak x ``mfu``)), its
memory time (bytes read from HBM / (bandwidth x ``mem_util``)) and its communication time (bytes
each GPU receives in FSDP's all-gathers and reduce-scatters / (link x ``link_util``)): FSDP
prefetches, so the three overlap. Decoding adds a fixed overhead per layer and token (Python and
kernel launches of transformers' ``generate``), offload the host's optimizer step and the PCIe
copies. All GPUs work in parallel (the stages split prompts and micro-batches evenly), so a
stage's wall time is one GPU's and its GPU-hours W times that. The figures are estimates from
published peaks and stated utilisations, not measurements; ``assumptions()`` lists them.

Counts (per token; P = decoder weights, L layers, H hidden, V vocabulary, c = attended context):
forward 2P + 4 L q_dim c (attention) FLOPs, + 2 V H per token whose logits are computed (each
sampled token; each response token in the fused loss); backward twice the forward (LoRA: once,
no weight gradients of the frozen base); activation checkpointing one more forward. The fused
loss: 6 V H per response token (logits, dh, dW; LoRA 4: no dW).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .estimate import Plan
from .options import PlanOptions


@dataclass(frozen=True)
class DeviceRates:
    """Rates of one device, from its published peaks, and the share of them a stage reaches.

    Attributes:
        name: what the figures describe (and where they come from).
        flops: peak dense bf16 FLOP/s (no sparsity).
        hbm: memory bandwidth, bytes/s.
        link: per-direction bandwidth between GPUs of a node, bytes/s (what an all-gather's
            receiving side gets); ``inter_node`` between nodes, per GPU.
        pcie: host <-> GPU per direction, bytes/s (CPU offload); ``host_bw`` the host memory
            bandwidth one rank's optimizer step gets.
        mfu, mem_util, link_util: the shares of flops, hbm and link a stage reaches.
        decode_overhead_s: fixed time per layer and decoding step (the framework's per-op cost).
        price_per_hour: cost of one GPU-hour (None: GPU-hours only).
    """

    name: str
    flops: float
    hbm: float
    link: float
    pcie: float
    inter_node: float = 50e9
    host_bw: float = 20e9
    mfu: float = 0.40
    mem_util: float = 0.70
    link_util: float = 0.70
    decode_overhead_s: float = 30e-6
    price_per_hour: float | None = None


#: Published peaks (NVIDIA data sheets): A100 SXM4 80 GB: 312 TFLOP/s bf16 dense, 2,039 GB/s HBM2e,
#: NVLink 3 600 GB/s (300 per direction), PCIe Gen4 x16; H100 SXM5: 989 TFLOP/s bf16 dense,
#: 3.35 TB/s HBM3, NVLink 4 900 GB/s (450 per direction), PCIe Gen5 x16; H200 SXM: the H100's
#: compute with 4.8 TB/s HBM3e (141 GB). Inter-node: one 400 Gb/s NIC per GPU (50 GB/s).
#: Utilisations: 40% of peak FLOPs for FSDP training and scoring (torchtitan reports 35-45% MFU for
#: Llama-3 on H100 FSDP), 70% of HBM and NVLink bandwidth.
DEVICES: dict[str, DeviceRates] = {
    "a100": DeviceRates("A100 SXM4 80GB (NVIDIA data sheet)", 312e12, 2.039e12, 300e9, 25e9),
    "h100": DeviceRates("H100 SXM5 80GB (NVIDIA data sheet)", 989e12, 3.35e12, 450e9, 50e9),
    "h200": DeviceRates("H200 SXM 141GB (NVIDIA data sheet)", 989e12, 4.8e12, 450e9, 50e9),
}


@dataclass(frozen=True)
class DataSize:
    """What one iteration processes.

    Attributes:
        prompts: prompts of the iteration (each gets one synthetic response).
        prompt_tokens, real_tokens: mean prompt and real-response lengths (tokens). Defaults: the
            bundled UltraChat sample's means (277 and 1,481 characters) at ~4 characters per Llama-3
            token, + ~30 tokens of chat template around the prompt.
        generated_tokens: mean tokens sampled per prompt (None: ``max_new_tokens``, the bound; a
            static ``generate`` batch runs until its longest response ends anyway).
        epochs: passes over the pairs in training (paper: 2).
        global_batch_pairs: pairs per optimizer step (paper: 64).
    """

    prompts: int
    prompt_tokens: float = 100.0
    real_tokens: float = 370.0
    generated_tokens: float | None = None
    epochs: int = 2
    global_batch_pairs: int = 64


@dataclass(frozen=True)
class StageTime:
    stage: str
    seconds: float              # wall time (every GPU in parallel)
    gpu_hours: float
    flops: float                # whole stage, all GPUs
    bound: str                  # the largest overlapped limit ("compute", "memory", "communication", "pcie"),
                                # + "host" / "overhead" when those serial parts are over 10% of the stage
    parts: dict[str, float] = field(default_factory=dict)  # seconds per GPU of each limit


@dataclass
class TimeEstimate:
    plan: Plan
    data: DataSize
    rates: DeviceRates
    stages: list[StageTime]

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)

    def table(self) -> str:
        o = self.plan.options
        lines = [f"time of one iteration: {self.plan.model.name}, {o.num_gpus} x {self.rates.name}, "
                 f"{self.data.prompts:,} prompts, {self.data.epochs} epoch(s)",
                 f"{'stage':<44}{'wall':>10}{'GPU-hours':>11}{'PFLOP':>10}  bound"]
        for s in self.stages:
            lines.append(f"  {s.stage:<42}{_hms(s.seconds):>10}{s.gpu_hours:>11.1f}{s.flops / 1e15:>10.0f}  {s.bound}")
        cost = f", ${self.gpu_hours * self.rates.price_per_hour:,.0f}" if self.rates.price_per_hour else ""
        lines.append(f"  {'iteration (trainer: hf generate under FSDP)':<42}{_hms(self.seconds):>10}"
                     f"{self.gpu_hours:>11.1f}{'':>10}  {cost.lstrip(', ')}")
        return "\n".join(lines + ["assumptions:"] + [f"  - {a}" for a in assumptions(self.plan, self.data,
                                                                                       self.rates)])


def _hms(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def assumptions(p: Plan, d: DataSize, r: DeviceRates) -> list[str]:
    o = p.options
    gen = d.generated_tokens if d.generated_tokens is not None else o.max_new_tokens
    return [
        f"device: {r.name}: {r.flops / 1e12:.0f} TFLOP/s bf16 at {r.mfu:.0%}, HBM {r.hbm / 1e12:.2f} TB/s at "
        f"{r.mem_util:.0%}, GPU link {r.link / 1e9:.0f} GB/s per direction at {r.link_util:.0%}"
        + (f", PCIe {r.pcie / 1e9:.0f} GB/s, host step {r.host_bw / 1e9:.0f} GB/s per rank" if o.cpu_offload else ""),
        f"data: {d.prompts:,} prompts of {d.prompt_tokens:.0f} tokens, real responses {d.real_tokens:.0f}, "
        f"{gen:.0f} sampled per prompt; {d.epochs} epoch(s), {d.global_batch_pairs} pairs per step",
        f"generation: transformers generate inside the FSDP root, {o.gen_batch} prompts per call per GPU, "
        f"{o.max_new_tokens} decoding steps per call, every layer all-gathered at every step, "
        f"{r.decode_overhead_s * 1e6:.0f} us per layer and step of framework overhead",
        f"reference and training: micro-batches of {o.token_budget} tokens filled (packing), "
        f"{'activation checkpointing (+1 forward)' if o.activation_checkpointing else 'no checkpointing'}, "
        f"{'full fine-tuning' if o.finetune == 'full' else 'LoRA: no weight gradients of the base'}",
        "overlap: compute, HBM traffic and FSDP communication of a stage overlap (prefetching); decoding "
        "overhead and offload's host step do not",
    ]


@dataclass(frozen=True)
class _Shape:
    """Per-token counts of a model under a plan."""

    dense: float       # FLOPs of the decoder's matmuls per token (2 x decoder weights)
    head: float        # FLOPs of the lm_head per token whose logits are computed (2 V H)
    attn: float        # FLOPs of attention per token and attended position (4 L q_dim)
    weight_bytes: float  # the whole model in the compute dtype (read once per decoding step)
    kv_bytes: float    # KV cache bytes per cached token
    comm_bytes: float  # one all-gather of the model, bytes received per GPU


def _shape(p: Plan) -> _Shape:
    m, o = p.model, p.options
    b = o.compute_bytes
    decoder = m.num_layers * m.layer_params
    w = o.num_gpus
    return _Shape(dense=2.0 * decoder, head=2.0 * m.vocab * m.hidden, attn=4.0 * m.num_layers * m.q_dim,
                  weight_bytes=m.num_params * b, kv_bytes=m.num_layers * 2 * m.kv_dim * b,
                  comm_bytes=m.num_params * b * (w - 1) / w if o.sharded else 0.0)


def _limited(stage: str, w: int, flops: float, parts: dict[str, float]) -> StageTime:
    """A stage whose per-GPU limits ``parts`` overlap except "overhead" and "host" (added)."""
    serial = ("overhead", "host")
    overlapped = {k: v for k, v in parts.items() if k not in serial}
    seconds = max(overlapped.values(), default=0.0) + sum(parts.get(k, 0.0) for k in serial)
    bound = " + ".join([max(overlapped, key=overlapped.get)] + [k for k in serial if parts.get(k, 0.0) > 0.1 * seconds])
    return StageTime(stage, seconds, seconds * w / 3600, flops, bound, parts)


def _generation(p: Plan, d: DataSize, r: DeviceRates) -> StageTime:
    o, s = p.options, _shape(p)
    w = o.num_gpus
    calls = math.ceil(d.prompts / (w * o.gen_batch))
    steps = calls * o.max_new_tokens
    gen = d.generated_tokens if d.generated_tokens is not None else o.max_new_tokens
    context = d.prompt_tokens + o.max_new_tokens / 2
    prefill = calls * o.gen_batch * d.prompt_tokens * (s.dense + s.attn * d.prompt_tokens / 2)
    decode = calls * o.gen_batch * gen * (s.dense + s.head + s.attn * context)
    per_gpu_bytes = steps * (s.weight_bytes + o.gen_batch * context * s.kv_bytes)
    parts = {"compute": (prefill + decode) / (r.flops * r.mfu),
             "memory": per_gpu_bytes / (r.hbm * r.mem_util),
             "communication": (calls + steps) * s.comm_bytes / _link(o, r),
             "overhead": steps * p.model.num_layers * r.decode_overhead_s}
    return _limited("generation (hf generate, FSDP)", w, (prefill + decode) * w, parts)


def _link(o: PlanOptions, r: DeviceRates) -> float:
    """Bandwidth of an all-gather's receiving side: NVLink inside a node, the NIC across nodes."""
    return (r.link if o.num_gpus <= o.gpus_per_node else min(r.link, r.inter_node)) * r.link_util


def _pass_tokens(p: Plan, d: DataSize) -> tuple[float, float]:
    """(packed tokens of all pairs, response tokens): two sequences per pair, or one segment."""
    o = p.options
    gen = d.generated_tokens if d.generated_tokens is not None else o.max_new_tokens
    prompts = d.prompt_tokens * (1 if o.share_prompt else 2)
    return d.prompts * (prompts + d.real_tokens + gen), d.prompts * (d.real_tokens + gen)


def _reference(p: Plan, d: DataSize, r: DeviceRates) -> StageTime:
    o, s = p.options, _shape(p)
    w = o.num_gpus
    tokens, responses = _pass_tokens(p, d)
    ctx = (d.prompt_tokens + d.real_tokens) / 2
    flops = tokens * (s.dense + s.attn * ctx) + responses * s.head
    micro = math.ceil(tokens / (w * o.token_budget))
    parts = {"compute": flops / w / (r.flops * r.mfu), "communication": micro * s.comm_bytes / _link(o, r)}
    return _limited("reference log-probs", w, flops, parts)


def _training(p: Plan, d: DataSize, r: DeviceRates) -> StageTime:
    o, s, m = p.options, _shape(p), p.model
    w = o.num_gpus
    tokens, responses = _pass_tokens(p, d)
    tokens, responses = tokens * d.epochs, responses * d.epochs
    ctx = (d.prompt_tokens + d.real_tokens) / 2
    passes = (3 if o.finetune == "full" else 2) + (1 if o.activation_checkpointing else 0)
    loss = (6 if o.finetune == "full" else 4) * m.vocab * m.hidden * responses
    flops = tokens * passes * (s.dense + s.attn * ctx) + loss
    micro = math.ceil(tokens / (w * o.token_budget))
    steps = math.ceil(d.prompts / d.global_batch_pairs) * d.epochs
    trainable = m.num_params if o.finetune == "full" else m.lora_params(o.lora_rank)
    reduce = trainable * 4 * (w - 1) / w if o.sharded else 0.0
    gathers = 2  # forward and backward (a checkpointed layer is recomputed on the backward's gather)
    parts = {"compute": flops / w / (r.flops * r.mfu),
             "communication": micro * (gathers * s.comm_bytes + reduce) / _link(o, r)}
    # The step reads and writes the shard's parameters, gradients and states once.
    states = {"sgd": 0, "rmsprop": 1, "adamw": 2, "adam": 2}[o.optimizer]
    step_bytes = steps * trainable / w * 4 * (3 + 2 * states)
    if o.cpu_offload:  # the step on the host; shards cross PCIe at every all-gather and reduce-scatter
        parts["host"] = step_bytes / r.host_bw
        parts["pcie"] = micro * trainable / w * 4 * 3 / (r.pcie * r.link_util)
    else:
        parts["memory"] = step_bytes / (r.hbm * r.mem_util)
    return _limited("training", w, flops, parts)


def estimate_time(p: Plan, data: DataSize, rates: DeviceRates | str = "h100", **overrides) -> TimeEstimate:
    """Wall time and GPU-hours of one iteration of plan ``p`` on ``data`` (stages: generation,
    reference, training). ``rates``: a preset name (a100, h100, h200) or DeviceRates; keyword
    ``overrides`` replace its fields (e.g. ``mfu=0.3``, ``price_per_hour=2.5``)."""
    r = DEVICES[rates] if isinstance(rates, str) else rates
    r = replace(r, **overrides)
    return TimeEstimate(p, data, r, [_generation(p, data, r), _reference(p, data, r), _training(p, data, r)])
