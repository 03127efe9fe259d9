"""The ``reference`` stage: the opponent's log-probs of each pair's real and synthetic response
(``ref_logps``), with the ``reference`` record of how they were computed, written atomically.
A pairs file is reused only when it holds exactly these rows scored as this run would score
them (spin_kernels.training.provenance.reference_source)."""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from .. import provenance
from ..config import ConfigError, SpinConfig
from ..data import Record, check_row_ref_logps, read_jsonl, write_jsonl_atomic
from ..parallel import barrier, is_main
from ..reference import check_token_budget, reference_logps_for, to_examples
from . import Models, describe_pairs, model_label


@dataclasses.dataclass
class ReferencePlan:
    """Scoring ``rows`` with ``model_path`` into ``out_path``.

    ``sources``: the ``reference`` record each row's pair must carry; ``pairs``: the file's
    pairs when they are exactly these (``current``), else None.
    """

    cfg: SpinConfig
    rows: list[Record]
    out_path: str
    model_path: str
    sources: list[dict[str, Any]]
    pairs: list[Record] | None
    tokenizer: Any = None
    desc: str = "reference"
    stage = "reference"

    @property
    def current(self) -> bool:
        return self.pairs is not None

    @property
    def output(self) -> list[Record] | None:
        return self.pairs

    @property
    def key(self) -> str:
        return provenance.text_digest([{**s, "model": s["model"]["digest"]} for s in self.sources])

    @property
    def reads(self) -> list[str]:
        return [self.model_path, self.out_path]

    @property
    def left(self) -> str:
        return "" if self.current else f"score {len(self.rows)} pair(s) with {self.model_path}"


def reference_sources(rows: list[Record], model_path: str, cfg: SpinConfig, tokenizer=None) -> list[dict[str, Any]]:
    """The ``reference`` record each pairs row scored by ``model_path`` (tokenised by ``tokenizer``)
    must carry."""
    stamp = provenance.model_stamp(model_path, model_label(cfg, model_path))
    tok = provenance.tokenizer_digest(tokenizer)
    return [provenance.reference_source(r, stamp, cfg.data, cfg.training.average_log_prob, tok) for r in rows]


def current_pairs(path: str, rows: list[Record], sources: list[dict[str, Any]], on_stale: str) -> list[Record] | None:
    """The pairs of ``path`` if they are exactly ``rows`` scored as ``sources`` say, else None
    (with a warning), or a ConfigError with ``on_stale="error"``. No file: None."""
    if not os.path.exists(path):
        return None
    bad: list[tuple[int, str]] = []
    pairs = list(read_jsonl(path, tolerate_torn_tail=True, bad_lines=bad))
    problem = bad[0][1] if bad else None
    if problem is None and len(pairs) != len(rows):
        problem = f"it holds {len(pairs)} row(s) for {len(rows)} generated row(s)"
    for n, (pair, row, src) in enumerate(zip(pairs, rows, sources)):
        if problem is not None:
            break
        if (why := provenance.row_damage(pair)) is not None:
            problem = f"line {n + 1}: {why}"
        elif not isinstance(pair, dict) or _body(pair, "ref_logps", "reference") != _body(row):
            problem = f"line {n + 1} is not the generated row {row.get('index')} it should score"
        elif (why := provenance.differences(pair.get("reference"), src)) is not None:
            problem = f"line {n + 1}: {why}"
        else:
            try:
                check_row_ref_logps(pair.get("ref_logps"), f"line {n + 1}")
            except ConfigError as exc:
                problem = str(exc)
    if problem is None:
        return pairs
    if on_stale == "error":
        raise ConfigError(f"{path}: cannot be reused: {problem}; remove it or rerun with --on-stale regenerate")
    if is_main():
        print(f"spin-kernels: warning: {path} cannot be reused ({problem}); the reference pass runs again",
              file=sys.stderr)
    return None


def _body(row: Record, *without: str) -> Record:
    """The fields of a row but its digest and ``without``."""
    return {k: v for k, v in row.items() if k not in (provenance.ROW_DIGEST, *without)}


def plan(cfg: SpinConfig, rows: list[Record], out_path: str, *, model_path: str, tokenizer,
         desc: str = "reference") -> ReferencePlan:
    """Whether ``out_path`` holds ``rows`` scored by ``model_path`` and tokenised by ``tokenizer``
    under this run's lengths and averaging (a stale file: a warning, or a ConfigError with
    ``--on-stale error``)."""
    sources = reference_sources(rows, model_path, cfg, tokenizer)
    return ReferencePlan(cfg, rows, out_path, model_path, sources,
                         current_pairs(out_path, rows, sources, cfg.data.on_stale), tokenizer, desc)


def run(plan: ReferencePlan, loader, models: Models | None = None) -> list[Record]:
    """Rows with ``ref_logps = [log p(real), log p(synthetic)]`` under the model (prepared, loaded
    from ``plan.model_path``) and their ``reference`` record, written atomically to the plan's
    file; a current plan's pairs as they are."""
    if plan.current:
        return plan.pairs
    cfg, t = plan.cfg, plan.cfg.training
    model = (models or Models(loader)).runner(plan.model_path, prepared=True)
    examples = to_examples(plan.tokenizer or loader.tokenizer(plan.model_path), plan.rows, cfg.data)
    check_token_budget(examples, t.token_budget, t.share_prompt, describe_pairs(plan.rows, plan.out_path))
    refs = reference_logps_for(model, examples, token_budget=t.token_budget, impl=t.impl, average=t.average_log_prob,
                               share_prompt=t.share_prompt, autocast=loader.autocast, desc=plan.desc)
    out = [provenance.with_row_digest({**_body(row), "ref_logps": list(ref), "reference": src})
           for row, ref, src in zip(plan.rows, refs, plan.sources)]
    bad = [(i, ref) for i, ref in enumerate(refs) if not all(map(_finite, ref))]
    if bad:
        raise ConfigError(f"{plan.desc}: the model {plan.model_path!r} gives non-finite log-probs for {len(bad)} "
                          f"row(s), e.g. row {bad[0][0]} (index {plan.rows[bad[0][0]].get('index')}): {bad[0][1]}; "
                          f"its weights are finite, so its activations overflow in --dtype {cfg.model.dtype}")
    if is_main():
        write_jsonl_atomic(plan.out_path, out)
    barrier()
    return out


def _finite(v: float) -> bool:
    return v == v and v not in (float("inf"), float("-inf"))
