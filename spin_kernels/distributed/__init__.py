"""Multi-process SPIN on PyTorch FSDP2, launched with torchrun.

    env = init_distributed()                      # reads torchrun's RANK/WORLD_SIZE/...
    with empty_parameters():                      # no full copy of the weights per rank
        model = prepare_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    sharded = apply_fsdp2(model, mixed_precision="bf16", activation_checkpointing=True)
    load_full_weights(sharded, "path/to/hf_checkpoint" if env.is_main else None, device=env.device)
    opt = torch.optim.RMSprop(sharded.parameters(), lr=5e-7)
    result = train_step(sharded, opt, my_micro_batches, loss_fn=default_loss_fn(beta=0.1))
    export_hf("runs/x/final", sharded)

Resumable step checkpoints (torch.distributed.checkpoint, one format for one process and FSDP)
are written by ``spin_kernels.training.checkpoint.Checkpointer``.

The fused loss, reference log-probs and generation run inside the FSDP root's forward
(``sharded(fn, ...)``), where the lm_head weight is unsharded.

The SPIN trainer and loop run on these pieces under torchrun (spin_kernels.training.parallel):

    torchrun --nproc_per_node 8 -m spin_kernels.cli iterate --model SFT --data d.jsonl --output-dir run
"""

import warnings

from .env import DistEnv, init_distributed, shutdown
from .export import export_hf, full_state_dict, save_model_dir
from .fsdp import ModelRunner, apply_fsdp2, decoder_layers
from .full_params import gathered, unsharded_lm_head
from .init import empty_parameters, load_full_weights, read_safetensors
from .step import (
    NonFiniteError,
    StepResult,
    default_loss_fn,
    global_grad_norm,
    grad_norm_and_clip_,
    nonfinite_names,
    train_step,
)
from .work_split import gather_by_index, shard_indices

__all__ = [
    "DistEnv", "ModelRunner", "NonFiniteError", "StepResult", "apply_fsdp2", "decoder_layers", "default_loss_fn",
    "empty_parameters", "export_hf", "full_state_dict", "gather_by_index", "gathered", "global_grad_norm",
    "grad_norm_and_clip_", "init_distributed", "load_full_weights", "nonfinite_names", "read_safetensors",
    "save_model_dir", "shard_indices", "shutdown", "train_step", "unsharded_lm_head",
]


def __getattr__(name: str):
    if name == "ShardedModel":  # its name until it was also the one-process runner
        warnings.warn("spin_kernels.distributed.ShardedModel is now ModelRunner", DeprecationWarning, stacklevel=2)
        return ModelRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
