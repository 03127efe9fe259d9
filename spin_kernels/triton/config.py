"""Block configurations (a small fixed one for the interpreter, autotuned sets for sm80/sm90)
and how a kernel is launched with them.

The kernels take their block sizes as constexprs. Under ``TRITON_INTERPRET=1`` they run with
``INTERPRETER_BLOCKS`` (tiny tiles: the interpreter executes every tile in numpy). On CUDA
``launch`` wraps a kernel in ``triton.autotune`` with the configurations of its family and the
device's architecture, once per (kernel, architecture):

* "head": the logit-tile kernels of the forward (BLOCK_M rows × BLOCK_V vocab × BLOCK_K hidden);
* "producer": the backward's gradient-tile kernel: its row × vocab tile is the backward's tile
  grid (``backward_tiles``), fixed per architecture, so only BLOCK_K and the pipeline are tuned;
* "gemm": the backward's two products, whose reduction steps are that tile grid: BLOCK_H (the
  hidden columns of a program) and the pipeline are tuned.

``SPIN_KERNELS_AUTOTUNE=0`` tries each family's first and last candidates only (GPU test runs:
far fewer compilations); the last of every set is the small one that fits fp32 inputs.

The candidates follow the static audit (scripts/triton_static_audit.py, the table in
benchmarks/results/triton-static-audit.md, Triton 3.6 and 3.9): every one runs tl.dot on the
tensor cores (wgmma on sm90, mma on sm80) and fits the card's shared memory for 16-bit inputs,
and for bf16 none spills a register (but 64×128×64/4 warps on sm90 under Triton 3.6: 36 bytes);
the last one of each set fits fp32 (TF32) inputs without spilling.
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


# Candidates per architecture (compute capability major). The forward keeps a whole logit tile
# and its online-softmax terms live: 128×256 tiles (sm90) and 128-row tiles with mma (sm80)
# spill registers, so sm90 stays at 128×128 / 64×256 and sm80 at 64-row tiles.
_CONFIGS = {
    9: [
        _cfg(128, 128, 64, 8, 4),
        _cfg(64, 256, 64, 8, 4),
        _cfg(128, 128, 128, 8, 3),
        _cfg(64, 128, 64, 4, 4),
        _cfg(64, 64, 64, 4, 3),
    ],
    8: [
        _cfg(64, 128, 64, 8, 3),
        _cfg(64, 128, 32, 4, 4),
        _cfg(64, 64, 64, 4, 4),
    ],
}


def _meta(warps: int, stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


# The backward's tile grid (rows × vocabulary): the producer's tiles and the products' reduction
# steps; 128 × 128 suits both sm80 and sm90 (a [128, 128] bf16 operand is 32 KB of shared memory).
_BACKWARD_TILES = {9: (128, 128), 8: (128, 128)}
# The producer holds a [128, 128] fp32 logit tile and its gradient: over 4 warps that is 128
# registers a thread for the tile alone, and it spilled; it runs 8 warps.
_PRODUCER_CONFIGS = {
    9: [_meta(8, 3, BLOCK_K=64), _meta(8, 4, BLOCK_K=64), _meta(8, 3, BLOCK_K=128), _meta(8, 3, BLOCK_K=32)],
    8: [_meta(8, 3, BLOCK_K=64), _meta(8, 3, BLOCK_K=32)],
}
# The last of each set is for fp32 inputs: a [128, 128] fp32 operand is 64 KB, so the deeper
# pipelines overflow shared memory. BLOCK_H 256, and 128 on sm80, spilled registers.
_GEMM_CONFIGS = {
    9: [_meta(8, 3, BLOCK_H=128), _meta(8, 4, BLOCK_H=64), _meta(4, 2, BLOCK_H=64), _meta(8, 2, BLOCK_H=64)],
    8: [_meta(8, 3, BLOCK_H=64), _meta(4, 2, BLOCK_H=32), _meta(8, 3, BLOCK_H=32)],
}
_FAMILIES = {"head": _CONFIGS, "producer": _PRODUCER_CONFIGS, "gemm": _GEMM_CONFIGS}
_INTERPRETER_META = {"head": INTERPRETER_BLOCKS, "producer": {"BLOCK_K": INTERPRETER_BLOCKS["BLOCK_K"]},
                     "gemm": {"BLOCK_H": 16}}


def backward_tiles(device: torch.device) -> tuple[int, int]:
    """(TILE_M, TILE_V) of the backward's tile grid on ``device``."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_BLOCKS["BLOCK_M"], INTERPRETER_BLOCKS["BLOCK_V"]
    major, _ = torch.cuda.get_device_capability(device)
    return _BACKWARD_TILES[9 if major >= 9 else 8]


