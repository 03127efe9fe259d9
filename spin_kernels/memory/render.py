"""Text of a plan: its header, the moments, the terms at the peak and what sets it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .options import GiB

if TYPE_CHECKING:
    from .estimate import Plan


def header(p: Plan) -> str:
    o, m = p.options, p.model
    mode = {"full": "full fine-tuning", "lora": f"LoRA r{o.lora_rank}", "qlora": f"QLoRA (NF4) r{o.lora_rank}"}[o.mode]
    ranks = f"{o.num_gpus} x {o.gpu_memory_gib:g} GiB" + (" (FSDP2)" if o.sharded else " (one process)")
    return (f"{m.name}: {m.num_params / 1e9:.2f}B params | {o.device} {ranks} | {mode}, {o.optimizer} "
            f"({o.step_impl} step), {o.mixed_precision or 'no'} mixed precision | token budget {o.token_budget}/GPU"
            f"{', shared prompt' if o.share_prompt else ''} | AC {'on' if o.activation_checkpointing else 'off'} | "
            f"CPU offload {'on' if o.cpu_offload else 'off'} | reference {o.reference_mode} | generation "
            f"{o.gen_batch} x ({o.prompt_len}+{o.max_new_tokens})")


def _rows(terms: dict[str, float], indent: str = "  ") -> list[str]:
    return [f"{indent}{k:<56}{v / GiB:>9.2f}" for k, v in terms.items() if v]


def plan_table(p: Plan) -> str:
    """The plan as text: each moment's largest point, the terms of the peak and what sets it,
    usable and host memory, fits or not."""
    peak = p.peak_point
    lines = [header(p), f"{'moment (largest point), per GPU':<58}{'GiB':>9}"]
    for name in dict.fromkeys(pt.moment for pt in p.points):
        pt = p.moment(name)
        mark = "  <- peak" if pt is peak else ""
        lines.append(f"  {name + ' (' + pt.where + ')':<56}{pt.total / GiB:>9.2f}{mark}")
    term, value = peak.set_by()
    lines += [f"peak: {peak.moment}, at {peak.where}: {peak.total / GiB:.2f} GiB, set by {term} "
              f"({value / GiB:.2f} GiB)", "terms at the peak:"]
    lines += _rows(peak.terms)
    lines += [f"{'usable (after fragmentation and reserve)':<58}{p.usable / GiB:>9.2f}",
              f"{'host memory per node':<58}{p.host_per_node / GiB:>9.2f}"]
    lines += _rows(p.host)
    lines.append(f"fits: {'YES' if p.fits else 'NO'}")
    return "\n".join(lines + [f"note: {n}" for n in p.notes])
