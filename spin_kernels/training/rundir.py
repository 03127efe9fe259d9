"""A run directory and the checks before writing it.

Layout of ``loop.output_dir`` (``IterationFiles``)::

    config.yaml                 the configuration the run started with
    iter{t}/generated.jsonl     (1) the opponent's synthetic responses, appended batch by batch
    iter{t}/pairs.jsonl         (2) the training pairs with the opponent's ref_logps
    iter{t}/metrics.jsonl, metrics.png, checkpoints/, model/   (3) training; model/ is (4),
                                the next opponent
    iter{t}/heldout_*.json[l]   held-out samples, pairs and evaluation (with --eval-*)
    summary.json, summary.md    one row per finished iteration

Before anything is written: the output is a writable directory (or file), one process holds
the run's lock (``single_writer``), and a run is resumed only with ``--resume`` and the
configuration it started with (``check_run_dir``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

from .config import ConfigError, SpinConfig, config_from_dict, save_config
from .parallel import Session, barrier, is_main
from .runlock import RunLock

LOCK_FILE = ".spin-kernels.lock"


class IterationFiles:
    """The paths of iteration t's files in ``run_dir``."""

    def __init__(self, run_dir: str, t: int):
        self.dir = os.path.join(run_dir, f"iter{t}")
        self.generated = os.path.join(self.dir, "generated.jsonl")
        self.pairs = os.path.join(self.dir, "pairs.jsonl")
        self.model = os.path.join(self.dir, "model")
        self.metrics = os.path.join(self.dir, "metrics.jsonl")
        self.heldout_generated = os.path.join(self.dir, "heldout_generated.jsonl")
        self.heldout_pairs = os.path.join(self.dir, "heldout_pairs.jsonl")
        self.heldout_eval = os.path.join(self.dir, "heldout_eval.json")
        self.eval_command = os.path.join(self.dir, "eval_command.json")


def iteration_model_dir(run_dir: str, t: int) -> str:
    return IterationFiles(run_dir, t).model


