"""The stages of a SPIN iteration, each as a plan and a run.

Every stage module (``generate``, ``reference``, ``train``, ``evaluate``) has the same two
functions:

* ``plan(cfg, inputs..., ...) -> Plan``: what the stage would read and make, checked against what
  its output already holds, without loading a model. A ``Plan`` says what it reads (``reads``),
  the provenance key of its output (``key``: spin_kernels.training.provenance), whether that
  output is complete and made from these inputs (``current``), what is left (``left``) and,
  when current, the output itself (``output``).
* ``run(plan, loader, models=None)``: does what is left and returns the output (the plan's own
  ``output`` when it is current). ``models`` is the model the stages of one iteration share
  (``Models``); a single stage gets its own.

So an iteration is current when ``all(p.current for p in plans)`` (spin_kernels.training.loop
wires the stages once), and the CLI's single-stage commands are "plan one stage, run it"
(spin_kernels.training.commands). What a stage is made from is named in its ``plan`` only: a new
input of a stage is added there, and both the check and the run see it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

from ..config import SpinConfig
from ..data import Record


class Plan(Protocol):
    """What a stage reads and makes; see the module docstring."""

    stage: str
    reads: list[str]
    key: str | None
    current: bool
    left: str
    output: Any


class Pending:
    """The plan of a stage whose input another stage has still to make (planned alone, it
    cannot be current)."""

    reads: list[str] = []
    key = None
    current = False
    output = None

    def __init__(self, stage: str, waits_for: str = "an earlier stage"):
        self.stage, self.waits_for = stage, waits_for

    @property
    def left(self) -> str:
        return f"everything (waits for {self.waits_for})"


class Models:
    """The one model the stages of an iteration share, loaded on first use.

    ``runner(path)`` loads the model directory ``path`` (``Loader.runner``) unless it is the one
    held, releasing the one held first; ``prepared=True`` switches it to packed batches for the
    reference pass, training and evaluation (``Loader.prepared``, once). Training updates the
    model in place: ``now_holds(path)`` records that the model held is now the one saved at
    ``path`` (the held-out evaluation then scores it without a reload).
    """

    def __init__(self, loader):
        self.loader = loader
        self._path: str | None = None
        self._runner = None
        self._prepared = False

    def runner(self, path: str, *, prepared: bool = False):
        if self._path != os.path.realpath(path):
            self._runner = None  # released before the next one loads
            self._runner, self._path, self._prepared = self.loader.runner(path), os.path.realpath(path), False
        if prepared and not self._prepared:
            self._runner, self._prepared = self.loader.prepared(self._runner), True
        return self._runner

    def now_holds(self, path: str) -> None:
        self._path = os.path.realpath(path)


def model_label(cfg: SpinConfig, model_path: str) -> str | None:
    """``iter{t}/model`` for a model of this run (its rows then read the same wherever the run
    directory is), None (the path itself) for any other model."""
    run = os.path.realpath(cfg.loop.output_dir)
    full = os.path.realpath(model_path)
    return os.path.relpath(full, run) if full.startswith(run + os.sep) else None


def describe_pairs(pairs: list[Record], path: str) -> Callable[[list[int]], str]:
    """Names training examples (positions in ``pairs``) by the file's lines and the data rows."""
    def describe(positions: list[int]) -> str:
        lines = [p + 1 for p in positions[:10]]
        data = [pairs[p].get("index") for p in positions[:10]]
        more = f" and {len(positions) - 10} more" if len(positions) > 10 else ""
        return f"pairs at {path} lines {lines}{more} (data rows {data})"

    return describe


__all__ = ["Models", "Pending", "Plan", "describe_pairs", "model_label"]
