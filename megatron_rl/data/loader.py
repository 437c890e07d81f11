"""One loader for every prompt / SFT dataset: jsonl, a JSON array, parquet, or an HF `datasets`
directory (``Dataset.save_to_disk``), with the user's columns mapped onto our row schema.

Row schema (``data.jsonl.validate_row``): ``messages`` (chat turns) XOR ``prompt`` (one user
turn), ``label`` (the verifiable answer), optional ``solution`` (SFT target of a prompt row).
``RowKeys`` names where each comes from in the user's rows (``--input-key``, ``--label-key``,
``--solution-key``); a key with dots (``reward_model.ground_truth``) walks nested objects when
no column has that exact name. The input column may hold a list of ``{"role", "content"}`` turns
(-> ``messages``) or a plain string (-> ``prompt``, rendered as one user turn); with the default
``--input-key messages``, a row without ``messages`` uses its ``prompt`` column (a list of turns
there, verl's layout, becomes ``messages``). Null values of a
columnar file count as absent; every other column is kept (JSON-plain: a value JSON cannot hold,
e.g. a timestamp, becomes its string).

Errors are ``DatasetError`` naming the file and the row: ``path:<line>`` (1-based) for jsonl,
``path: row <i>`` (0-based index) for parquet / HF / JSON-array rows. A missing mapped key names
the key, its flag and the columns the row has. Format by path: a directory -> HF
``datasets.load_from_disk``; ``*.parquet`` -> pyarrow; ``*.json`` starting with ``[`` -> a JSON
array; anything else -> jsonl.
Left out: streaming (datasets are small enough to hold in memory; rows are validated up front),
remote paths (hf://, s3://), a directory of parquet shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_rl.data.jsonl import DatasetError, iter_jsonl_objects, validate_row

_MISSING = object()


@dataclass(frozen=True, kw_only=True)
class RowKeys:
    """Where the schema's fields live in the user's rows (column names, dots for nested fields)."""

    input: str = "messages"  # --input-key: chat turns, or a plain prompt string
    label: str = "label"  # --label-key
    solution: str = "solution"  # --solution-key (optional per row)

    @classmethod
    def from_args(cls, args) -> RowKeys:
        """From ``args.input_key`` / ``label_key`` / ``solution_key`` (defaults where absent)."""
        d = cls()
        return cls(input=getattr(args, "input_key", None) or d.input,
                   label=getattr(args, "label_key", None) or d.label,
                   solution=getattr(args, "solution_key", None) or d.solution)


def lookup(row: dict, key: str):
    """``row[key]``, else the nested value at the dotted path ``key`` (``a.b`` -> row["a"]["b"]);
    ``_MISSING`` when absent or null."""
    if key in row:
        return _MISSING if row[key] is None else row[key]
    cur: object = row
    for part in key.split("."):
        if not isinstance(cur, dict) or cur.get(part) is None:
            return _MISSING
        cur = cur[part]
    return cur


def map_row(raw: object, keys: RowKeys, *, where: str, require_label: bool = True,
            require_solution: bool = False) -> dict:
    """One user row -> a validated schema row (see the module doc). Raises DatasetError naming
    ``where``: not an object, a missing input / label (require_label) key with the columns
    present, or any ``validate_row`` check."""
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: row must be a JSON object, got {type(raw).__name__}")
    out = {k: v for k, v in raw.items() if v is not None}
    if keys.input == "messages" and "messages" not in out and "prompt" in out:  # a prompt row
        if isinstance(out["prompt"], list):  # verl's layout: the prompt column holds chat turns
            out["messages"] = out.pop("prompt")
    else:
        value = lookup(raw, keys.input)
        if value is _MISSING:
            raise _missing(where, keys.input, "--input-key", raw)
        out.pop(keys.input, None)
        out["prompt" if isinstance(value, str) else "messages"] = value
    for key, field, flag, required in ((keys.label, "label", "--label-key", require_label),
                                       (keys.solution, "solution", "--solution-key", False)):
        value = lookup(raw, key)
        if value is _MISSING:
            if required:
                raise _missing(where, key, flag, raw)
            continue
        out.pop(key, None)
        out[field] = value
    return validate_row(out, require_label=require_label, require_solution=require_solution, path=where)


def _missing(where: str, key: str, flag: str, raw: dict) -> DatasetError:
    present = sorted(k for k, v in raw.items() if v is not None)
    return DatasetError(f"{where}: row has no {key!r} ({flag}); its non-null columns: {present}")


def load_rows(path: str | os.PathLike, *, keys: RowKeys | None = None, require_label: bool = True,
              require_solution: bool = False) -> list[tuple[str, dict]]:
    """Read, map and validate every row of a dataset. Returns (location, row) pairs in file order;
    location is ``"path:<line>"`` (jsonl) or ``"path: row <i>"``, for later error messages.

    Raises DatasetError naming file and row (see the module doc), or ``path: empty dataset``;
    FileNotFoundError for a missing path; ImportError naming the package for a parquet file
    without pyarrow or a directory without `datasets`.
    """
    keys = keys or RowKeys()
    kw = dict(require_label=require_label, require_solution=require_solution)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such dataset file or directory")
    if p.is_dir():
        records = enumerate(_read_hf_dir(p))
    elif p.suffix == ".parquet":
        records = enumerate(_read_parquet(p))
    elif p.suffix == ".json" and _starts_with(p, b"["):
        records = enumerate(_read_json_array(p))
    else:
        out = [(f"{path}:{line}", map_row(raw, keys, where=f"{path}:{line}", **kw))
               for line, raw in iter_jsonl_objects(path)]
        records = None
    if records is not None:
        out = [(f"{path}: row {i}", map_row(raw, keys, where=f"{path}: row {i}", **kw))
               for i, raw in records]
    if not out:
        raise DatasetError(f"{path}: empty dataset (no rows)")
    return out


def _plain(row: object) -> object:
    """A columnar row as JSON-plain values (rows are broadcast and saved in checkpoints)."""
    return json.loads(json.dumps(row, default=str))


def _read_parquet(p: Path) -> list:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DatasetError(f"{p}: not a readable parquet file ({type(e).__name__}: {e})") from e
    return [_plain(r) for r in table.to_pylist()]


def _read_hf_dir(p: Path) -> list:
    import datasets

    if (p / "dataset_dict.json").is_file():
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        raise DatasetError(f"{p}: a DatasetDict with splits {splits}; pass one split's directory "
                           f"(e.g. {p / (splits[0] if splits else 'train')})")
    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError as e:
        raise DatasetError(f"{p}: a directory that is not a saved HF dataset "
                           f"(Dataset.save_to_disk): {e}") from e
    return [_plain(r) for r in ds]


def _read_json_array(p: Path) -> list:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{p}: malformed JSON array: {e}") from e
    if not isinstance(data, list):
        raise DatasetError(f"{p}: a .json dataset must be an array of row objects")
    return data


def _starts_with(p: Path, prefix: bytes) -> bool:
    with open(p, "rb") as f:
        return f.read(4096).lstrip().startswith(prefix)