def check_output_dir(path: str, what: str = "loop.output_dir") -> str:
    """Create ``path`` if needed; refuse a file or a directory this process cannot write."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{what}: {path!r} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot create {path!r} ({exc.strerror})") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: {path!r} is not writable")
    return path


def check_output_file(path: str, what: str = "--output", inputs: dict[str, str | None] | None = None) -> str:
    """The parent of ``path`` is created and writable, ``path`` is not a directory, and it is not
    one of the command's ``inputs`` ({flag: path}): the same file, a symbolic link to it or a
    hard link of it would be overwritten while it is read."""
    if os.path.isdir(path):
        raise ConfigError(f"{what}: {path!r} is a directory; give a file name")
    for flag, source in (inputs or {}).items():
        if source and os.path.isfile(source) and os.path.exists(path) and os.path.samefile(path, source):
            how = ("is" if os.path.abspath(path) == os.path.abspath(source) else "is a symbolic link to"
                   if os.path.realpath(path) == os.path.realpath(source) else "is a hard link of")
            raise ConfigError(f"{what}: {path!r} {how} the input file {flag} {source!r}; writing it would overwrite "
                              f"the input: give another output file")
    check_output_dir(os.path.dirname(os.path.abspath(path)), what)
    return path


@contextlib.contextmanager
def single_writer(lock_path: str, what: str, sess: Session) -> Iterator[None]:
    """Rank 0 holds ``RunLock(lock_path)`` for the block; every rank raises alike if it cannot."""
    from spin_kernels.distributed.env import all_reduce_sum

    lock, error = None, None
    if is_main():
        try:
            lock = RunLock(lock_path, what=what).acquire()
        except ConfigError as exc:
            error = exc
    (failed,) = all_reduce_sum([float(error is not None)], sess.device)
    if error is not None:
        raise error
    if failed:
        raise ConfigError(f"{what}: rank 0 could not lock {os.path.dirname(lock_path)!r} (in use by another run)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


#: Fields that name files: compared as resolved paths, so ``run/`` and ``/abs/run`` are one run.
_PATH_FIELDS = (("model", "model"), ("model", "tokenizer"), ("data", "data"))
#: Fields that may change between an interrupted run and its continuation without changing results.
_FREE_FIELDS = {("loop", "resume"), ("loop", "iterations"), ("loop", "tensorboard"), ("loop", "output_dir"),
                ("model", "device"), ("data", "on_stale"), ("training", "save_every"), ("training", "log_every"),
                ("loop", "stop_below_accuracy"), ("loop", "eval_command"),
                ("distributed", "fsdp"), ("distributed", "cpu_offload"), ("distributed", "reshard_after_forward")}


def _comparable(cfg: dict[str, dict[str, Any]], base: str) -> dict[str, dict[str, Any]]:
    out = {s: dict(v) for s, v in cfg.items()}
    for sec, key in _PATH_FIELDS:
        value = out.get(sec, {}).get(key)
        if isinstance(value, str) and value:
            full = value if os.path.isabs(value) else os.path.join(base, value)
            if os.path.exists(full):
                out[sec][key] = os.path.realpath(full)
    return out


def run_has_work(run_dir: str) -> bool:
    """Whether a run directory holds the output of any stage (beyond its config and lock)."""
    if not os.path.isdir(run_dir):
        return False
    for name in os.listdir(run_dir):
        it = os.path.join(run_dir, name)
        if not (name.startswith("iter") and os.path.isdir(it)):
            continue
        for entry in os.listdir(it):
            path = os.path.join(it, entry)
            if os.path.isdir(path) or os.path.getsize(path) > 0:
                return True
    return False


def _saved_config(path: str) -> SpinConfig:
    """A run's config.yaml. One written before per-example seeds were the default says
    ``generation_seeding: auto``: batch seeds for hf (its default backend then), per-example
    seeds for the others."""
    import yaml

    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    gen = raw.get("generation") if isinstance(raw, dict) else None
    if isinstance(gen, dict) and gen.get("generation_seeding") == "auto":
        gen["generation_seeding"] = "batch" if gen.get("backend", "hf") == "hf" else "example"
    return config_from_dict(raw)


def check_run_dir(cfg: SpinConfig) -> None:
    """Refuse to overwrite a run / to resume one with another configuration; record the config.

    A run whose directory holds a config but no stage output (it stopped before doing any work,
    e.g. on bad data) is simply started again with the new configuration. Generation options are
    compared as in force on this device (``stages.generate.options_in_force``: an unset backend is
    the one its seeding implies, an unset slot count the device's), so a run started with the
    original sampler continues under ``--generation-seeding batch``. Every rank checks (so all
    raise alike) before rank 0 writes.
    """
    run_dir = cfg.loop.output_dir
    saved = os.path.join(run_dir, "config.yaml")
    started = os.path.exists(saved) and run_has_work(run_dir)
    barrier()
    if started:
        if not cfg.loop.resume:
            raise ConfigError(f"loop.output_dir: {run_dir!r} already holds a run; pass --resume to continue it "
                              f"or choose another --output-dir")
        from .stages.generate import options_in_force

        saved_cfg = _saved_config(saved)
        start = cfg.model.model
        old = dataclasses.replace(saved_cfg, generation=options_in_force(
            dataclasses.replace(cfg, generation=saved_cfg.generation), start))
        new = dataclasses.replace(cfg, generation=options_in_force(cfg, start))
        old, new = _comparable(old.to_dict(), os.getcwd()), _comparable(new.to_dict(), os.getcwd())
        diff = [f"{s}.{k}" for s in new for k in new[s] if (s, k) not in _FREE_FIELDS and new[s][k] != old[s][k]]
        if diff:
            shown = ", ".join(f"{d} ({old[d.split('.')[0]][d.split('.')[1]]!r} -> "
                              f"{new[d.split('.')[0]][d.split('.')[1]]!r})" for d in diff)
            hint = ""
            if old["generation"]["generation_seeding"] == "batch" != new["generation"]["generation_seeding"]:
                hint = ("; the run samples with the original sampler (batch seeds), no longer the default: pass "
                        "--generation-seeding batch to continue it")
            raise ConfigError(f"--resume: the configuration differs from the run's config.yaml in {shown}{hint}")
    elif is_main():
        save_config(cfg, saved)
    barrier()
