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
                            planned, world size, the tokenizer's digest and the size and xxh3-128
                            digest of each of its files; replaced atomically once a save is complete
    checkpoints/step-N/     DCP's files (*.distcp, .metadata)
    model/                  the final model: one Hugging Face directory (``Checkpointer.export``, a
                            conversion: spin_kernels.distributed.export); its spin_info.json
                            records the key, the tokenizer's digest and each file's size and digest

A checkpoint exists once the index names it: a save killed halfway leaves a directory the index
does not name, which is ignored and removed by the next save. Nothing is unpickled without
restriction: DCP's non-tensor entries are read with ``weights_only=True`` and its
``.metadata`` file by an unpickler that admits only DCP's metadata classes.

Digest what is written, check what is read: the index and spin_info.json carry a digest of their
own content, and before a checkpoint is resumed or a final model reused, every file is read again
and compared with its record (``damaged_files``; never a cached digest: a damaged file keeps its
size). A damaged checkpoint or model (a byte changed, a file truncated, emptied, missing or
added) is never used: it is discarded and rebuilt from the last good state with a warning naming
the file (``on_stale="regenerate"``: training starts over from the starting model, which is
deterministic, so the result is the one the undamaged files held), or refused naming the file and
what to delete (``"error"``).

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
from spin_kernels.distributed.export import INFO_FILE, fsync_dir, read_info, save_model_dir

from . import provenance
from .config import ConfigError

INDEX_FILE = "index.json"
_FORMAT = "spin_kernels.checkpoint/2"  # /2: with digests (a checkpoint of /1 is discarded with a warning)


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


# -- digests of what is written -----------------------------------------------------------------


class DamagedError(RuntimeError):
    """A checkpoint or final model whose files do not match their record; the message names the
    files and what was found."""


class OlderFormatError(DamagedError):
    """A checkpoint index of an earlier version (no digests): not damaged, but not resumable."""


