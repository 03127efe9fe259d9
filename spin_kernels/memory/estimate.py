"""Per-GPU memory of one SPIN iteration under FSDP2, moment by moment, and the cheapest
configuration that fits.

A plan is an upper bound: at each moment of the iteration it adds every term alive then
(``terms.py`` prices them and says which code allocates each), and the peak is the largest
moment. The moments and the points inside them:

* **forward**: the root's all-gather at its start (the root's unsharded parameters and FSDP's flat
  all-gather buffer), the last decoder layer (every saved activation), the end of the fused loss
  (its dh/dW and logits store);
* **backward**: its start (a layer recomputed, one layer's unsharded gradients and the previous
  one's reduce-scatter input in flight, the lm_head's gradient), its end (full fine-tuning: the
  root's gradients and their reduce-scatter);
* **optimizer step**: states, gradients and the step's temporaries;
* **reference pass** (no-grad forward of a micro-batch) and **generation** (KV cache, prefill).

Every moment also carries the parameters, optimizer states (they persist between steps; the
gradients exist only during a training step) and the process's non-tensor memory (CUDA
context, NCCL buffers). It fits when the peak is below the usable memory,
``gpu_memory * (1 - fragmentation) - reserve``, and the host holds what offload and rank 0 keep.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import terms as T
from .models import ModelSpec, resolve_model
from .options import GiB, PlanOptions
from .terms import TRITON_WORKSPACE_BYTES  # noqa: F401  (tests/test_triton_kernels.py reads it here)

#: Terms present at every moment: what a point is measured against to say what sets it.
RESIDENT = ("parameters", "NF4 absmax (replicated)", "checkpoint pages kept mapped (CPU QLoRA)",
            "CPU runtime slack (heap, caches)", "gradients (sharded)", "reference model (frozen, sharded)",
            "process (CUDA context, NCCL buffers)")
PROCESS = "process (CUDA context, NCCL buffers)"


@dataclass(frozen=True)
class Point:
    """One instant of the iteration: ``moment`` (forward, backward, optimizer step, reference pass,
    generation), ``where`` inside it, and the bytes of every term alive then."""

    moment: str
    where: str
    terms: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    def set_by(self) -> tuple[str, float]:
        """The largest term of this point that is not resident at every moment (or the largest
        term when nothing else is alive)."""
        own = {k: v for k, v in self.terms.items() if k not in RESIDENT and not k.startswith("optimizer states")}
        pool = own if any(own.values()) else self.terms
        return max(pool.items(), key=lambda kv: kv[1])


@dataclass
class Plan:
    """The per-GPU moments of one configuration (bytes); ``table()`` renders it."""

    model: ModelSpec
    options: PlanOptions
    points: list[Point]
    usable: float
    host: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def moment(self, name: str) -> Point:
        """The largest point of moment ``name``."""
        return max((p for p in self.points if p.moment == name), key=lambda p: p.total)

    @property
    def peak_point(self) -> Point:
        return max(self.points, key=lambda p: p.total)

    @property
    def peak(self) -> float:
        return self.peak_point.total

    @property
    def train_peak(self) -> float:
        return max(p.total for p in self.points if p.moment in ("forward", "backward", "optimizer step"))

    @property
    def generation_peak(self) -> float:
        return max(p.total for p in self.points if p.moment in ("generation", "reference pass"))

    @property
    def host_per_node(self) -> float:
        return sum(self.host.values())

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable and self.host_per_node <= self.options.host_memory_gib * GiB

    def peak_summary(self, moments: tuple[str, ...] | None = None, unit: float = GiB) -> str:
        """"<moment> (<where>), <size>; set by <term> (<size>)" of the largest point (among ``moments``)."""
        p = max((pt for pt in self.points if moments is None or pt.moment in moments), key=lambda pt: pt.total)
        term, value = p.set_by()
        name = "GiB" if unit == GiB else "MiB"
        return f"{p.moment} ({p.where}), {p.total / unit:.1f} {name}; set by {term} ({value / unit:.2f} {name})"

    def table(self) -> str:
        from .render import plan_table

        return plan_table(self)


def _resident(m: ModelSpec, o: PlanOptions) -> tuple[dict[str, float], dict[str, float]]:
    """(resident at every moment, sharded gradients of a training step), on the GPU."""
    states = T.model_states(m, o)
    grads = {"gradients (sharded)": states.pop("gradients (sharded)")}
    if o.cpu_offload:  # on the host; the GPU holds none of it
        states = {k: 0.0 for k in states}
        grads = {k: 0.0 for k in grads}
    return {**states, PROCESS: o.process_bytes}, grads


def _gathered(m: ModelSpec, o: PlanOptions) -> tuple[dict[str, float], dict[str, float]]:
    """({root unsharded}, {two layers unsharded}) under FSDP: the root stays unsharded from its
    forward to the end of backward; a layer runs while the next one's all-gather output is filled
    (prefetch), which is as large as the layer (+ the flat bf16 input with mixed precision)."""
    if not o.sharded:
        return {}, {}
    root, layer = T.unit_bytes(m, o)
    return ({"root unit (embeddings, lm_head; unsharded)": root},
            {"decoder layers (running + next all-gather)": layer + T.all_gather_buffer(layer, o)})


def _training_points(m: ModelSpec, o: PlanOptions, base: dict, grads: dict) -> list[Point]:
    step = T.step_memory(m, o)
    root, layers = _gathered(m, o)
    acts = {f"activations saved ({'checkpointed' if o.activation_checkpointing else 'all layers'})": step.saved}
    common = {**base, **grads, **root}
    points = []
    if o.sharded:  # the root's flat all-gather buffer is freed only once the first layer has been gathered
        root_bytes = sum(root.values())
        points.append(Point("forward", "root and first layer all-gathered", {
            **common, **layers, "root all-gather buffer": T.all_gather_buffer(root_bytes, o)}))
    transients = {"layer forward transients (attention, NF4 dequantized weight)": step.layer_forward + step.scores}
    points.append(Point("forward", "last decoder layer", {**common, **layers, **acts, **transients}))
    points.append(Point("forward", "end of the loss", {**common, **acts,
                                                       f"loss dh/dW ({o.loss_impl})": step.loss_persist,
                                                       "loss logits / workspace": step.loss_transient}))
    # The loss's dh and dW are its backward's first outputs: dW becomes the lm_head's gradient
    # (added into it at once in one process; the unsharded gradient until the root's
    # reduce-scatter under FSDP), dh flows into the final norm's backward before any layer's.
    handed = {**common, **layers, **acts, f"loss dh/dW ({o.loss_impl}) -> lm_head gradient": step.loss_persist}
    first = {**common, **layers, **acts, "backward workspace (recompute, layer grads)": step.backward + step.scores}
    if o.sharded:  # FSDP clears the unsharded .grad per micro-batch: AccumulateGrad copies the loss's dW
        first["lm_head gradient (unsharded) + the loss's dW"] = 2 * step.head_grad
        first["layer gradients in flight (+ reduce-scatter input)"] = T.grads_in_flight(m, o)
    if o.loss_impl == "naive":
        handed["naive loss: its log-probs' gradient"] = step.loss_backward
    points += [Point("backward", "start (the loss's gradients)", handed), Point("backward", "last layer's backward",
                                                                                  first)]
    reduce = T.root_reduce(m, o)
    if reduce:
        points.append(Point("backward", "end of backward (root reduce-scatter)", {**base, **grads, **reduce}))
    copy = 0.0 if o.cpu_offload else T.optimizer_step_copy(m, o)
    points.append(Point("optimizer step", "update", {**base, **grads,
                                                     f"optimizer step temporaries ({o.step_impl})": copy}))
    if not o.grad_accumulation and not o.sharded:  # gradients appear only as activations are freed
        points = [dataclasses.replace(p, terms={k: (0.0 if k in grads else v) for k, v in p.terms.items()})
                  if p.moment != "optimizer step" else p for p in points]
    return points


def _inference_points(m: ModelSpec, o: PlanOptions, base: dict) -> list[Point]:
    step = T.step_memory(m, o)
    root, layers = _gathered(m, o)
    one_layer = T.layer_activation_bytes(m, o) * o.token_budget
    reference = Point("reference pass", "one layer of a micro-batch, no grad",
                      {**base, **root, **layers, "activations of one layer (no grad)": one_layer,
                       "loss logits / workspace (no grad)": step.loss_no_grad})
    generation = Point("generation", "one generate call", {**base, **root, **layers, **T.generation_terms(m, o)})
    return [reference, generation]


def _notes(o: PlanOptions) -> list[str]:
    notes = []
    if o.mixed_precision and o.param_bytes == 2 and o.finetune == "full":
        notes.append("bf16 master weights: updates below bf16 resolution (SPIN's lr 5e-7) are lost")
    if o.token_budget < 2 * o.max_seqlen:
        notes.append(f"token budget {o.token_budget} < one pair of max_seqlen ({2 * o.max_seqlen} tokens)")
    if o.quantize == "nf4" and o.sharded:
        notes.append("QLoRA under FSDP (bf16 quant storage, absmax replicated) is priced but the trainer runs a "
                     "4-bit base in one process")
    return notes


def plan(model: str | ModelSpec | dict, options: PlanOptions | None = None, **overrides) -> Plan:
    """The per-GPU memory of one SPIN iteration of ``model`` under ``options``.

    Args:
        model: a preset name (llama3-8b, llama3-70b, qwen2.5-72b, mistral-7b), a config.json
            path, a config dict or a ModelSpec.
        options: PlanOptions; keyword ``overrides`` replace its fields.
    """
    m = resolve_model(model)
    o = dataclasses.replace(options or PlanOptions(), **overrides)
    base, grads = _resident(m, o)
    points = _training_points(m, o, base, grads) + _inference_points(m, o, base)
    usable = o.gpu_memory_gib * GiB * (1 - o.fragmentation) - o.reserve_gib * GiB
    return Plan(m, o, points, usable, T.host_terms(m, o), _notes(o))


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
    Fixed: fine-tuning mode, quantization, optimizer and its implementation, precision, reference
    mode, lengths. QLoRA on one GPU stays one process (the trainer's only QLoRA mode).
    """
    base = dataclasses.replace(options or PlanOptions(), **overrides)
    top = max_gpus or base.num_gpus
    min_budget = min(base.token_budget, 2 * base.max_seqlen)
    counts = gpu_counts(top, base.gpus_per_node)

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

    offload_possible = base.quantize == "none" or top > 1 or base.fsdp
    return first_fit(counts, False) or (first_fit([top], True) if offload_possible else None)
