"""The samplers of the generation stage: one ``Sampler`` protocol, chosen once per stage.

As ``spin_kernels.ops.backends`` chooses a kernel backend from ``impl``, ``choose(cfg)`` picks
the sampler of ``generation.backend`` and ``generation_seeding`` from a registry; the batch loop
(spin_kernels.training.generation) only calls ``sample`` on it. ``in_force(cfg, ...)`` sets
what the options leave unset, once per stage: by default continuous batching with
``device_slots`` slots, prompts sorted by length, per-example seeds:

==================  =====================  =================================================
backend, seeding    class                  what samples a batch
==================  =====================  =================================================
hf, batch           ``HfSampler``          ``model.generate`` on a left-padded batch, the
                                           global RNG seeded per batch (the original sampler)
hf, example         ``HfExampleSampler``   the same, one random stream per prompt (what makes
                                           sorted and token-budgeted batches sample like
                                           plain ones)
continuous, example ``ContinuousSampler``  continuous batching (spin_kernels.models.decoding):
                                           the default
vllm, example       ``VllmSampler``        one vLLM engine for the stage (import-guarded)
==================  =====================  =================================================

Every sampler class also says how prompts are cut into batches (``static_batches``: a batch is
decoded together, so the prompt count and the token budget cut it; else chunks of
``generation_chunk_size`` prompts, the unit written and resumed), whether it samples with the
stage's model (``uses_model``; vLLM loads its own engine) and whether it can run on several
ranks (``one_process``: the one rule on processes, ``check_processes``).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Protocol

from ..config import CPU_SLOTS, CUDA_MAX_SLOTS, ConfigError, SamplingOptions
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
    """The sampler class of these settings (the backend in force and the seeding)."""
    key = (cfg.in_force().backend, cfg.generation_seeding)
    if key not in _SAMPLERS:
        raise ConfigError(f"generation.backend: no sampler for backend {key[0]!r} with {key[1]!r} seeding "
                          f"(have {sorted(_SAMPLERS)})")
    return _SAMPLERS[key]


#: Share of the device's memory (a GPU's, or the host's on CPU) the default slot count may fill
#: with the continuous sampler's key/value cache (the opponent's weights and the step's
#: activations need the rest).
KV_SHARE = 0.25


def device_slots(device, model_config, capacity: int, dtype_bytes: int = 4) -> int:
    """The slot count of continuous batching when ``generation_batch_size`` is unset: as many
    slots as ``KV_SHARE`` of the device's memory holds the slot cache of (keys and values of every
    layer for ``capacity`` tokens at ``dtype_bytes``, from ``model_config``), at most
    ``CPU_SLOTS`` on CPU (64: benchmarks/generation.py, docs/performance.md) and
    ``CUDA_MAX_SLOTS`` on CUDA (256, vLLM's default number of running sequences). A function of
    the device kind, its total memory and the model's shape only, so a resumed run gets the same
    count."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        most, memory = CUDA_MAX_SLOTS, torch.cuda.get_device_properties(device).total_memory
    else:
        most, memory = CPU_SLOTS, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    per_slot = 2 * c.num_hidden_layers * (getattr(c, "num_key_value_heads", None) or heads) * head_dim * capacity \
        * dtype_bytes
    return max(1, min(most, int(KV_SHARE * memory) // per_slot))


def in_force(cfg: SamplingOptions, *, device, model_path: str, max_prompt_length: int,
             dtype_bytes: int = 4) -> SamplingOptions:
    """``cfg`` with every unset option set (``SamplingOptions.in_force``), the slot count from
    ``device_slots`` and the config of the model at ``model_path``."""
    cfg = cfg.in_force()
    if cfg.generation_batch_size is not None:
        return cfg
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    return cfg.in_force(device_slots(device, config, max_prompt_length + cfg.max_new_tokens, dtype_bytes))


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

__all__ = ["ModelSampler", "Sampler", "SamplingOptions", "check_processes", "choose", "device_slots", "example_seeds",
           "in_force", "register_sampler", "response_rows"]
