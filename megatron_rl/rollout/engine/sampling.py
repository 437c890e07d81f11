"""Sampling parameters and the token sampler of the embedded engine (SGLang semantics, one sequence).

Legend: V = vocab size. Logits are float32 [V] for one sequence at one step.

Order of operations follows SGLang's sampler: temperature scaling -> top-k -> top-p -> renormalise ->
multinomial with the request's own torch.Generator (seeded from `sampling_seed`, so a request's
tokens do not depend on what else is running). `temperature < 1e-6` (SGLang treats 0 as greedy) is
argmax. Left out deliberately: min_p, penalties (frequency/presence/repetition), logit_bias,
structured output (regex / json_schema), n > 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

GREEDY_EPS = 1e-6


@dataclass(kw_only=True)
class SamplingParams:
    """SGLang `sampling_params` subset; field names are SGLang's.

    Raises ValueError (-> HTTP 400) for unknown-typed or out-of-range values.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): disabled, as in SGLang
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    sampling_seed: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False

    @classmethod
    def from_dict(cls, d: dict | None) -> "SamplingParams":
        """Build from a request's JSON dict; unknown keys are ignored (SGLang has many more)."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        if isinstance(kw.get("stop"), str):
            kw["stop"] = [kw["stop"]]
        if isinstance(kw.get("stop_token_ids"), int):
            kw["stop_token_ids"] = [kw["stop_token_ids"]]
        p = cls(**kw)
        p.validate()
        return p

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 0, got {self.top_k}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token id from float32 logits [V] (greedy: argmax, first index on ties)."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # [V]
    if params.top_k > 0 and params.top_k < probs.numel():
        kth = torch.topk(probs, params.top_k).values[-1]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = (cum - sorted_p) > params.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator).item())


def token_logprob(logits: torch.Tensor, tok: int, params: SamplingParams, *, original: bool = False) -> float:
    """Logprob the engine reports for sampled token `tok`, from float32 logits [V].

    Matches SGLang's sampler: by default the log-probability under the temperature-scaled
    distribution, log_softmax(logits / temperature)[tok] (before top-k / top-p, which only
    truncate what is sampled); greedy requests and `original=True` (SGLang's
    SGLANG_RETURN_ORIGINAL_LOGPROB) give log_softmax(logits)[tok]. The trainer scales its logits by
    the same rollout temperature (`train.logprobs.apply_logits_temperature`), so the two agree.
    Returns a float <= 0 (nats).
    """
    scaled = logits.float() if original or params.greedy else logits.float() / params.temperature
    return float(torch.log_softmax(scaled, dim=-1)[tok])


def find_stop_str(text: str, stops: list[str]) -> tuple[int, str] | None:
    """Earliest (char index, stop string) of any stop string in `text`, or None."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best
