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
  digest of the tokenised pairs with their reference log-probs, the training settings, the
  starting weights and the tokenizer (``spin_kernels.training.trainer``).

Both kinds of rows also record the tokenizer (``tokenizer_digest``: its vocabulary and
pre-/post-processing, special tokens and chat template), so rows tokenised by another
tokenizer or chat template are never reused, and a digest of all their fields as written
(``row_digest``), so a row changed on disk afterwards is never reused either.

Digests: SHA-256 of canonical JSON for text (short: 128 bits as hex), xxh3-128 over the bytes
of files (``file_digest``; GB/s). A file is hashed once per process while it keeps its inode,
size and mtime (so a model is hashed once when it is written, and its rows' provenance reuses
that); a check of what a run wrote before it is reused (``fresh=True``:
spin_kernels.training.checkpoint) always reads the bytes again, since a damaged file keeps its
size and may keep its mtime.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import xxhash

from .config import DataConfig, SamplingOptions

_FILE_DIGESTS: dict[tuple, str] = {}
_TOKENIZER_DIGESTS: dict[int, tuple[Any, str]] = {}


def text_digest(*parts: Any) -> str:
    """A 128-bit hex digest of JSON-able ``parts`` (order matters; dict keys do not)."""
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def file_digest(path: str, *, fresh: bool = False) -> str:
    """``xxh3_128:<hex>`` of the bytes of the file ``path``. Hashed once per process while the file
    keeps its inode, size and mtime (a directory renamed into place keeps its files' inodes, so a
    model is not hashed again under its final name); ``fresh=True`` reads the bytes again whatever
    the cache holds (the check before a run reuses what it wrote)."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if fresh or key not in _FILE_DIGESTS:
        h = xxhash.xxh3_128()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
        _FILE_DIGESTS[key] = f"xxh3_128:{h.hexdigest()}"
    return _FILE_DIGESTS[key]


def model_digest(path: str, *, fresh: bool = False) -> str:
    """``xxh3_128:<hex>`` of the weights of the model directory ``path``: its ``*.safetensors``
    files, by name and ``file_digest``, in name order."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    listing = json.dumps([[f, file_digest(os.path.join(path, f), fresh=fresh)] for f in files])
    return f"xxh3_128:{xxhash.xxh3_128(listing.encode('utf-8')).hexdigest()}"


def tokenizer_digest(tokenizer: Any) -> str | None:
    """A digest of what decides a tokenizer's token ids and text (None for None): its vocabulary,
    merges, normalizer, pre-/post-processor and added tokens (a fast tokenizer's definition, less
    the padding and truncation settings a call leaves behind; a slow one's vocabulary), its
    special tokens and its chat template. Cached per tokenizer object."""
    if tokenizer is None:
        return None
    held = _TOKENIZER_DIGESTS.get(id(tokenizer))
    if held is not None and held[0] is tokenizer:
        return held[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
    else:
        spec = {"vocab": tokenizer.get_vocab()}
    special = {k: str(v) if not isinstance(v, list) else [str(x) for x in v]
               for k, v in getattr(tokenizer, "special_tokens_map", {}).items()}
    template = getattr(tokenizer, "chat_template", None)
    digest = text_digest(spec, special, template if isinstance(template, (str, dict, type(None))) else str(template),
                         getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "bos_token_id", None))
    _TOKENIZER_DIGESTS[id(tokenizer)] = (tokenizer, digest)
    return digest


#: The field of a written row (generated.jsonl, pairs.jsonl) holding the digest of its other fields.
ROW_DIGEST = "row_digest"


def with_row_digest(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with ``row_digest``: the digest of its other fields, as written, so that a row
    changed on disk afterwards (a flipped byte in a response or a log-prob) is seen when read."""
    body = {k: v for k, v in row.items() if k != ROW_DIGEST}
    return {**body, ROW_DIGEST: text_digest(body)}


def row_damage(row: Any) -> str | None:
    """Why a row read back cannot be trusted (its fields no longer match its ``row_digest``), or
    None (a row without one, e.g. made by another tool, is taken as it is)."""
    if not isinstance(row, dict) or ROW_DIGEST not in row:
        return None
    if row[ROW_DIGEST] != text_digest({k: v for k, v in row.items() if k != ROW_DIGEST}):
        return "it changed after it was written (its row_digest does not match its fields)"
    return None


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
                      max_prompt_length: int, tokenizer: str | None = None) -> dict[str, Any]:
    """The ``source`` a generated row for ``record`` ({prompt, real, ...}) must carry
    (``tokenizer``: the ``tokenizer_digest`` of the tokenizer its prompt was tokenised with)."""
    return {"example": text_digest(record["prompt"], record["real"]), "opponent": opponent, "sampling": sampling,
            "max_prompt_length": max_prompt_length, "tokenizer": tokenizer}


def reference_source(row: dict[str, Any], model: dict[str, str], data: DataConfig,
                     average_log_prob: bool, tokenizer: str | None = None) -> dict[str, Any]:
    """The ``reference`` a pairs row (``row`` with prompt, real, synthetic) must carry
    (``tokenizer``: the ``tokenizer_digest`` of the tokenizer that tokenised the pair)."""
    return {"pair": text_digest(row["prompt"], row["real"], row["synthetic"]), "model": model,
            "max_length": data.max_length, "max_prompt_length": data.max_prompt_length,
            "average_log_prob": average_log_prob, "tokenizer": tokenizer}


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
            if key == "tokenizer":
                return ("it was tokenised by another tokenizer (vocabulary, special tokens or chat template) "
                        "than this run's" if got is not None else "it records no tokenizer (an older version)")
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


def training_key(examples: list, cfg: Any, start: str | None, tokenizer: str | None = None) -> str:
    """What a training run is made from: its examples, its options (``TrainingConfig``), the
    digest of its starting weights and the ``tokenizer_digest`` of its tokenizer (saved with the
    final model). Checkpoints and the final model record it; a resume with another key does not
    continue them."""
    import dataclasses

    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IN_KEY}
    return text_digest(examples_digest(examples), options, start, tokenizer)
