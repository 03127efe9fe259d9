"""What the accuracy studies of the Triton kernels share (grad_filter_error.py,
block_rounding_error.py): their common arguments, the device they run on (CUDA, or the Triton
interpreter on CPU), and where their JSON goes."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def study_parser(doc: str, rows: int, hidden: int, vocab: int) -> argparse.ArgumentParser:
    """The parser every study starts from: --rows, --hidden, --vocab (the shape) and --out."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--rows", type=int, default=rows)
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--vocab", type=int, default=vocab)
    p.add_argument("--out", default=None, help="folder for the study's JSON")
    return p


def study_device(script: str) -> torch.device | None:
    """CUDA when there is one, else the CPU under TRITON_INTERPRET=1; None (with a message
    naming ``script``) when neither can run the kernels."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        print(f"{script}: set TRITON_INTERPRET=1 to run on CPU", file=sys.stderr)
        return None
    return torch.device("cpu")


def write_study(out: str | None, script: str, device: torch.device, record: dict, argv) -> None:
    """``record`` + the command into ``out``/<script>-<cuda|cpu-interpreter>.json (if ``out``)."""
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    where = "cuda" if device.type == "cuda" else "cpu-interpreter"
    path = os.path.join(out, f"{script.replace('_', '-')}-{where}.json")
    args = " ".join(argv if argv is not None else sys.argv[1:])
    with open(path, "w") as f:
        json.dump({**record, "device": str(device),
                   "command": f"TRITON_INTERPRET=1 python benchmarks/{script}.py {args}"}, f, indent=2)
    print(f"wrote {path}")
