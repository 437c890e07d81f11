"""Lazy reader over an HF safetensors checkpoint directory (single file or sharded).

Only ``safe_open`` handles and headers are touched until a tensor is asked for; a source
``name[e]`` reads row e of a stacked tensor (``get_slice``), not the whole stack.
"""

from __future__ import annotations

import json
import os

import torch

from megatron_rl.checkpoint.adapter import split_row_selector

INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SafetensorsReadError(ValueError):
    """A safetensors file could not be opened (truncated or corrupt); the message names it."""


class SafetensorsCheckpoint:
    """Lazy reader over one HF checkpoint directory (single file or sharded with an index).

    ``keys()`` -> tensor names; ``get(name)`` reads one tensor, where ``name[e]`` reads row e of
    a stacked tensor only; ``meta(name)`` gives a meta tensor of that shape/dtype (no read).
    Raises FileNotFoundError when the directory has no *.safetensors (or a listed file is
    missing), SafetensorsReadError (naming the file) when a file is truncated or corrupt.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = os.fspath(hf_dir)
        self._handles: dict = {}
        index = os.path.join(self.dir, INDEX_FILE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    self.file_of = dict(json.load(f)["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SafetensorsReadError(f"{index}: not a valid safetensors index "
                                           f"({type(e).__name__}: {e})") from e
        else:
            files = sorted(f for f in os.listdir(self.dir) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors in {self.dir}")
            self.file_of = {k: fn for fn in files for k in self._open(fn).keys()}

    def _open(self, fn: str):
        from safetensors import safe_open

        if fn not in self._handles:
            path = os.path.join(self.dir, fn)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: safetensors file missing (listed in "
                                        f"{INDEX_FILE} or the directory)")
            try:
                self._handles[fn] = safe_open(path, framework="pt", device="cpu")
            except Exception as e:  # SafetensorError: truncated / corrupt header or data
                raise SafetensorsReadError(f"{path}: cannot read safetensors file "
                                           f"(truncated or corrupt?): {e}") from e
        return self._handles[fn]

    def keys(self) -> set[str]:
        return set(self.file_of)

    def has(self, source: str) -> bool:
        name, row = split_row_selector(source)
        if name not in self.file_of:
            return False
        return row is None or row < self._open(self.file_of[name]).get_slice(name).get_shape()[0]

    def meta(self, source: str) -> torch.Tensor:
        name, row = split_row_selector(source)
        sl = self._open(self.file_of[name]).get_slice(name)
        shape = sl.get_shape()[0 if row is None else 1:]
        return torch.empty(shape, dtype=_DTYPES.get(sl.get_dtype(), torch.float32), device="meta")

    def get(self, source: str) -> torch.Tensor:
        name, row = split_row_selector(source)
        handle = self._open(self.file_of[name])
        return handle.get_tensor(name) if row is None else handle.get_slice(name)[row]

