"""What every row of a run's files was made from, so that no stale row is ever reused.

A SPIN run reuses its own files when it resumes (and ``generate --output`` appends to an
existing file). Matching rows by ``index`` alone reuses rows made from another data file,
another opponent, other sampling settings or other length limits. So every row carries its
*source*, and a row is reused only if its source equals the one the current run would write:

* ``generate`` rows: ``source = {example, opponent, sampling, max_prompt_length}``:
  ``example`` a digest of the prompt and the real response, ``opponent`` the model it was
  sampled with (``{path, digest}``: the path is for people, the digest of its weights is what
  is compared), ``sampling`` the settings that decide the sample (temperature, top_p,
  max_new_tokens, the seed, how prompts are batched and seeded, the backend:
  ``sampling_settings``).
* ``reference`` rows (``pairs.jsonl``): ``reference = {pair, model, max_length,
  max_prompt_length, average_log_prob}``: ``pair`` a digest of prompt, real and synthetic
  response, ``model`` the scoring model as above, and the settings the log-probs depend on.
* a trained model (``spin_info.json``) and its resumable checkpoints: ``training_key``, a
  digest of the tokenised pairs with their reference log-probs, the training settings and the
  starting weights (``spin_kernels.training.trainer``).

Digests: SHA-256 of canonical JSON for text (short: 128 bits as hex), xxh3-128 over the bytes
of the ``*.safetensors`` files for weights (GB/s, and cached per file size and mtime, so each
stage hashes a model once).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import xxhash

from .config import DataConfig, SamplingOptions

_WEIGHT_DIGESTS: dict[tuple, str] = {}


def text_digest(*parts: Any) -> str:
    """A 128-bit hex digest of JSON-able ``parts`` (order matters; dict keys do not)."""
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def model_digest(path: str) -> str:
    """``xxh3_128:<hex>`` of the weights of the model directory ``path`` (its ``*.safetensors``
    files, name and bytes, in name order); cached while the files keep their sizes and mtimes."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    stats = tuple((f, os.stat(os.path.join(path, f)).st_size, os.stat(os.path.join(path, f)).st_mtime_ns)
                  for f in files)
    key = (os.path.realpath(path), stats)
    if key not in _WEIGHT_DIGESTS:
        h = xxhash.xxh3_128()
        for f in files:
            h.update(f.encode("utf-8") + b"\0")
            with open(os.path.join(path, f), "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        _WEIGHT_DIGESTS[key] = f"xxh3_128:{h.hexdigest()}"
    return _WEIGHT_DIGESTS[key]


def model_stamp(path: str, label: str | None = None) -> dict[str, str]:
    """``{path, digest}`` of a model directory, as rows record it; ``label`` replaces the path
    shown (the loop names its own models ``iter{t}/model``, so that a run's files do not depend
    on where its directory is)."""
    return {"path": label or path, "digest": model_digest(path)}


def sampling_settings(cfg: SamplingOptions, seed: int) -> dict[str, Any]:
    """The settings that decide a sampled row (``cfg``: the options in force,
    ``samplers.in_force``): the distribution, the seed, how prompts are put into batches (with
    ``batch`` seeding a row's sample depends on its batch; with ``example`` seeding only through
    the rounding of the logits by the batch shape, still recorded so that rows of two batchings
    are never mixed) and the backend.

    The batching options are recorded only when they differ from the original sampler (file
    order, batches of generation_batch_size, batch seeds), so rows written before they existed
    stay current under ``--generation-seeding batch`` (which is that sampler). Rows of the
    default sampler (continuous, sorted, per-example seeds) record all of them: an old run's rows
    are never taken for the new default's."""
    if None in (cfg.backend, cfg.generation_order, cfg.generation_batch_size):
        raise ValueError("sampling_settings: options not in force; set them with samplers.in_force")
    settings = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                "seed": seed, "batch_size": cfg.generation_batch_size, "backend": cfg.backend}
    if cfg.generation_order != "input":
        settings["order"] = cfg.generation_order
    if cfg.generation_token_budget:
        settings["token_budget"] = cfg.generation_token_budget
    if cfg.generation_seeding != "batch":
        settings["seeding"] = cfg.generation_seeding
    if cfg.backend != "hf":
        settings["chunk_size"] = cfg.chunk_size()
    return settings


def generation_source(record: dict[str, Any], opponent: dict[str, str], sampling: dict[str, Any],
                      max_prompt_length: int) -> dict[str, Any]:
    """The ``source`` a generated row for ``record`` ({prompt, real, ...}) must carry."""
    return {"example": text_digest(record["prompt"], record["real"]), "opponent": opponent, "sampling": sampling,
            "max_prompt_length": max_prompt_length}


def reference_source(row: dict[str, Any], model: dict[str, str], data: DataConfig,
                     average_log_prob: bool) -> dict[str, Any]:
    """The ``reference`` a pairs row (``row`` with prompt, real, synthetic) must carry."""
    return {"pair": text_digest(row["prompt"], row["real"], row["synthetic"]), "model": model,
            "max_length": data.max_length, "max_prompt_length": data.max_prompt_length,
            "average_log_prob": average_log_prob}


def _model_key(stamp: Any) -> Any:
    return stamp.get("digest") if isinstance(stamp, dict) else stamp


def differences(have: Any, want: dict[str, Any]) -> str | None:
    """Why a row's recorded source ``have`` is not ``want`` (a short phrase), or None if equal.

    Models are compared by the digest of their weights only, so a moved or renamed model
    directory does not make rows stale.
    """
    if not isinstance(have, dict):
        return "it records no source (written by another tool or an older version)"
    for key, value in want.items():
        got = have.get(key)
        if isinstance(value, dict) and "digest" in value:
            if _model_key(got) != value["digest"]:
                where = got.get("path") if isinstance(got, dict) else got
                return f"{key} was another model ({where!r}, weights {_model_key(got)}) than {value['path']!r}"
        elif got != value:
            if key in ("example", "pair"):
                return "its prompt/response text differs from the input's"
            return f"{key} was {got!r}, not {value!r}"
    return None


def examples_digest(examples: list) -> str:
    """``xxh3_128:<hex>`` of tokenised SPIN examples: their token ids and reference log-probs,
    in order (what a training run consumes)."""
    from array import array

    h = xxhash.xxh3_128()
    for ex in examples:
        for ids in (ex.prompt_ids, ex.real_ids, ex.synthetic_ids):
            h.update(len(ids).to_bytes(8, "little"))
            h.update(array("q", ids).tobytes())
        h.update(array("d", ex.ref_logps if ex.ref_logps is not None else (float("nan"),) * 2).tobytes())
    return f"xxh3_128:{h.hexdigest()}"


#: Training options that do not change the trained weights (where and how often to write).
_NOT_IN_KEY = ("save_every", "log_every")


def training_key(examples: list, cfg: Any, start: str | None) -> str:
    """What a training run is made from: its examples, its options (``TrainingConfig``) and the
    digest of its starting weights. Checkpoints and the final model record it; a resume with
    another key does not continue them."""
    import dataclasses

    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IN_KEY}
    return text_digest(examples_digest(examples), options, start)
