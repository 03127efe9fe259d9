"""Reading the SFT data (prompt, real response) and the JSONL files of a run.

Accepted inputs: a ``.jsonl`` file, a ``.json`` file (one array of rows, one row, or JSON
lines), a ``.parquet`` file, a directory written by ``datasets.save_to_disk``, or a ``datasets``
name already in the local cache. Each row has either ``{prompt, real}`` fields (names
configurable) or a chat ``messages`` list (the UltraChat-200k layout), in which case the real
response is the *last* assistant turn and the prompt everything before it (system turns,
earlier user and assistant turns, consecutive user turns, as they are); a single user turn
is kept as its text. Prompts may be strings or chat message lists; they are kept as they are
and tokenised later (spin_kernels.packing.tokenize_prompt). Text must be valid Unicode: a
lone surrogate (``"\\ud800"`` in JSON) is refused with its file and line.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from .config import ConfigError, DataConfig
from .provenance import row_damage

Record = dict[str, Any]


def _rows_from_source(cfg: DataConfig) -> Iterable[tuple[str, Record]]:
    """``(where, row)`` for each input row; ``where`` names the file and line (or the row)."""
    path = cfg.data
    if path is None:
        raise ConfigError("data.data: required (a .jsonl/.parquet file or a datasets dataset)")
    if os.path.isfile(path):
        if path.endswith((".jsonl", ".json")):
            return read_records(path, (cfg.prompt_field, cfg.real_field, cfg.messages_field))
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path)
            except Exception as exc:  # pyarrow raises its own types for a damaged file
                raise ConfigError(f"data.data: {path} is not a readable Parquet file ({exc})") from exc
            return ((f"{path}: row {i}", row) for i, row in enumerate(table.to_pylist()))
        raise ConfigError(f"data.data: unsupported file type {path!r} (expected .jsonl, .json or .parquet)")
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError(f"data.data: {path!r} is not a file and the datasets package is missing") from exc
    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except Exception as exc:  # not a save_to_disk directory
            raise ConfigError(f"data.data: {path!r} is a directory but not one written by datasets.save_to_disk "
                              f"({type(exc).__name__}: {exc})") from exc
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
    return ((f"{path}: row {i}", row) for i, row in enumerate(ds))


def split_conversation(messages: list, where: str) -> tuple[str | list[dict], str]:
    """``(prompt, real)`` of a chat ``messages`` row: the real response is the last assistant
    turn, the prompt every message before it (a single user turn: its text). A conversation
    whose last user turn has no assistant turn after it, or with no user turn before the last
    assistant turn, is refused naming ``where``."""
    last_user = max((j for j, m in enumerate(messages) if m["role"] == "user"), default=None)
    last_assistant = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last_user is None:
        raise ConfigError(f"{where}: no user turn (roles {[m['role'] for m in messages]}); a row needs a user turn "
                          f"and the assistant's answer after it")
    if last_assistant is None or last_assistant < last_user:
        raise ConfigError(f"{where}: the last user turn (message {last_user}) has no assistant turn after it "
                          f"(roles {[m['role'] for m in messages]}); the real response is the last assistant turn, "
                          f"after the prompt")
    prompt = messages[:last_assistant]
    if len(prompt) == 1:
        return prompt[0]["content"], messages[last_assistant]["content"]
    return [dict(m) for m in prompt], messages[last_assistant]["content"]


def _check_unicode(value: str, where: str, what: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate, from a ``\\ud800`` escape):
    it cannot be written back as UTF-8 nor tokenised."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{where}: the {what} holds a lone surrogate {value[exc.start]!r} at character {exc.start} "
                          f"(a '\\u{ord(value[exc.start]):04x}' escape without its pair): not valid Unicode text; "
                          f"fix the escape in the file") from None


def check_messages(messages: Any, where: str, *, prompt: bool) -> None:
    """Chat messages: a non-empty list of ``{role, content}`` with string content (a prompt
    must end before the assistant's turn). Raises ConfigError naming ``where``."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: chat messages must be a non-empty list of {{role, content}} objects, got "
                          f"{type(messages).__name__}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ConfigError(f"{where}: message {j} must be an object with 'role' and 'content', got "
                              f"{type(m).__name__}")
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            raise ConfigError(f"{where}: message {j} lacks {missing} (has {sorted(m)})")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise ConfigError(f"{where}: message {j} needs a string 'role' and a string 'content'")
        _check_unicode(m["content"], where, f"content of message {j}")
    if prompt and messages[-1]["role"] == "assistant":
        raise ConfigError(f"{where}: the prompt's last message is the assistant's; a prompt ends before the "
                          f"assistant turn (its answer is the response)")


def _check_text(value: Any, where: str, what: str, *, empty_ok: bool = False) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: the {what} must be a string, got {type(value).__name__}")
    _check_unicode(value, where, what)
    if not empty_ok and not value.strip():
        raise ConfigError(f"{where}: the {what} is empty")


