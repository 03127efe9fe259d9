"""The GPU session's dry run: the Python paths of a lent GPU's first call, on CPU, in about a minute.

``bash benchmarks/gpu_session.sh --dry-run OUT_DIR`` runs what the GPU call will run, with the
same commands and options, plus ``--dry-run`` for the runner (``python -m benchmarks run --device
cuda --dry-run ...``), which then:

* runs on the CPU, the Triton kernels in the interpreter (``TRITON_INTERPRET=1``), with the
  contenders a CUDA run selects (``ours:triton``, ``ours:torch``, the baselines that import; not
  the CPU-only ``ours:cpu`` and ``gemm:onednn``);
* walks the whole CUDA plan (every case, op, mode and N of the sweep, in its order) with each case
  shrunk to a miniature of itself (``miniature_case``, ``miniature_e2e``): same name, dtype and
  softcap, tiny H, V and token counts;
* records, as "peak extra memory", the bytes of a run's outputs and gradients (CUDA's allocator
  statistics do not exist on a CPU), so that the tables and plots take the branches a GPU run's
  figures take; labelled as such, never a measurement;
* writes under ``OUT_DIR/dry-run-<cpu slug>/`` the files the GPU run writes under
  ``OUT_DIR/<gpu slug>/``.

``check_layout`` checks what the device tool brings back from ``$OUT``: at most 8 files, at most
2 folders deep, names of letters, digits, '.', '_' and '-' (``python -m benchmarks check-out``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from torch import Tensor

NOTE = ("DRY RUN: the CUDA plan on CPU at miniature sizes (Triton in its interpreter); times, errors and "
        "memory (the bytes of outputs and gradients) are not measurements.")
MEM_METHOD = "dry run: bytes of the run's outputs and gradients (not a peak)"

# Miniature heads: tiny but valid for the interpreter's tl.dot (every dimension >= 16), the same
# for every head so that compiled baselines (Liger, CCE) compile once.
MINI_HIDDEN, MINI_VOCAB = 16, 128
MINI_SEQ_LEN, MINI_PROMPT_LEN = 12, 4
# The token budget the GPU layout's sequence count is measured against (4k counted tokens = 1 pair).
_PAIR_TOKENS = 4096

# What the device tool brings back from $OUT.
MAX_FILES, MAX_DEPTH = 8, 2
_NAME = re.compile(r"[A-Za-z0-9._-]+")


def miniature_case(case):
    """``case`` (shapes.Case) with its name, dtype and softcap, at a CPU-sized head and layout;
    N grows with the real N (1 pair at 4k counted tokens, one more per doubling) so that an N
    sweep stays a sweep."""
    from .shapes import Head, Layout

    counted = case.layout.counted
    pairs = max(1, int(math.log2(max(counted, 1) / _PAIR_TOKENS)) + 1)
    head = Head(case.head.name, MINI_HIDDEN, MINI_VOCAB, case.head.softcap)
    return dataclasses.replace(case, head=head, layout=Layout(pairs, MINI_SEQ_LEN, MINI_PROMPT_LEN))


def miniature_e2e(case):
    """An e2e case (e2e.E2ECase) with the same model family, dtype, tied embeddings, GQA ratio and
    reference mode, at a CPU-sized model and batch."""
    spec = case.model
    kv = max(1, 4 * spec.kv_heads // spec.heads)
    # 4,096: the offline BPE tokenizer's ids.
    model = dataclasses.replace(spec, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=kv, vocab=4096)
    return dataclasses.replace(case, model=model, pairs=2, max_length=96, max_prompt_length=48)


def output_bytes(out: Tensor, grads) -> int:
    """The dry run's stand-in for peak extra memory: bytes of the output and the gradients."""
    tensors = [out, *(g for g in grads if g is not None)]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_layout(out_dir: str | Path) -> list[str]:
    """What would not come back from ``out_dir`` as the device tool's $OUT (empty: all is fine)."""
    root = Path(out_dir)
    problems, files = [], []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        bad = [part for part in rel.parts if not _NAME.fullmatch(part)]
        if bad:
            problems.append(f"{rel}: name {bad[0]!r} has characters outside [A-Za-z0-9._-]")
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            problems.append(f"{rel}: not a plain file or folder")
        elif path.is_file():
            files.append(rel)
            if len(rel.parts) - 1 > MAX_DEPTH:
                problems.append(f"{rel}: {len(rel.parts) - 1} folders deep (at most {MAX_DEPTH})")
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files (at most {MAX_FILES}): " + ", ".join(map(str, files)))
    return problems
