"""Memory planner: will a SPIN iteration fit, and what is the cheapest configuration that does.

    from spin_kernels.memory import plan, recommend
    print(plan("llama3-70b", num_gpus=8, gpu_memory_gib=80, cpu_offload=True).table())
"""

from .estimate import GiB, Plan, PlanOptions, gpu_counts, plan, recommend
from .models import PRESETS, ModelSpec, resolve_model, spec_from_config

__all__ = [
           "PRESETS",
           "GiB",
           "ModelSpec",
           "Plan",
           "PlanOptions",
           "gpu_counts",
           "plan",
           "recommend",
           "resolve_model",
           "spec_from_config",
]
