"""The ``generate`` stage: the opponent samples a synthetic response per prompt (its plan is a
``GenerationPlan``: spin_kernels.training.generation)."""

from __future__ import annotations

from ..config import SpinConfig
from ..data import Record
from ..generation import GenerationPlan, plan_generation, sample_plan
from ..samplers import SamplingOptions, choose, in_force
from . import Models, model_label

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def plan(cfg: SpinConfig, records: list[Record], out_path: str, *, model_path: str, seed: int, tokenizer,
         desc: str = "generate") -> GenerationPlan:
    """What ``out_path`` holds for ``records`` sampled by ``model_path`` with ``cfg.generation``
    (``options_in_force``) and ``seed`` (stale rows are dropped or refused as ``--on-stale`` says)."""
    return plan_generation(records, out_path, options_in_force(cfg, model_path),
                           max_prompt_length=cfg.data.max_prompt_length, model_path=model_path,
                           model_label=model_label(cfg, model_path), seed=seed, on_stale=cfg.data.on_stale,
                           tokenizer=tokenizer, desc=desc)


def options_in_force(cfg: SpinConfig, model_path: str) -> SamplingOptions:
    """``cfg.generation`` with its unset options set for ``cfg.model``'s device and dtype and the
    shape of the model at ``model_path`` (``samplers.in_force``)."""
    from ..parallel import resolve_device

    return in_force(cfg.generation, device=resolve_device(cfg.model.device), model_path=model_path,
                    max_prompt_length=cfg.data.max_prompt_length, dtype_bytes=DTYPE_BYTES[cfg.model.dtype])


def run(plan: GenerationPlan, loader, models: Models | None = None) -> list[Record]:
    """Sample what is left (the opponent is loaded only then, and only for a sampler that uses
    it); the rows of every record, in input order."""
    if plan.current:
        return plan.output
    need = choose(plan.cfg).uses_model
    model = (models or Models(loader)).runner(plan.model_path) if need else None
    return sample_plan(plan, model)
