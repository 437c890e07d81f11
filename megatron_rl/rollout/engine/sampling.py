"""Sampling parameters of the embedded engine (SGLang's `sampling_params`), validated field by field.

Field names, defaults and meanings are SGLang's (python/sglang/srt/sampling/sampling_params.py);
a value of the wrong type or range raises `ParamError` naming the field (-> HTTP 400). Fields the
engine cannot honour -- grammars (regex, json_schema, ebnf, structural_tag) and custom_params --
are refused by name rather than ignored; unknown keys are refused too (SGLang's
`SamplingParams(**d)` raises on them). The batched sampler itself is in sampler.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GREEDY_EPS = 1e-6  # SGLang: temperature < _SAMPLING_EPS is greedy (temperature 1, top_k 1)
UNSUPPORTED = ("regex", "json_schema", "ebnf", "structural_tag", "custom_params")
IGNORED = ("spaces_between_special_tokens", "stream_interval")  # text/stream cosmetics, no effect here
MAX_SEED = 2**63 - 1


class ParamError(ValueError):
    """A request field with a bad type or value; the message names the field."""


def check_int(v, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """`v` as int (bools and non-integral floats refused); raises ParamError naming `name`."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ParamError(f"{name} must be an integer, got {v!r}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ParamError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def check_float(v, name: str, lo: float | None = None, hi: float | None = None) -> float:
    """`v` as a finite float in [lo, hi]; raises ParamError naming `name`."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ParamError(f"{name} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ParamError(f"{name} must be a finite number in [{lo}, {hi}], got {v}")
    return v


def check_bool(v, name: str) -> bool:
    """JSON true/false (or 0/1, which SGLang's pydantic-free dataclass also takes); else ParamError."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise ParamError(f"{name} must be a boolean, got {v!r}")


@dataclass(kw_only=True)
class SamplingParams:
    """SGLang `sampling_params` the engine honours (see sampler.py for the order they apply in)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): disabled, as in SGLang
    min_p: float = 0.0
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    sampling_seed: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1

    @classmethod
    def from_dict(cls, d, vocab_size: int = 1 << 31, where: str = "sampling_params") -> "SamplingParams":
        """Validate a request's JSON `sampling_params` dict. Raises ParamError naming the field."""
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ParamError(f"{where} must be an object, got {type(d).__name__}")
        p = cls()
        for k, v in d.items():
            name = f"{where}.{k}"
            if k in UNSUPPORTED:
                if v is not None:
                    raise ParamError(f"{name} is not supported by the embedded engine (no grammar backend / "
                                     "custom logit processors)")
                continue
            if k in IGNORED or v is None:
                continue
            setter = _FIELDS.get(k)
            if setter is None:
                raise ParamError(f"{name} is not a sampling parameter")
            setattr(p, k, setter(v, name, vocab_size))
        if p.min_new_tokens > p.max_new_tokens:
            raise ParamError(f"{where}.min_new_tokens ({p.min_new_tokens}) must be <= max_new_tokens "
                             f"({p.max_new_tokens})")
        return p

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)


def _stop(v, name, _vocab):
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise ParamError(f"{name} must be a non-empty string or a list of them, got {v!r}")
    return list(v)


def _stop_ids(v, name, vocab):
    v = [v] if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(v, list):
        raise ParamError(f"{name} must be a list of token ids, got {v!r}")
    return [check_int(t, f"{name}[{i}]", 0, vocab - 1) for i, t in enumerate(v)]


def _bias(v, name, vocab):
    if not isinstance(v, dict):
        raise ParamError(f"{name} must be an object {{token_id: bias}}, got {v!r}")
    out = {}
    for k, b in v.items():
        try:
            tok = int(k)
        except (TypeError, ValueError):
            raise ParamError(f"{name} key {k!r} is not a token id") from None
        out[check_int(tok, f"{name} key", 0, vocab - 1)] = check_float(b, f"{name}[{k}]", -1e9, 1e9)
    return out


_FIELDS = {
    "temperature": lambda v, n, _: check_float(v, n, 0.0, 1e6),
    "top_p": lambda v, n, _: _top_p(check_float(v, n, 0.0, 1.0), n),
    "top_k": lambda v, n, _: _top_k(check_int(v, n, -1, 1 << 30), n),
    "min_p": lambda v, n, _: check_float(v, n, 0.0, 1.0),
    "max_new_tokens": lambda v, n, _: check_int(v, n, 0, 1 << 30),
    "min_new_tokens": lambda v, n, _: check_int(v, n, 0, 1 << 30),
    "frequency_penalty": lambda v, n, _: check_float(v, n, -2.0, 2.0),
    "presence_penalty": lambda v, n, _: check_float(v, n, -2.0, 2.0),
    "repetition_penalty": lambda v, n, _: check_float(v, n, 1e-6, 2.0),  # SGLang: (0, 2]
    "logit_bias": _bias,
    "stop": _stop,
    "stop_token_ids": _stop_ids,
    "sampling_seed": lambda v, n, _: check_int(v, n, 0, MAX_SEED),
    "ignore_eos": lambda v, n, _: check_bool(v, n),
    "skip_special_tokens": lambda v, n, _: check_bool(v, n),
    "no_stop_trim": lambda v, n, _: check_bool(v, n),
    "n": lambda v, n, _: check_int(v, n, 1, 128),
}


def _top_p(v: float, name: str) -> float:
    if v <= 0.0:
        raise ParamError(f"{name} must be in (0, 1], got {v}")
    return v


def _top_k(v: int, name: str) -> int:
    return -1 if v == 0 else v  # SGLang: 0 and -1 both disable top-k


def find_stop_str(text: str, stops: list[str]) -> tuple[int, str] | None:
    """Earliest (char index, stop string) of any stop string in `text`, or None."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best
