"""Block configurations: a small fixed one for the interpreter, autotuned sets for sm80/sm90.

The kernels take their block sizes as constexprs. Under ``TRITON_INTERPRET=1`` they run with
``INTERPRETER_BLOCKS`` (tiny tiles: the interpreter executes every tile in numpy). On CUDA
``tuned(kernel, ...)`` wraps a kernel in ``triton.autotune`` with the configurations of the
device's architecture, once per (kernel, architecture).
"""

from __future__ import annotations

import functools
import os

import torch
import triton

# tl.dot needs every dimension >= 16; 32 columns let small tests cross several vocab blocks.
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_V": 32, "BLOCK_K": 16}

# Every GPU configuration's BLOCK_V divides this, so that a forward vocabulary split (a
# multiple of it) never cuts a block in two whatever configuration the autotuner picks.
GPU_SPLIT_ALIGN = 512


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _cfg(m: int, v: int, k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_V": v, "BLOCK_K": k}, num_warps=warps, num_stages=stages)


# Candidates per architecture (compute capability major). sm90 has 228 KB of shared memory
# per SM and benefits from 128×256 tiles with 8 warps; sm80 (164 KB) from 128×128, 4 stages.
_CONFIGS = {
    9: [
        _cfg(128, 256, 64, 8, 3),
        _cfg(128, 128, 64, 8, 4),
        _cfg(64, 256, 64, 8, 4),
        _cfg(128, 128, 128, 8, 3),
        _cfg(64, 128, 64, 4, 4),
    ],
    8: [
        _cfg(128, 128, 32, 8, 4),
        _cfg(128, 128, 64, 8, 3),
        _cfg(64, 128, 64, 4, 4),
        _cfg(128, 64, 64, 4, 4),
        _cfg(64, 64, 64, 4, 4),
    ],
}


def configs_for(device: torch.device) -> list[triton.Config]:
    """Autotuning candidates for ``device`` (sm90 set for Hopper and newer, sm80 set otherwise)."""
    major, _ = torch.cuda.get_device_capability(device)
    return _CONFIGS[9] if major >= 9 else _CONFIGS[8]


@functools.cache
def _tuned(kernel, major: int, reset_to_zero: tuple[str, ...]):
    configs = _CONFIGS[9] if major >= 9 else _CONFIGS[8]
    # H and V decide the best tile; M varies every step and is left out of the key so that
    # a training run tunes once. Outputs accumulated in place are zeroed between trials.
    return triton.autotune(configs=configs, key=["H", "V"], reset_to_zero=list(reset_to_zero) or None)(kernel)


def launch(kernel, grid, *args, device: torch.device, reset_to_zero: tuple[str, ...] = (), **kwargs) -> None:
    """Run ``kernel[grid](*args, **kwargs)`` with the right block configuration.

    ``grid`` is a function of the block sizes (a dict with BLOCK_M, BLOCK_V, BLOCK_K).
    """
    if interpreting() or device.type != "cuda":
        kernel[grid(INTERPRETER_BLOCKS)](*args, **kwargs, **INTERPRETER_BLOCKS)
        return
    major, _ = torch.cuda.get_device_capability(device)
    _tuned(kernel, major, reset_to_zero)[grid](*args, **kwargs)


def split_align() -> int:
    return INTERPRETER_BLOCKS["BLOCK_V"] if interpreting() else GPU_SPLIT_ALIGN


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use full-precision products unless torch allows TF32 for matmuls, as torch does."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
