"""Resumable checkpoints of a training run, in one format for one process and FSDP alike:
torch.distributed.checkpoint (DCP), the shape of torchtitan's CheckpointManager.

The ``Checkpointer`` saves and loads a dict of ``Stateful`` objects (``state_dict()`` /
``load_state_dict()``), each under its name:

    model        ModelState      the parameters that train (LoRA: the adapters; the frozen base is the
                                 starting model, which the run's training key names)
    optimizer    OptimizerState  the optimizer's state, by parameter name
    scheduler    the LR scheduler itself (torch's schedulers are Stateful)
    rng          RNGState        Python's, NumPy's, torch's CPU and CUDA generators, of every rank
    train_state  TrainState      the data position (added by the Checkpointer; see TrainState)

Parameter names are the Hugging Face ones (DCP's state-dict helpers drop the runner's, FSDP's and
the checkpoint wrapper's prefixes). Under FSDP each rank writes its own shards, and a checkpoint
loads on another number of ranks (the RNG states are then not restored: they belong to ranks that
no longer exist). In one process DCP needs no process group.

Layout in ``out_dir``::

    checkpoints/index.json  the latest complete checkpoint: step, directory, training key, steps
                            planned, world size; replaced atomically once a save is complete
    checkpoints/step-N/     DCP's files (*.distcp, .metadata)
    model/                  the final model: one Hugging Face directory (``Checkpointer.export``, a
                            conversion: spin_kernels.distributed.export), stamped with the key

A checkpoint exists once the index names it: a save killed halfway leaves a directory the index
does not name, which is ignored and removed by the next save. Nothing is unpickled without
restriction: DCP's non-tensor entries are read with ``weights_only=True`` and its
``.metadata`` file by an unpickler that admits only DCP's metadata classes.

    ckpt = Checkpointer(run_states(runner, optimizer, scheduler), out_dir, key=key, num_steps=n, save_every=50)
    start = ckpt.load()                      # 0, or the step of this run's latest checkpoint
    for step in range(start, n): ...; ckpt.save(step + 1)
    model_dir = ckpt.export(runner, tokenizer, info)   # the final model (rank 0 writes it)
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import random
import shutil
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from spin_kernels.distributed.env import barrier, rank, world_size
from spin_kernels.distributed.fsdp import inner_model
from spin_kernels.distributed.export import fsync_dir, read_info, save_model_dir

from .config import ConfigError

INDEX_FILE = "index.json"
_FORMAT = "spin_kernels.checkpoint/1"


# -- the run's random state --------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices) with ``seed``."""
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's generators, as tensors (a checkpoint holds no pickled Python objects)."""
    _, mt, gauss = random.getstate()
    state = {"python": torch.tensor(mt, dtype=torch.int64), "python_gauss": _maybe(gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    with contextlib.suppress(ImportError):
        import numpy as np

        _, keys, pos, has_gauss, cached = np.random.get_state()
        state.update(numpy=torch.from_numpy(keys.astype(np.int64)), numpy_pos=torch.tensor([pos, has_gauss]),
                     numpy_gauss=torch.tensor(cached, dtype=torch.float64))
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what ``rng_state`` returned."""
    gauss = state["python_gauss"].tolist()
    random.setstate((3, tuple(state["python"].tolist()), gauss[1] if gauss[0] else None))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
    if "numpy" in state:
        import numpy as np

        pos, has_gauss = state["numpy_pos"].tolist()
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss,
                             float(state["numpy_gauss"])))


def _maybe(value: float | None) -> torch.Tensor:
    return torch.tensor([0.0, 0.0] if value is None else [1.0, value], dtype=torch.float64)


# -- the Stateful objects of a run ---------------------------------------------------------------


_TRAINED = StateDictOptions(ignore_frozen_params=True)


class ModelState:
    """The parameters of ``model`` (a runner or a module) that train, by Hugging Face name."""

    def __init__(self, model):
        self.model = inner_model(model)

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model, options=_TRAINED)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Not strict: the frozen parameters are not in a checkpoint. A checkpoint lacking a trained
        # one was refused by dcp.load already (every key of state_dict() must be found).
        set_model_state_dict(self.model, state, options=StateDictOptions(ignore_frozen_params=True, strict=False))


class OptimizerState:
    """The state of ``optimizer`` over ``model``'s parameters, by parameter name (any number of ranks)."""

    def __init__(self, model, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = inner_model(model), optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


class RNGState:
    """The generators of every rank (``rng_state``), each rank's under its own key: DCP keeps one
    copy of a plain tensor that several ranks save under the same name."""

    def state_dict(self) -> dict[str, Any]:
        return {f"rank{rank()}": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state[f"rank{rank()}"])


@dataclass
class TrainState:
    """The data position: a run's global batches are a fixed schedule (spin_kernels.training.trainer
    .global_batches), so it is the number of optimizer steps taken, ``step``, of ``num_steps``."""

    step: int = 0
    num_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step), "num_steps": torch.tensor(self.num_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.num_steps = int(state["step"]), int(state["num_steps"])


def run_states(runner, optimizer: torch.optim.Optimizer, scheduler: Stateful) -> dict[str, Stateful]:
    """The Stateful objects of a training run (the Checkpointer adds its TrainState)."""
    return {"model": ModelState(runner), "optimizer": OptimizerState(runner, optimizer), "scheduler": scheduler,
            "rng": RNGState()}


# -- DCP, without unrestricted unpickling --------------------------------------------------------

_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                     "torch.distributed.checkpoint.planner")
_METADATA_NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                   ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle: admit only the classes it is made of."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in _METADATA_NAMES
        if module in _METADATA_MODULES:
            allowed = isinstance(getattr(importlib.import_module(module), name, None), type)
        elif module == "torch":
            allowed = allowed or isinstance(getattr(torch, name, None), torch.dtype)
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return super().find_class(module, name)


class _Reader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _LoadPlanner(DefaultLoadPlanner):
    """DCP's planner, but non-tensor entries (hyper-parameters, counters) load with weights_only=True."""

    def load_bytes(self, read_item, value) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            lines = str(exc).splitlines()
            reason = next((line for line in lines if line.startswith("Trying to load")), lines[0] if lines else "")
            raise pickle.UnpicklingError(f"entry {read_item.dest_index.fqn!r} holds more than tensors and plain "
                                         f"Python values; refused, not unpickled ({reason})") from None
        if not self.flatten_state_dict:
            self.state_dict[read_item.dest_index.fqn] = obj
            return
        *parents, last = self.mappings[read_item.dest_index.fqn]
        target = self.original_state_dict
        for key in parents:
            target = target[key]
        target[last] = obj


@contextlib.contextmanager
def _dcp(action: str, path: str):
    """DCP's call, without its warning that one process is meant, and with a failure raised as a
    RuntimeError (DCP's CheckpointException is a BaseException: it would slip past ``except Exception``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        try:
            yield
        except CheckpointException as exc:
            causes = "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, (e, _) in exc.failures.items())
            raise RuntimeError(f"{action} {path} failed: {causes}") from exc


def save_states(states: dict[str, Stateful], path: str) -> None:
    """Write ``states`` to the DCP directory ``path``; a collective under FSDP (every rank's files
    and the metadata are written when it returns)."""
    with _dcp("saving the checkpoint", path):
        dcp.save(states, storage_writer=FileSystemWriter(path))


def load_states(states: dict[str, Stateful], path: str) -> None:
    """Load the DCP directory ``path`` into ``states`` (in place); every key they hold must be there."""
    with _dcp("loading the checkpoint", path):
        dcp.load(states, storage_reader=_Reader(path), planner=_LoadPlanner())


# -- the index -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointEntry:
    """A complete checkpoint as its index names it: ``path`` holds the states after ``step``."""

    step: int
    path: str
    training_key: str | None
    num_steps: int | None
    world_size: int


def latest_checkpoint(root: str) -> CheckpointEntry | None:
    """The checkpoint that ``root/index.json`` names; None without an index."""
    index = os.path.join(root, INDEX_FILE)
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != _FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {_FORMAT!r}")
        entry = CheckpointEntry(int(data["step"]), os.path.join(root, data["dir"]), data.get("training_key"),
                                data.get("num_steps"), int(data["world_size"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RuntimeError(f"{index} is not a checkpoint index ({type(exc).__name__}: {exc}); remove {root} to "
                           f"start over") from exc
    if not os.path.isfile(os.path.join(entry.path, ".metadata")):
        raise RuntimeError(f"{index} names {entry.path}, which is missing or incomplete (no .metadata); remove "
                           f"{root} to start over")
    return entry


def _write_index(root: str, entry: CheckpointEntry) -> None:
    data = {"format": _FORMAT, "step": entry.step, "dir": os.path.basename(entry.path),
            "training_key": entry.training_key, "num_steps": entry.num_steps, "world_size": entry.world_size}
    tmp = os.path.join(root, f".{INDEX_FILE}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, INDEX_FILE))
    fsync_dir(root)


def _remove_all_but(root: str, keep: str | None) -> None:
    """Remove everything in ``root`` but the index and the directory ``keep`` (index first when
    it goes too, so that no index ever names a removed directory)."""
    if not os.path.isdir(root):
        return
    if keep is None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(root, INDEX_FILE))
    for name in os.listdir(root):
        if name in (INDEX_FILE, keep):
            continue
        path = os.path.join(root, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


# -- the checkpointer ----------------------------------------------------------------------------


class Checkpointer:
    """The step checkpoints of one training run in ``out_dir/checkpoints`` and its final model
    ``out_dir/model`` (see the module docstring).

    ``key``: the run's training key (spin_kernels.training.provenance.training_key): a checkpoint
    written from other inputs is never resumed; it is discarded (``on_stale="regenerate"``, with a
    warning) or refused (``"error"``). ``num_steps``: the schedule's length; a checkpoint of
    another schedule is refused. ``save_every``: save after every that many steps (0: never).
    """

    def __init__(self, states: dict[str, Stateful], out_dir: str, *, key: str | None = None,
                 num_steps: int | None = None, save_every: int = 1, on_stale: str = "regenerate"):
        self.train_state = TrainState(num_steps=num_steps or 0)
        self.states = {**states, "train_state": self.train_state}
        self.root = os.path.join(out_dir, "checkpoints")
        self.model_dir = os.path.join(out_dir, "model")
        self.key, self.num_steps, self.save_every, self.on_stale = key, num_steps, save_every, on_stale

    @staticmethod
    def finished(out_dir: str, key: str) -> bool:
        """Whether ``out_dir`` holds a final model trained from the inputs of ``key``."""
        return trained_model_key(out_dir) == key

    def latest(self) -> CheckpointEntry | None:
        """The latest complete step checkpoint of ``out_dir`` (whatever its inputs)."""
        return latest_checkpoint(self.root)

    def load(self) -> int:
        """Continue the latest checkpoint of this run (every state) and return its step; 0 when
        there is none or it was discarded as stale."""
        found = self.latest()
        if found is None:
            return 0
        if self.key is not None and found.training_key != self.key:
            return self._stale(found)
        if self.num_steps is not None and found.num_steps != self.num_steps:
            raise RuntimeError(f"cannot resume from {found.path}: it planned {found.num_steps} steps, this run "
                               f"{self.num_steps} (data or batch settings changed)")
        states = dict(self.states)
        if found.world_size != world_size() and "rng" in states:
            del states["rng"]
            if rank() == 0:
                print(f"spin-kernels: note: {found.path} was written by {found.world_size} process(es), this run has "
                      f"{world_size()}: the model and optimizer are resharded, the random generators restart from "
                      f"the seed", file=sys.stderr)
        load_states(states, found.path)
        if self.train_state.step != found.step:
            raise RuntimeError(f"{found.path} holds step {self.train_state.step}, its index says {found.step}")
        return found.step

    def _stale(self, found: CheckpointEntry) -> int:
        message = (f"{found.path} was trained from other inputs (examples, reference log-probs, training options "
                   f"or starting weights) than this run")
        if self.on_stale == "error":
            raise ConfigError(f"--resume: {message}; remove {self.root} or rerun with --on-stale regenerate")
        barrier()  # every rank has read the index before rank 0 removes it
        if rank() == 0:
            print(f"spin-kernels: warning: {message}; training starts over", file=sys.stderr)
            _remove_all_but(self.root, None)
        barrier()
        return 0

    def save(self, step: int) -> None:
        """After optimizer step ``step``: a checkpoint every ``save_every`` steps (not after the
        last one: ``export`` writes the final model); the previous one is removed once the index
        names the new one. A collective under FSDP."""
        if not self.save_every or step % self.save_every or (self.num_steps is not None and step >= self.num_steps):
            return
        path = os.path.join(self.root, f"step-{step}")
        if rank() == 0:
            shutil.rmtree(path, ignore_errors=True)  # a save of this step killed before the index named it
        barrier()
        self.train_state.step = step
        save_states(self.states, path)
        if rank() == 0:
            _write_index(self.root, CheckpointEntry(step, path, self.key, self.num_steps, world_size()))
            _remove_all_but(self.root, os.path.basename(path))
        barrier()

    def export(self, runner, tokenizer, info: dict[str, Any]) -> str:
        """Write the final model of ``runner`` (one Hugging Face directory, gathered on rank 0 under
        FSDP; LoRA: the adapters merged in, and the adapter beside them) with ``info`` and the
        training key in its spin_info.json; remove the step checkpoints. A collective; every rank
        returns after the model exists (the next iteration loads it)."""
        from spin_kernels.distributed import full_state_dict

        from .lora import ADAPTER_DIR, export_target, full_precision_state, is_lora, merged_state_dict
        from .parallel import is_sharded

        model = inner_model(runner)
        full = full_state_dict(runner) if is_sharded(runner) else None  # a collective: the weights on rank 0
        if rank() == 0:
            info = {**info, "training_key": self.key}
            if is_lora(model):  # the adapter merged into a full checkpoint (the next opponent), and beside it
                full = full if full is not None else full_precision_state(model)
                adapter = model.peft_config["default"]
                merged = merged_state_dict(full, adapter.lora_alpha / adapter.r)
                save_model_dir(export_target(model), tokenizer, self.model_dir, state_dict=merged, extra=info,
                               also=lambda tmp: model.save_pretrained(os.path.join(tmp, ADAPTER_DIR), state_dict=full))
            else:
                save_model_dir(model, tokenizer, self.model_dir, state_dict=full, extra=info)
            _remove_all_but(self.root, None)
        barrier()
        return self.model_dir


def trained_model_key(out_dir: str) -> str | None:
    """The training key recorded with the final model of ``out_dir`` (None if there is none)."""
    model_dir = os.path.join(out_dir, "model")
    return read_info(model_dir).get("training_key") if os.path.isdir(model_dir) else None
