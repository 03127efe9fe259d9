"""Memory planner: will a SPIN iteration fit, where is its peak, and what is the cheapest
configuration that does.

    from spin_kernels.memory import DataSize, estimate_time, plan, recommend
    p = plan("llama3-70b", num_gpus=8, gpu_memory_gib=80, cpu_offload=True)
    print(p.table())          # every moment; the peak and the term that sets it
    print(estimate_time(p, DataSize(prompts=50_000), "h100").table())   # time and GPU-hours by stage
"""

from .commands import launch_command, trainer_flags
from .cost import DEVICES, DataSize, DeviceRates, TimeEstimate, estimate_time
from .estimate import Plan, Point, gpu_counts, plan, recommend
from .models import PRESETS, ModelSpec, resolve_model, spec_from_config
from .options import GiB, PlanOptions

__all__ = [
           "DEVICES",
           "PRESETS",
           "DataSize",
           "DeviceRates",
           "GiB",
           "ModelSpec",
           "Plan",
           "PlanOptions",
           "Point",
           "TimeEstimate",
           "estimate_time",
           "gpu_counts",
           "launch_command",
           "plan",
           "recommend",
           "resolve_model",
           "spec_from_config",
           "trainer_flags",
]
