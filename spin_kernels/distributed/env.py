"""Process-group set-up for runs launched with ``torchrun`` (or a single plain process).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``init_distributed``
reads them. Without them (``python train.py``) the run is a single process and nothing is
initialised, so the same code path serves both.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size``, its ``device``, and the 1-D mesh."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None, device: str | None = None) -> DistEnv:
    """Initialise the default process group from torchrun's environment (idempotent).

    Args:
        backend: "nccl" or "gloo"; default nccl when CUDA is available, else gloo.
        device: "cuda" or "cpu"; default cuda when available. Each rank uses cuda:LOCAL_RANK.

    Returns:
        DistEnv; a single-process env (rank 0 of 1) when WORLD_SIZE is unset or 1 and no group
        was initialised by the caller.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return DistEnv(0, 1, 0, dev)
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def world_size() -> int:
    """1 when no process group is initialised."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a few Python floats over ranks in one collective (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def shutdown() -> None:
    """Let the backend's worker threads let go of finished work, then destroy the process group
    (a no-op when none is initialised). No barrier: a rank that failed must not wait for the
    others here.

    Why the pause: a gloo worker thread drops its reference to a finished collective (an FSDP2
    all-gather whose tensors are Python objects) a moment after the waiting rank resumes; that
    drop needs the GIL. If the interpreter is already finalizing, the thread is unwound inside a
    C++ destructor and the process aborts ("terminate called without an active exception",
    SIGABRT, about one run in ten on 2 CPU cores) after all its work is done. Sleeping releases
    the GIL, so those threads finish before the exit.
    """
    if not dist.is_initialized():
        return
    time.sleep(0.2)
    dist.destroy_process_group()
