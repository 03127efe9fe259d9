"""Multi-process SPIN on PyTorch FSDP2, launched with torchrun.

    env = init_distributed()                      # reads torchrun's RANK/WORLD_SIZE/...
    with empty_parameters():                      # no full copy of the weights per rank
        model = prepare_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    sharded = apply_fsdp2(model, mixed_precision="bf16", activation_checkpointing=True)
    load_full_weights(sharded, "path/to/hf_checkpoint" if env.is_main else None, device=env.device)
    opt = torch.optim.RMSprop(sharded.parameters(), lr=5e-7)
    result = train_step(sharded, opt, my_micro_batches, loss_fn=default_loss_fn(beta=0.1))
    save_checkpoint("runs/x/step-10", sharded, opt, step=10)
    export_hf("runs/x/final", sharded)

The fused loss, reference log-probs and generation run inside the FSDP root's forward
(``sharded(fn, ...)``), where the lm_head weight is unsharded.

The SPIN trainer and loop run on these pieces under torchrun (spin_kernels.training.parallel):

    torchrun --nproc_per_node 8 -m spin_kernels.cli iterate --model SFT --data d.jsonl --output-dir run
"""

from .checkpoint import export_hf, full_state_dict, latest_checkpoint, load_checkpoint, save_checkpoint
from .env import DistEnv, init_distributed, shutdown
from .fsdp import ShardedModel, apply_fsdp2, decoder_layers
from .gather import gather_by_index, shard_indices
from .gathering import gathered, unsharded_lm_head
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

__all__ = [
    "DistEnv", "NonFiniteError", "ShardedModel", "StepResult", "apply_fsdp2", "decoder_layers", "default_loss_fn",
    "empty_parameters", "export_hf", "full_state_dict", "gather_by_index", "gathered", "global_grad_norm",
    "grad_norm_and_clip_",
    "init_distributed", "latest_checkpoint", "load_checkpoint", "load_full_weights", "nonfinite_names",
    "read_safetensors", "save_checkpoint", "shard_indices", "shutdown", "train_step", "unsharded_lm_head",
]
