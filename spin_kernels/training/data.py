"""Reading the SFT data (prompt, real response) and the JSONL files of a run.

Accepted inputs: a ``.jsonl``/``.json``/``.parquet`` file, a directory written by
``datasets.save_to_disk``, or a ``datasets`` name already in the local cache. Each row has
either ``{prompt, real}`` fields (names configurable) or a chat ``messages`` list, in which case
the first user turn is the prompt and the first assistant turn the real response (the
UltraChat-200k layout). Prompts may be strings or chat message lists; they are kept as they
are and tokenised later (spin_kernels.packing.tokenize_prompt).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

from .config import ConfigError, DataConfig

Record = dict[str, Any]


def _rows_from_source(cfg: DataConfig) -> Iterable[Record]:
    path = cfg.data
    if path is None:
        raise ConfigError("data.data: required (a .jsonl/.parquet file or a datasets dataset)")
    if os.path.isfile(path):
        if path.endswith((".jsonl", ".json")):
            return read_jsonl(path)
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        raise ConfigError(f"data.data: unsupported file type {path!r} (expected .jsonl, .json or .parquet)")
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError(f"data.data: {path!r} is not a file and the datasets package is missing") from exc
    if os.path.isdir(path):
        ds = datasets.load_from_disk(path)
    else:
        try:
            ds = datasets.load_dataset(path, split=cfg.split)
        except Exception as exc:  # offline, unknown name, ...: say what was tried
            raise ConfigError(f"data.data: {path!r} is neither a file, a directory nor a loadable datasets "
                              f"dataset ({type(exc).__name__}: {exc})") from exc
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise ConfigError(f"data.split: {cfg.split!r} not in {list(ds)}")
        ds = ds[cfg.split]
    return ds


def _first_turn(messages: Any, role: str) -> Any:
    for m in messages:
        if isinstance(m, dict) and m.get("role") == role:
            return m.get("content")
    return None


def normalise_row(row: Record, cfg: DataConfig, where: str) -> Record:
    """``{prompt, real}`` from one input row (see the module docstring); raises naming ``where``."""
    if cfg.prompt_field in row and cfg.real_field in row:
        prompt, real = row[cfg.prompt_field], row[cfg.real_field]
    elif cfg.messages_field in row:
        msgs = row[cfg.messages_field]
        if not isinstance(msgs, list):
            raise ConfigError(f"{where}: field {cfg.messages_field!r} must be a list of chat messages")
        prompt, real = _first_turn(msgs, "user"), _first_turn(msgs, "assistant")
        if prompt is None or real is None:
            raise ConfigError(f"{where}: {cfg.messages_field!r} needs a user and an assistant turn")
    else:
        raise ConfigError(f"{where}: needs fields {cfg.prompt_field!r} and {cfg.real_field!r}, or "
                          f"{cfg.messages_field!r}; found {sorted(row)}")
    if not isinstance(real, str):
        raise ConfigError(f"{where}: the real response must be a string, got {type(real).__name__}")
    if not isinstance(prompt, (str, list)):
        raise ConfigError(f"{where}: the prompt must be a string or chat messages, got {type(prompt).__name__}")
    return {"prompt": prompt, "real": real}


def load_sft_data(cfg: DataConfig) -> list[Record]:
    """The run's pairs source: ``[{index, prompt, real}]`` in file order (first ``max_examples``)."""
    out: list[Record] = []
    for i, row in enumerate(_rows_from_source(cfg)):
        if cfg.max_examples is not None and i >= cfg.max_examples:
            break
        rec = normalise_row(dict(row), cfg, f"{cfg.data}: row {i}")
        rec["index"] = i
        out.append(rec)
    if not out:
        raise ConfigError(f"data.data: {cfg.data!r} holds no examples")
    return out


# --------------------------------------------------------------------------- JSONL


def read_jsonl(path: str, *, tolerate_torn_tail: bool = False) -> Iterator[Record]:
    """Rows of a JSONL file. With ``tolerate_torn_tail`` a last line cut short by a killed
    writer is skipped (it will be rewritten on resume); anywhere else a bad line is an error."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            if tolerate_torn_tail and n == len(lines) - 1 and not line.endswith("\n"):
                return
            raise ConfigError(f"{path}:{n + 1}: not valid JSON ({exc})") from exc


def write_jsonl_atomic(path: str, rows: Iterable[Record]) -> None:
    """Write all rows to ``path`` through a temporary file and a rename (never a half file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JsonlAppender:
    """Append rows to a JSONL file, flushed per call, so a killed process loses at most a torn
    last line (which ``read_jsonl(tolerate_torn_tail=True)`` skips and the writer truncates)."""

    def __init__(self, path: str):
        self.path = path
        if os.path.exists(path):
            _truncate_torn_tail(path)
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close() / __exit__)

    def write(self, rows: Iterable[Record]) -> None:
        for row in rows:
            self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _truncate_torn_tail(path: str) -> None:
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