def record_files(path: str, skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """``{relative path: {size, digest}}`` of every file under the directory ``path`` (but
    ``skip``), as just written (spin_kernels.training.provenance.file_digest)."""
    return {rel: {"size": os.path.getsize(os.path.join(path, rel)),
                  "digest": provenance.file_digest(os.path.join(path, rel))} for rel in _names(path) if rel not in skip}


def damaged_files(path: str, files: dict[str, dict[str, Any]], only: list[str] | None = None,
                  extra_ok: tuple[str, ...] = ()) -> list[str]:
    """What in the directory ``path`` differs from ``files`` (``record_files``), one phrase per
    file: missing, another size (truncated, emptied, grown), other bytes (read again, whatever
    any cache holds), or present but not recorded (not ``extra_ok``). ``only``: check these
    recorded files alone (a rank's share)."""
    problems = []
    for rel in (only if only is not None else list(files)):
        want, full = files[rel], os.path.join(path, rel)
        if not os.path.isfile(full):
            problems.append(f"{full} is missing")
        elif (size := os.path.getsize(full)) != want["size"]:
            how = "empty" if size == 0 else "truncated" if size < want["size"] else "longer"
            problems.append(f"{full} is {how}: {size} bytes, {want['size']} when it was written")
        elif provenance.file_digest(full, fresh=True) != want["digest"]:
            problems.append(f"{full} has other bytes than when it was written (same size, another xxh3-128 digest)")
    if only is None:
        present = set(_names(path))
        problems += [f"{os.path.join(path, rel)} was not there when it was written"
                     for rel in sorted(present - set(files) - set(extra_ok))]
    return problems


def _names(path: str) -> list[str]:
    """The files under the directory ``path``, relative to it."""
    return sorted(os.path.relpath(os.path.join(root, n), path) for root, _, names in os.walk(path) for n in names)


def _stamped(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the digest of its own content (so a changed byte of its file is seen)."""
    return {**data, "digest": provenance.text_digest(data)}


def _read_stamped(path: str) -> dict[str, Any]:
    """The JSON object of ``path`` written with ``_stamped``; a DamagedError if it is unreadable
    or its content no longer matches its digest."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise DamagedError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise DamagedError(f"{path} is not a JSON object")
    body = {k: v for k, v in data.items() if k != "digest"}
    if "digest" in data and data["digest"] != provenance.text_digest(body):
        raise DamagedError(f"{path} has other content than when it was written (its digest does not match)")
    return data


def _all_gather(value: Any) -> list[Any]:
    """``value`` of every rank (one process: ``[value]``)."""
    import torch.distributed as dist

    if world_size() == 1 or not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


_WARNED: set[str] = set()


def _warn_once(text: str) -> None:
    if text not in _WARNED and rank() == 0:
        _WARNED.add(text)
        print(f"spin-kernels: warning: {text}", file=sys.stderr)


# -- the index -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointEntry:
    """A complete checkpoint as its index names it: ``path`` holds the states after ``step``;
    ``files`` the size and digest of each of its files; ``tokenizer`` the tokenizer's digest."""

    step: int
    path: str
    training_key: str | None
    num_steps: int | None
    world_size: int
    files: dict[str, dict[str, Any]] | None = None
    tokenizer: str | None = None


def latest_checkpoint(root: str) -> CheckpointEntry | None:
    """The checkpoint that ``root/index.json`` names; None without an index. An index that is
    unreadable, changed since it was written or of an older format raises DamagedError (its
    files are checked by ``Checkpointer.load``: ``damaged_files``)."""
    index = os.path.join(root, INDEX_FILE)
    if not os.path.exists(index):
        return None
    data = _read_stamped(index)
    if data.get("format") == "spin_kernels.checkpoint/1":
        raise OlderFormatError(f"{index} names a checkpoint of an earlier version (format "
                               f"'spin_kernels.checkpoint/1', without digests of its files), which cannot be resumed")
    if data.get("format") != _FORMAT:
        raise DamagedError(f"{index} is of format {data.get('format')!r}, not {_FORMAT!r}")
    try:
        entry = CheckpointEntry(int(data["step"]), os.path.join(root, data["dir"]), data.get("training_key"),
                                data.get("num_steps"), int(data["world_size"]), dict(data["files"]),
                                data.get("tokenizer"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DamagedError(f"{index} is not a checkpoint index ({type(exc).__name__}: {exc})") from exc
    return entry


def _write_index(root: str, entry: CheckpointEntry) -> None:
    data = _stamped({"format": _FORMAT, "step": entry.step, "dir": os.path.basename(entry.path),
                     "training_key": entry.training_key, "num_steps": entry.num_steps,
                     "world_size": entry.world_size, "tokenizer": entry.tokenizer, "files": entry.files})
    tmp = os.path.join(root, f".{INDEX_FILE}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, INDEX_FILE))
    fsync_dir(root)


def _old_format_checkpoints(root: str) -> list[str]:
    """Step checkpoints of an earlier version in ``root`` (Hugging Face directories with a
    trainer_state.pt, no index): they cannot be resumed."""
    if not os.path.isdir(root) or os.path.exists(os.path.join(root, INDEX_FILE)):
        return []
    return sorted(n for n in os.listdir(root) if n.startswith("step-")
                  and os.path.exists(os.path.join(root, n, "trainer_state.pt")))


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
    warning) or refused (``"error"``), and so is a damaged one. ``num_steps``: the schedule's
    length; a checkpoint of another schedule is refused. ``save_every``: save after every that
    many steps (0: never). ``tokenizer``: the tokenizer's digest
    (spin_kernels.training.provenance.tokenizer_digest), recorded with every checkpoint and the
    final model.
    """

    def __init__(self, states: dict[str, Stateful], out_dir: str, *, key: str | None = None,
                 num_steps: int | None = None, save_every: int = 1, on_stale: str = "regenerate",
                 tokenizer: str | None = None):
        self.train_state = TrainState(num_steps=num_steps or 0)
        self.states = {**states, "train_state": self.train_state}
        self.root = os.path.join(out_dir, "checkpoints")
        self.model_dir = os.path.join(out_dir, "model")
        self.key, self.num_steps, self.save_every, self.on_stale = key, num_steps, save_every, on_stale
        self.tokenizer = tokenizer

    @staticmethod
    def finished(out_dir: str, key: str, *, on_stale: str = "regenerate") -> bool:
        """Whether ``out_dir`` holds a final model trained from the inputs of ``key`` whose files
        are all as they were written (each read again). A damaged one is not finished: with a
        warning naming the file (``on_stale="regenerate"``: it is trained again), or a ConfigError
        naming it and what to delete (``"error"``)."""
        model_dir = os.path.join(out_dir, "model")
        if not os.path.isdir(model_dir):
            return False
        try:
            info = _read_stamped(os.path.join(model_dir, INFO_FILE))
            if info.get("training_key") != key:
                return False
            if not isinstance(info.get("files"), dict) or "digest" not in info:
                raise DamagedError(f"{os.path.join(model_dir, INFO_FILE)} records no digests of the model's files")
            problems = damaged_files(model_dir, info["files"], extra_ok=(INFO_FILE,))
            if problems:
                raise DamagedError("; ".join(problems))
        except DamagedError as exc:
            if on_stale == "error":
                raise ConfigError(f"{exc}: the final model {model_dir} cannot be used; delete {model_dir} to train it "
                                  f"again from its pairs, or rerun with --on-stale regenerate") from None
            _warn_once(f"{exc}: the final model {model_dir} is not used; its training runs again from the start and "
                       f"replaces it")
            return False
        return True

    def latest(self) -> CheckpointEntry | None:
        """The latest complete step checkpoint of ``out_dir`` (whatever its inputs); DamagedError
        when its index is damaged."""
        return latest_checkpoint(self.root)

    def load(self) -> int:
        """Continue the latest checkpoint of this run (every state) and return its step; 0 when
        there is none or it was discarded as stale or damaged."""
        try:
            found = self.latest()
        except OlderFormatError as exc:
            return self._discard(str(exc), damaged=False, refuse=False)
        except DamagedError as exc:
            return self._discard(str(exc), damaged=True)
        if found is None:
            old = _old_format_checkpoints(self.root)
            if old:
                return self._discard(f"{self.root} holds step checkpoints of an earlier version ({', '.join(old)}: "
                                     f"Hugging Face directories with a trainer_state.pt, no index), which cannot be "
                                     f"resumed", damaged=False, refuse=False)
            return 0
        if self.key is not None and found.training_key != self.key:
            return self._discard(f"{found.path} was trained from other inputs (examples, reference log-probs, "
                                 f"training options, starting weights or tokenizer) than this run", damaged=False)
        if self.num_steps is not None and found.num_steps != self.num_steps:
            raise RuntimeError(f"cannot resume from {found.path}: it planned {found.num_steps} steps, this run "
                               f"{self.num_steps} (data or batch settings changed)")
        problems = self._check_files(found)
        if problems:
            return self._discard("; ".join(problems), damaged=True)
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

    @staticmethod
    def _check_files(found: CheckpointEntry) -> list[str]:
        """Every file of ``found`` read again and compared with the index (each rank its share;
        every rank gets the whole list)."""
        files = found.files or {}
        mine = damaged_files(found.path, files, only=sorted(files)[rank()::world_size()])
        if rank() == 0:
            mine += [f"{os.path.join(found.path, n)} was not there when it was written"
                     for n in sorted(set(_names(found.path)) - set(files))]
        return [p for part in _all_gather(mine) for p in part]

    def _discard(self, problem: str, *, damaged: bool, refuse: bool = True) -> int:
        """Do without the checkpoints of ``self.root``: removed, with a warning (training starts
        from step 0, the last good state), or refused with ``on_stale="error"`` (``refuse``)."""
        what = "is damaged" if damaged else "cannot be resumed"
        if refuse and self.on_stale == "error":
            raise ConfigError(f"--resume: {problem}; the checkpoint {what}: delete {self.root} to train from the start, "
                              f"or rerun with --on-stale regenerate")
        barrier()  # every rank has read the index before rank 0 removes it
        if rank() == 0:
            print(f"spin-kernels: warning: {problem}; {'the checkpoint is not used and ' if damaged else ''}training "
                  f"starts over from step 0 (discarded: {self.root})", file=sys.stderr)
            _remove_all_but(self.root, None)
        barrier()
        return 0

    def save(self, step: int) -> None:
        """After optimizer step ``step``: a checkpoint every ``save_every`` steps (not after the
        last one: ``export`` writes the final model); each file's digest goes into the index, and
        the previous checkpoint is removed once the index names the new one. A collective under
        FSDP (each rank hashes its share of the files)."""
        if not self.save_every or step % self.save_every or (self.num_steps is not None and step >= self.num_steps):
            return
        path = os.path.join(self.root, f"step-{step}")
        if rank() == 0:
            shutil.rmtree(path, ignore_errors=True)  # a save of this step killed before the index named it
        barrier()
        self.train_state.step = step
        save_states(self.states, path)
        barrier()  # every rank's files and the metadata are there
        mine = _names(path)[rank()::world_size()]
        parts = _all_gather({n: {"size": os.path.getsize(os.path.join(path, n)),
                                 "digest": provenance.file_digest(os.path.join(path, n))} for n in mine})
        if rank() == 0:
            files = dict(sorted((k, v) for part in parts for k, v in part.items()))
            _write_index(self.root, CheckpointEntry(step, path, self.key, self.num_steps, world_size(), files,
                                                    self.tokenizer))
            _remove_all_but(self.root, os.path.basename(path))
        barrier()

    def export(self, runner, tokenizer, info: dict[str, Any]) -> str:
        """Write the final model of ``runner`` (one Hugging Face directory, gathered on rank 0 under
        FSDP; LoRA: the adapters merged in, and the adapter beside them) with ``info``, the training
        key, the tokenizer's digest and the size and digest of every file in its spin_info.json;
        remove the step checkpoints. A collective; every rank returns after the model exists (the
        next iteration loads it)."""
        from spin_kernels.distributed import full_state_dict

        from .lora import ADAPTER_DIR, export_target, full_precision_state, is_lora, merged_state_dict
        from .parallel import is_sharded

        model = inner_model(runner)
        full = full_state_dict(runner) if is_sharded(runner) else None  # a collective: the weights on rank 0
        if rank() == 0:
            info = {**info, "training_key": self.key, "tokenizer": self.tokenizer}
            if is_lora(model):  # the adapter merged into a full checkpoint (the next opponent), and beside it
                full = full if full is not None else full_precision_state(model)
                adapter = model.peft_config["default"]
                merged = merged_state_dict(full, adapter.lora_alpha / adapter.r)

                def finish(tmp: str) -> None:
                    model.save_pretrained(os.path.join(tmp, ADAPTER_DIR), state_dict=full)
                    _write_info(tmp, info)

                save_model_dir(export_target(model), tokenizer, self.model_dir, state_dict=merged, also=finish)
            else:
                save_model_dir(model, tokenizer, self.model_dir, state_dict=full,
                               also=lambda tmp: _write_info(tmp, info))
            _remove_all_but(self.root, None)
        barrier()
        return self.model_dir


def _write_info(model_dir: str, info: dict[str, Any]) -> None:
    """spin_info.json: ``info`` with the size and digest of every other file of ``model_dir``
    (written last, once they are all there), and the digest of its own content."""
    data = _stamped({**info, "files": record_files(model_dir, skip=(INFO_FILE,))})
    with open(os.path.join(model_dir, INFO_FILE), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def trained_model_key(out_dir: str) -> str | None:
    """The training key recorded with the final model of ``out_dir`` (None if there is none)."""
    model_dir = os.path.join(out_dir, "model")
    return read_info(model_dir).get("training_key") if os.path.isdir(model_dir) else None
