"""One process or FSDP2 over torchrun's processes: the few places where the SPIN stages differ.

Every stage computes with a *runner*, a ``spin_kernels.distributed.ModelRunner``:
``runner(fn, *args)`` runs ``fn(model, *args)``, ``runner.no_grad(fn, ...)`` the same without
autograd, ``runner.generate(...)`` is ``model.generate``. In one process it is a plain wrapper
around the model (``as_runner``); under FSDP it is the sharded root built by ``Loader.runner``, so
the fused loss, reference log-probs and generation run inside the root's forward, where the
embeddings and the lm_head are unsharded. The stages themselves only ask ``rank()`` /
``world_size()`` (1 process: 0 / 1) for their share of the work, ``is_main()`` for who writes
files, and ``barrier()`` before others read them.

    torchrun --nproc_per_node 2 -m spin_kernels.cli iterate --model SFT --data d.jsonl --output-dir run
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from spin_kernels.distributed import DistEnv, ModelRunner, init_distributed
from spin_kernels.distributed.env import barrier, rank, shutdown, world_size

from .config import ConfigError, SpinConfig

__all__ = ["Session", "as_runner", "barrier", "is_main", "is_sharded", "progress", "progress_defaults", "rank",
           "resolve_device", "session", "world_size"]


@dataclasses.dataclass(frozen=True)
class Session:
    """How this process runs: ``fsdp`` (sharded runners) or not, its device and ``env``."""

    fsdp: bool
    device: torch.device
    env: DistEnv


def resolve_device(name: str) -> torch.device:
    """The device of ``model.device``; a CUDA device that this machine lacks is refused here,
    before any model is loaded."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"model.device: {exc}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device: {name!r} but no CUDA device is available (torch.cuda.is_available() "
                              f"is False); use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"model.device: {name!r} but this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"model.device: {name!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return device


def _torchrun_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_fsdp(cfg: SpinConfig) -> bool:
    """Whether this run shards with FSDP (``distributed.fsdp``; none: when WORLD_SIZE > 1)."""
    d = cfg.distributed
    multi = _torchrun_world() > 1 or (dist.is_initialized() and dist.get_world_size() > 1)
    fsdp = multi if d.fsdp is None else d.fsdp
    if multi and not fsdp:
        raise ConfigError("distributed.fsdp: false, but this process is one of several (WORLD_SIZE > 1); "
                          "multi-process runs shard the model with FSDP (drop --no-fsdp)")
    from .samplers import check_processes

    check_processes(cfg.generation, sharded=fsdp)
    return fsdp


@contextlib.contextmanager
def session(cfg: SpinConfig) -> Iterator[Session]:
    """Set up this process for ``cfg``: FSDP (process group from torchrun's environment) or not.

    A process group this call creates is destroyed on exit; one that already exists (set up by the
    caller) is used and kept. ``distributed.fsdp: true`` in a single process shards over a
    1-rank group (useful to check the FSDP path without torchrun).
    """
    device = resolve_device(cfg.model.device)  # refuses a device this machine lacks, in every mode
    if not resolve_fsdp(cfg):
        yield Session(False, device, DistEnv(0, 1, 0, device))
        return
    if _torchrun_world() > 1:
        from .runlock import end_with_parent

        end_with_parent()  # a rank must not outlive its launcher (and keep writing the run)
    created = not dist.is_initialized()
    kind = None if cfg.model.device == "auto" else device.type
    env = init_distributed(device=kind)
    if not dist.is_initialized():  # fsdp asked for in a single process: a 1-rank group
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
        env = init_distributed(device=kind)
    try:
        yield Session(True, env.device, env)
    finally:
        if created:
            shutdown()


def as_runner(model) -> ModelRunner:
    """``model`` as a runner: itself if it is one (sharded or not), else a plain wrapper of it."""
    return model if isinstance(model, ModelRunner) else ModelRunner(model)


def is_sharded(runner) -> bool:
    """True for an FSDP root (then mixed precision comes from FSDP, not from autocast)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(runner, FSDPModule)


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and logs."""
    return rank() == 0


_BAR_DEFAULTS: dict = {}


def progress(**kwargs):
    """A tqdm bar on rank 0; silent on the other ranks. Options of ``progress_defaults`` apply."""
    from tqdm.auto import tqdm

    if not is_main():
        kwargs["disable"] = True
    return tqdm(dynamic_ncols=True, **{**_BAR_DEFAULTS, **kwargs})


@contextlib.contextmanager
def progress_defaults(**options) -> Iterator[None]:
    """Options of the bars made inside, e.g. ``leave=False``: the stages' bars vanish when done
    (the demo prints its own line per iteration)."""
    saved = dict(_BAR_DEFAULTS)
    _BAR_DEFAULTS.update(options)
    try:
        yield
    finally:
        _BAR_DEFAULTS.clear()
        _BAR_DEFAULTS.update(saved)