def normalise_row(row: Any, cfg: DataConfig, where: str) -> Record:
    """``{prompt, real}`` from one input row (see the module docstring); raises naming ``where``."""
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if cfg.prompt_field in row and cfg.real_field in row:
        prompt, real = row[cfg.prompt_field], row[cfg.real_field]
        what = (f"field {cfg.prompt_field!r}", f"field {cfg.real_field!r}")
    elif cfg.messages_field in row:
        msgs = row[cfg.messages_field]
        check_messages(msgs, f"{where}: field {cfg.messages_field!r}", prompt=False)
        prompt, real = split_conversation(msgs, f"{where}: field {cfg.messages_field!r}")
        what = (f"messages before the last assistant turn of {cfg.messages_field!r}",
                f"last assistant turn of {cfg.messages_field!r}")
    else:
        raise ConfigError(f"{where}: needs fields {cfg.prompt_field!r} and {cfg.real_field!r}, or "
                          f"{cfg.messages_field!r}; found {sorted(row)}")
    if isinstance(prompt, list):
        check_messages(prompt, f"{where}: {what[0]}", prompt=True)
        if not any(m["content"].strip() for m in prompt):
            raise ConfigError(f"{where}: the prompt ({what[0]}) is empty")
    elif isinstance(prompt, str):
        _check_text(prompt, where, f"prompt ({what[0]})")
    else:
        raise ConfigError(f"{where}: the prompt ({what[0]}) must be a string or chat messages, got "
                          f"{type(prompt).__name__}")
    _check_text(real, where, f"real response ({what[1]})", empty_ok=True)
    return {"prompt": prompt, "real": real}


def load_sft_data(cfg: DataConfig) -> list[Record]:
    """The run's pairs source: ``[{index, prompt, real}]`` in file order (first ``max_examples``).

    Every row is checked before any work starts (errors name the file, line and field). Three
    cases are kept, with a warning that counts them: rows whose prompt appears more than once
    (SPIN samples one response for each), empty real responses (the response is then EOS
    alone: the data says "answer nothing", as a toy distribution may; in chat data it is
    usually a broken row) and real responses of whitespace only (trained as that whitespace's
    tokens followed by EOS).
    """
    out: list[Record] = []
    for i, (where, row) in enumerate(_rows_from_source(cfg)):
        if cfg.max_examples is not None and i >= cfg.max_examples:
            break
        rec = normalise_row(row, cfg, where)
        rec["index"] = i
        out.append(rec)
    if not out:
        raise ConfigError(f"data.data: {cfg.data!r} holds no examples")
    from .parallel import is_main

    prompts = Counter(json.dumps(r["prompt"], sort_keys=True, ensure_ascii=False) for r in out)
    repeats = sum(n - 1 for n in prompts.values() if n > 1)
    empty = [r["index"] for r in out if not r["real"]]
    blank = [r["index"] for r in out if r["real"] and not r["real"].strip()]
    if repeats and is_main():
        print(f"spin-kernels: warning: {cfg.data}: {repeats} row(s) repeat an earlier row's prompt "
              f"({sum(n > 1 for n in prompts.values())} distinct prompt(s) occur more than once); each row is "
              f"kept and gets its own synthetic response", file=sys.stderr)
    if empty and is_main():
        print(f"spin-kernels: warning: {cfg.data}: {len(empty)} row(s) have an empty real response (e.g. rows "
              f"{empty[:5]}); each is trained as a response that ends at once (EOS alone)", file=sys.stderr)
    if blank and is_main():
        print(f"spin-kernels: warning: {cfg.data}: {len(blank)} row(s) have a real response of whitespace only (e.g. "
              f"rows {blank[:5]}); each is trained as its whitespace (spaces, newlines: their tokens as the "
              f"tokenizer splits them) followed by EOS, not as an empty answer", file=sys.stderr)
    return out


def check_row_ref_logps(value: Any, where: str) -> tuple[float, float]:
    """``ref_logps`` of a pairs row (JSON): two finite log-probabilities (<= 0), real then synthetic;
    errors name ``where`` (file and line). The ops check the tensor form at their entry
    (spin_kernels.ops.validation.check_ref_logps)."""
    if not isinstance(value, list) or len(value) != 2:
        got = f"{len(value)} values" if isinstance(value, list) else f"{type(value).__name__} {value!r}"[:80]
        raise ConfigError(f"{where}: field 'ref_logps' must be a list of 2 numbers [log p(real), log p(synthetic)], "
                          f"got {got}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: field 'ref_logps' must hold numbers, got {type(v).__name__} {v!r}"[:200])
        if not math.isfinite(v):
            raise ConfigError(f"{where}: field 'ref_logps' holds {v}; log-probabilities must be finite (recompute "
                              f"them with spin-kernels reference)")
        if v > 0:
            raise ConfigError(f"{where}: field 'ref_logps' holds {v} > 0; a log-probability is <= 0 (are these "
                              f"probabilities, losses or negated log-probs?)")
    return float(value[0]), float(value[1])