def candidates(family: str, major: int) -> list[triton.Config]:
    """The autotuning candidates of ``family`` for compute capability ``major``."""
    configs = _FAMILIES[family][9 if major >= 9 else 8]
    if os.environ.get("SPIN_KERNELS_AUTOTUNE", "1") == "0":
        # Correctness runs (tests) compile a fraction of the variants: the first candidate and
        # the last, the small one that fp32 inputs fit (the autotuner skips what does not fit).
        configs = configs[:1] + configs[1:][-1:]
    return configs


@functools.cache
def _tuned(kernel, family: str, major: int, reset_to_zero: tuple[str, ...], restore_value: tuple[str, ...]):
    configs = candidates(family, major)
    # H and V decide the best tile; M varies every step and is left out of the key so that
    # a training run tunes once. Outputs written by zeroing first are zeroed between trials;
    # outputs accumulated into across launches are restored.
    return triton.autotune(configs=configs, key=["H", "V"], reset_to_zero=list(reset_to_zero) or None,
                           restore_value=list(restore_value) or None)(kernel)


def launch(kernel, grid, *, device: torch.device, family: str = "head", reset_to_zero: tuple[str, ...] = (),
           restore_value: tuple[str, ...] = (), **args) -> None:
    """Run ``kernel[grid](**args)`` with the block configuration of its ``family``.

    ``grid`` is a function of the block sizes (a dict of the family's BLOCK_* names). The
    kernel's arguments are passed by name only: a kernel takes some twenty of them, and a
    reordered signature must not silently swap two.
    """
    if interpreting() or device.type != "cuda":
        meta = _INTERPRETER_META[family]
        kernel[grid(meta)](**args, **meta)
        return
    major, _ = torch.cuda.get_device_capability(device)
    _tuned(kernel, family, major, reset_to_zero, restore_value)[grid](**args)


def flags_from_pointers(**flags: str):
    """``triton.heuristics`` setting each constexpr flag (``HAS_BIAS="b_ptr"``) to whether its
    pointer argument was given: an absent tensor is passed as None, which Triton specialises
    into a constexpr, so a flag cannot disagree with its pointer and no live tensor stands in
    for a missing one. Goes between ``triton.jit`` and the autotuner ``launch`` adds (Triton's
    order: autotune(heuristics(jit)))."""
    return triton.heuristics({flag: functools.partial(_given, pointer) for flag, pointer in flags.items()})


def _given(pointer: str, args: dict) -> bool:
    return args[pointer] is not None


def split_align() -> int:
    return INTERPRETER_BLOCKS["BLOCK_V"] if interpreting() else GPU_SPLIT_ALIGN


# tl.dot's input_precision for fp32 inputs when torch does not allow TF32 matmuls (torch's
# default): "tf32x3" splits each operand into a TF32 high part and a TF32 low part and sums three
# tensor-core products (all but lo·lo), accurate to about fp32's rounding. "ieee" would be exact
# fp32, but Triton lowers it to FMA instructions, and nearly every configuration then spilled,
# up to 198 KB of spill stores and loads by ptxas's count (benchmarks/README.md, the audit).
FP32_EXACT_PRECISION = "tf32x3"


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the kernels' products run in: the inputs' own when they agree, else float32 (a
    fp32 hidden with a half-precision weight, or the reverse, is never rounded down: the
    kernels convert both operands of each tile product to fp32, see ``tiles.matching``)."""
    return dtypes[0] if all(d == dtypes[0] for d in dtypes) else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for inputs of ``dtype``: "tf32" for fp32 when torch allows TF32
    matmuls, FP32_EXACT_PRECISION for fp32 when it does not; 16-bit inputs ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return FP32_EXACT_PRECISION
    return "tf32"
