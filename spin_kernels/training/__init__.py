"""The SPIN loop: generation, reference log-probs, the packed trainer, checkpoints, metrics.

One iteration (spin_kernels.training.loop) runs four stages (spin_kernels.training.stages, each a
plan and a run): the opponent samples synthetic responses (``generate_synthetic``), computes its
reference log-probs on packed batches (``reference_logps_for``), and the main player, initialised
from it, is trained with the fused SPIN loss (``train_spin``); the result is saved and becomes
the next opponent, and scores the held-out pairs. ``run_iterations`` runs K iterations with
resume; ``run_generate`` / ``run_reference`` / ``run_train`` one stage each; ``SpinConfig`` holds
every option.
"""

from .commands import run_generate, run_reference, run_train
from .config import ConfigError, SpinConfig, config_from_dict
from .generation import generate_synthetic
from .loop import run_iterations
from .reference import reference_logps_for, to_examples
from .trainer import TrainResult, train_spin

__all__ = [
    "ConfigError",
    "SpinConfig",
    "TrainResult",
    "config_from_dict",
    "generate_synthetic",
    "reference_logps_for",
    "run_generate",
    "run_iterations",
    "run_reference",
    "run_train",
    "to_examples",
    "train_spin",
]
