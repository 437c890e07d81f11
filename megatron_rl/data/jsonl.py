"""JSONL datasets for SFT and RL: strict row validation and atomic writes.

Row schema (one JSON object per line; blank lines are skipped):
    prompt    str, non-empty            -- the user turn; XOR `messages`
    messages  list[{"role", "content"}] -- role in {system, user, assistant, tool}, content str; XOR `prompt`
    label     str                        -- the verifiable answer (required unless require_label=False)
    solution  str                        -- the SFT target for `prompt` rows (optional)
    op        int                        -- difficulty, for the synthetic task (optional)
Other keys are kept untouched.

Every problem raises DatasetError naming the file and the 1-based line. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

ROLES = ("system", "user", "assistant", "tool")


class DatasetError(ValueError):
    """A dataset row (or file) that does not follow the schema; the message names file and line."""


def location(path: str | os.PathLike | None, line: int | None) -> str:
    """"<path>:<line>" for error messages; "<row>" stands in for an unknown path."""
    if path is None:
        return "<row>" if line is None else f"<row>:{line}"
    return f"{path}" if line is None else f"{path}:{line}"


def validate_row(row: object, *, require_label: bool = True, require_solution: bool = False,
                 path: str | os.PathLike | None = None, line: int | None = None) -> dict:
    """Check one row against the schema; return it unchanged. Raises DatasetError.

    With require_solution, a `prompt` row needs `solution` and a `messages` row must end with an
    assistant turn (that turn is the SFT target).
    """
    where = location(path, line)
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: row must be a JSON object, got {type(row).__name__}")
    has_prompt, has_messages = "prompt" in row, "messages" in row
    if has_prompt and has_messages:
        raise DatasetError(f"{where}: row has both 'prompt' and 'messages'; give exactly one")
    if not (has_prompt or has_messages):
        raise DatasetError(f"{where}: row has neither 'prompt' nor 'messages' (keys: {sorted(row)})")
    if has_prompt and not (isinstance(row["prompt"], str) and row["prompt"]):
        raise DatasetError(f"{where}: 'prompt' must be a non-empty string, got {row['prompt']!r:.80}")
    if has_messages:
        _validate_messages(row["messages"], where)
    for key, kind in (("label", str), ("solution", str), ("op", int)):
        if key in row and (not isinstance(row[key], kind) or isinstance(row[key], bool)):
            raise DatasetError(f"{where}: {key!r} must be {kind.__name__}, got {type(row[key]).__name__}")
    if require_label and "label" not in row:
        raise DatasetError(f"{where}: row has no 'label'")
    if require_solution:
        if has_prompt and "solution" not in row:
            raise DatasetError(f"{where}: row has no 'solution' (needed for SFT)")
        if has_messages and row["messages"][-1]["role"] != "assistant":
            raise DatasetError(f"{where}: 'messages' must end with an assistant turn for SFT")
    return row


def _validate_messages(messages: object, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not {"role", "content"} <= m.keys():
            raise DatasetError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DatasetError(f"{where}: messages[{i}].role {m['role']!r} not in {ROLES}")
        if not isinstance(m["content"], str):
            raise DatasetError(f"{where}: messages[{i}].content must be str, "
                               f"got {type(m['content']).__name__}")


def load_jsonl_with_lines(path: str | os.PathLike, *, require_label: bool = True,
                          require_solution: bool = False) -> list[tuple[int, dict]]:
    """Like `load_jsonl` but returns (1-based line number, row) pairs, for later error messages."""
    out = []
    for line_no, row in iter_jsonl_objects(path):
        validate_row(row, require_label=require_label, require_solution=require_solution,
                     path=path, line=line_no)
        out.append((line_no, row))
    if not out:
        raise DatasetError(f"{path}: empty dataset (no non-blank lines)")
    return out


def iter_jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """Yield (1-based line number, parsed JSON value) for every non-blank line, unvalidated.

    Raises DatasetError ("<path>:<line>: ...") on invalid UTF-8 or malformed JSON; OSError if
    the file cannot be read.
    """
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{path}:{line_no}: invalid UTF-8 at byte {e.start} of the line "
                                   f"({raw[e.start:e.start + 4]!r}): {e.reason}") from e
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{line_no}: malformed JSON: {e.msg} (column {e.colno})") from e


def check_prompt_lengths(path: str | os.PathLike, lines: list[int] | list[str], lengths: list[int], *,
                         context_length: int, max_new_tokens: int) -> None:
    """Refuse rows whose prompt does not fit the context with room for the response.

    lines: the 1-based line of each row, or its whole location string (``data.load_rows``:
    "file.parquet: row 7"); lengths: its prompt length in tokens (chat template
    applied). A row needs ``length + max_new_tokens <= context_length`` (SGLang refuses a request
    whose input plus max_new_tokens exceeds the model's context length). Raises DatasetError
    naming ``path:line`` (or the location) of the first row that does not fit.
    """
    limit = context_length - max_new_tokens
    for line, n in zip(lines, lengths):
        if n > limit:
            where = line if isinstance(line, str) else f"{path}:{line}"
            raise DatasetError(f"{where}: prompt is {n} tokens; the context length is {context_length} "
                               f"and max_new_tokens {max_new_tokens}, so a prompt may have at most {limit}")


def load_jsonl(path: str | os.PathLike, *, require_label: bool = True,
               require_solution: bool = False) -> list[dict]:
    """Read and validate a JSONL dataset. Returns the rows in file order.

    Raises DatasetError ("<path>:<line>: <problem>") on invalid UTF-8, malformed JSON, a non-object row, missing
    or doubled prompt/messages, a missing label (require_label), a missing SFT target
    (require_solution), wrong field types, or an empty file; OSError if the file cannot be read.
    """
    return [row for _, row in load_jsonl_with_lines(
        path, require_label=require_label, require_solution=require_solution)]


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write rows as JSONL via a temp file in the same directory and os.replace.

    Readers see the old file or the complete new one, never a partial one; on any error the temp
    file is removed and the exception re-raised (e.g. TypeError for a non-JSON-serialisable row).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; datasets are meant to be shared
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
