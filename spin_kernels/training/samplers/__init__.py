"""The samplers of the generation stage: one ``Sampler`` protocol, chosen once per stage.

As ``spin_kernels.ops.backends`` chooses a kernel backend from ``impl``, ``choose(cfg)`` picks
the sampler of ``generation.backend`` and the seeding in force (``cfg.seeding()``) from a
registry; the batch loop (spin_kernels.training.generation) only calls ``sample`` on it:

==================  =====================  =================================================
backend, seeding    class                  what samples a batch
==================  =====================  =================================================
hf, batch           ``HfSampler``          ``model.generate`` on a left-padded batch, the
                                           global RNG seeded per batch (the original scheme)
hf, example         ``HfExampleSampler``   the same, one random stream per prompt (what makes
                                           sorted and token-budgeted batches sample like
                                           plain ones)
continuous, example ``ContinuousSampler``  continuous batching (spin_kernels.models.decoding)
vllm, example       ``VllmSampler``        one vLLM engine for the stage (import-guarded)
==================  =====================  =================================================

Every sampler class also says how prompts are cut into batches (``static_batches``: a batch is
decoded together, so the prompt count and the token budget cut it; else chunks of
``generation_chunk_size`` prompts, the unit written and resumed), whether it samples with the
stage's model (``uses_model``; vLLM loads its own engine) and whether it can run on several
ranks (``one_process``: the one rule on processes, ``check_processes``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from ..config import ConfigError
from ..config import SamplingOptions
from ..data import Record


class Sampler(Protocol):
    """Samples one response per prompt of a batch.

    Built as ``cls(model, tokenizer, cfg, seed=..., model_path=...)`` once per stage (only when
    something is left to sample); ``sample(number, records, prompt_ids)`` returns
    ``[{synthetic: str, synthetic_tokens: int, finished: bool}]`` for batch ``number`` of the
    stage (its records and their prompt token ids), in order; ``close()`` releases what the
    sampler holds before training needs the memory.
    """

    static_batches: ClassVar[bool]
    uses_model: ClassVar[bool]
    one_process: ClassVar[bool]

    def sample(self, number: int, records: list[Record], prompt_ids: list[list[int]]) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


def example_seeds(seed: int, records: list[Record]) -> list[int]:
    """One seed per record, from (seed, its index): the ``example`` seeding."""
    from spin_kernels.models.decoding import example_seed

    return [example_seed(seed, r["index"]) for r in records]


def response_rows(tokenizer, samples: list[tuple[list[int], bool]]) -> list[dict[str, Any]]:
    """``[(tokens, finished)]`` -> the rows a sampler returns (text decoded without special tokens)."""
    return [{"synthetic": tokenizer.decode(tokens, skip_special_tokens=True), "synthetic_tokens": len(tokens),
             "finished": finished} for tokens, finished in samples]


class ModelSampler:
    """The base of the samplers that sample with the stage's model (in this process, sharded or
    not): they keep the model, the tokenizer, the options and the stage's seed."""

    static_batches: ClassVar[bool] = True
    uses_model: ClassVar[bool] = True
    one_process: ClassVar[bool] = False

    def __init__(self, model, tokenizer, cfg: SamplingOptions, *, seed: int, model_path: str | None = None):
        self.model, self.tokenizer, self.cfg, self.seed = model, tokenizer, cfg, seed

    def close(self) -> None:
        pass


_SAMPLERS: dict[tuple[str, str], type] = {}


def register_sampler(backend: str, seeding: str, cls: type) -> None:
    """Make ``cls`` (a ``Sampler``) the sampler of ``generation.backend=backend`` under ``seeding``."""
    _SAMPLERS[(backend, seeding)] = cls


def choose(cfg: SamplingOptions) -> type[Sampler]:
    """The sampler class of these settings (backend and the seeding in force)."""
    key = (cfg.backend, cfg.seeding())
    if key not in _SAMPLERS:
        raise ConfigError(f"generation.backend: no sampler for backend {cfg.backend!r} with {cfg.seeding()!r} "
                          f"seeding (have {sorted(_SAMPLERS)})")
    return _SAMPLERS[key]


def check_processes(cfg: SamplingOptions, *, sharded: bool) -> None:
    """The one rule on processes: a sampler with its own engine (vLLM) runs in one unsharded
    process; ``sharded`` is whether this run shards the model over ranks (FSDP)."""
    if sharded and choose(cfg).one_process:
        raise ConfigError(f"generation.backend: {cfg.backend!r} runs in one process; use 'hf' or 'continuous' with "
                          f"FSDP (several ranks)")


def _register_builtin() -> None:
    from .continuous import ContinuousSampler
    from .hf import HfExampleSampler, HfSampler
    from .vllm import VllmSampler

    register_sampler("hf", "batch", HfSampler)
    register_sampler("hf", "example", HfExampleSampler)
    register_sampler("continuous", "example", ContinuousSampler)
    register_sampler("vllm", "example", VllmSampler)


_register_builtin()

__all__ = ["ModelSampler", "Sampler", "SamplingOptions", "check_processes", "choose", "example_seeds", "register_sampler",
           "response_rows"]