def read_stage_rows(path: str, need: tuple[str, ...], what: str) -> list[Record]:
    """The rows of a stage file (``generate``'s output, ``reference``'s pairs), each checked:
    an object with the ``need`` fields, unchanged since it was written (its ``row_digest``, when
    it has one), a prompt (text or chat messages), a real and a synthetic response (text; may be
    empty, see ``load_sft_data``) and, where needed, valid ``ref_logps``. Errors name ``what``
    (the flag), the file and the line."""
    if os.path.isdir(path) or not os.path.exists(path):
        raise ConfigError(f"{what}: file not found: {path}")
    rows = []
    for where, row in read_records(path, need):
        where = f"{what}: {where}"
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        missing = [k for k in need if k not in row]
        if missing:
            raise ConfigError(f"{where}: lacks {missing} (expected fields {list(need)})")
        prompt = row.get("prompt")
        if isinstance(prompt, list):
            check_messages(prompt, f"{where}: field 'prompt'", prompt=True)
        elif "prompt" in need:
            _check_text(prompt, where, "prompt (field 'prompt')")
        if "real" in need:
            _check_text(row["real"], where, "real response (field 'real')", empty_ok=True)
        if "synthetic" in need:
            if not isinstance(row["synthetic"], str):
                raise ConfigError(f"{where}: field 'synthetic' must be a string, got {type(row['synthetic']).__name__}")
            _check_unicode(row["synthetic"], where, "synthetic response (field 'synthetic')")
        if "ref_logps" in need:
            check_row_ref_logps(row["ref_logps"], where)
        if (why := row_damage(row)) is not None:
            raise ConfigError(f"{where}: {why}: the file was changed after spin-kernels wrote it; restore it, or "
                              f"drop the row's 'row_digest' field if the change is meant")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{what}: {path} holds no rows")
    return rows


# --------------------------------------------------------------------------- JSONL


def _lines(path: str) -> list[str]:
    """The file's lines, decoded as UTF-8 (an error names the line and the byte)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                          f"convert the file to UTF-8") from None


def read_jsonl(path: str, *, tolerate_torn_tail: bool = False,
               bad_lines: list[tuple[int, str]] | None = None) -> Iterator[Record]:
    """Rows of a JSONL file. With ``tolerate_torn_tail`` a last line cut short by a killed
    writer is skipped (it will be rewritten on resume); anywhere else a bad line is an error,
    unless ``bad_lines`` (a list) is given: a run's own file that was damaged, whose lines that
    are not JSON are then recorded there as ``(line, reason)`` and skipped (their rows are made
    again), and whose bytes that are not UTF-8 are read as U+FFFD (the row's digest then fails)."""
    for _, row in _jsonl_rows(path, tolerate_torn_tail=tolerate_torn_tail, bad_lines=bad_lines):
        yield row


def _jsonl_rows(path: str, *, tolerate_torn_tail: bool = False,
                bad_lines: list[tuple[int, str]] | None = None) -> Iterator[tuple[int, Any]]:
    if bad_lines is None:
        lines = _lines(path)
    else:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", errors="replace").splitlines(keepends=True)
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield n + 1, json.loads(line)
        except json.JSONDecodeError as exc:
            if tolerate_torn_tail and n == len(lines) - 1 and not line.endswith("\n"):
                return
            if bad_lines is None:
                raise ConfigError(f"{path}:{n + 1}: not valid JSON ({exc})") from exc
            bad_lines.append((n + 1, f"line {n + 1} is not valid JSON ({exc.msg})"))


def read_records(path: str, row_fields: tuple[str, ...] = ("prompt", "real", "messages")) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` of a ``.jsonl`` file (one JSON value per line) or a ``.json`` file holding
    one array of rows, one row (an object with any of ``row_fields``) or JSON lines; ``where``
    is ``path:line`` for messages. A ``.json`` file holding one object that is not a row (a
    wrapper such as ``{"data": [...]}``) is refused, naming its keys."""
    if path.endswith(".json"):
        text = "".join(_lines(path))
        if text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
            yield from ((f"{path}: row {i}", row) for i, row in enumerate(rows))
            return
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON lines (or broken JSON: named by line below)
        if isinstance(whole, dict):
            if not any(k in whole for k in row_fields):
                lists = [f"{k!r} ({len(v)} items)" for k, v in whole.items() if isinstance(v, list)]
                hint = f"; its rows may be in {', '.join(lists)}: save that array alone" if lists else ""
                raise ConfigError(f"{path}: holds one JSON object (keys {sorted(whole)[:10]}), not rows: a .json "
                                  f"data file holds an array of rows [{{...}}, ...], one row, or one row per "
                                  f"line{hint}")
            yield f"{path}: row 0", whole
            return
    yield from ((f"{path}:{n}: row {i}", row) for i, (n, row) in enumerate(_jsonl_rows(path)))


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
