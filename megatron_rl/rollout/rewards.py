"""Rewards: verifiers (typed Protocol) and a runner that never turns a verifier error into a 0.

Legend: N = samples, G = prompt groups, n = samples per group (N = G * n, group-major order).

A `Verifier` is any callable `(response: str, label: str) -> float`, sync or async; it may instead
return a mapping `{"reward": float, "<name>": float, ...}`: the extra entries are the verifier's
own metrics (e.g. `format_ok`, `answer_len`), averaged over the samples that report them and
logged as `reward/<name>` (names of the runner's own metrics below are refused). Built in:
`synthetic_verifier` (exact match on the synthetic task, `megatron_rl.data.synthetic.verify`) and
`math_verifier` (HF math-verify: parse the response's final/\\boxed answer and compare it to the
label symbolically). `RewardRunner.score` runs one verifier over a batch: async verifiers run
concurrently (bounded), sync ones inline. A sample whose verifier raises, or returns NaN or
+-inf, is marked failed, keeps its error, gets reward NaN (so it cannot pass for a real 0.0) and is
left out of group stats (and, in the trainer, of the advantages and the loss); if the failure rate
exceeds `max_failure_rate` the runner raises `RewardFailureError` naming the failed samples.

`resolve_verifier` turns the `--verifier` flag into a Verifier: `synthetic`, `math`, or
`module:callable` / `path/to/file.py:callable` (a user's own function, imported once).

Left out: reward models served over HTTP (wrap them as an async Verifier), length penalties.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Awaitable, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Verifier(Protocol):
    def __call__(self, response: str, label: str) -> float | Mapping | Awaitable[float | Mapping]: ...


RUNNER_METRICS = ("mean", "failed_count", "failure_rate", "group_std_mean", "zero_std_groups")


def reward_value(out: object) -> tuple[float, dict[str, float]]:
    """A verifier's return value -> (reward, {metric name: value}).

    ``out``: a real number (bool / int / float), or a mapping with a ``"reward"`` number and any
    other ``name: number`` entries (the verifier's metrics). Raises ValueError for a mapping
    without "reward", a non-numeric entry, or a metric named like one of the runner's own
    (``RUNNER_METRICS``); TypeError for any other type. Non-finite rewards are checked by the caller.
    """
    if isinstance(out, Mapping):
        if "reward" not in out:
            raise ValueError(f"verifier returned a mapping without 'reward' (keys: {sorted(out)})")
        extra = {}
        for name, v in out.items():
            if name == "reward":
                continue
            if name in RUNNER_METRICS or not isinstance(name, str):
                raise ValueError(f"verifier metric name {name!r} is reserved or not a string")
            if not isinstance(v, (int, float)):
                raise ValueError(f"verifier metric {name!r} must be a number, got {type(v).__name__}")
            extra[name] = float(v)
        return reward_value(out["reward"])[0], extra
    if not isinstance(out, (int, float)) and not hasattr(out, "__float__"):
        raise TypeError(f"verifier returned {type(out).__name__}; expected a number or a mapping with 'reward'")
    return float(out), {}


class RewardFailureError(RuntimeError):
    """Too many verifier failures in one batch (rate > RewardRunner.max_failure_rate)."""


def synthetic_verifier(response: str, label: str) -> float:
    """1.0/0.0 exact match of the final answer (see megatron_rl.data.synthetic.verify)."""
    from megatron_rl.data.synthetic import verify
    return verify(response, label)


def math_verifier(response: str, label: str) -> float:
    """1.0 if math-verify finds the response's answer (last \\boxed{...} preferred) equal to `label`.

    The label is parsed as `$label$` (a bare LaTeX/number answer). Timeouts are disabled because
    math-verify implements them with SIGALRM, which only works in the main thread.
    Raises whatever math-verify raises on internal errors (raise_on_error=True): the runner counts it.
    """
    from math_verify import parse, verify
    gold = parse(f"${label}$", parsing_timeout=None, raise_on_error=True)
    pred = parse(response, parsing_timeout=None, raise_on_error=True)
    if not gold or not pred:
        return 0.0
    return float(verify(gold, pred, timeout_seconds=None, raise_on_error=True))


@dataclass(kw_only=True)
class RewardResult:
    """rewards: float32 [N] (NaN where failed); failed: bool [N]; errors: {sample index: message};
    group_mean / group_std: float32 [G] over the non-failed samples of each group (NaN if none);
    metrics: reward/{mean, failed_count, failure_rate, group_std_mean, zero_std_groups} and the
    verifier's own metrics; extra: only the latter, ``reward/<name>`` -> mean over the
    non-failed samples that returned it (NaN values left out)."""

    rewards: np.ndarray
    failed: np.ndarray
    errors: dict[int, str]
    group_mean: np.ndarray
    group_std: np.ndarray
    metrics: dict[str, float]
    extra: dict[str, float] = field(default_factory=dict)


class RewardRunner:
    """Runs `verifier` over (response, label) pairs; see the module doc for the failure policy."""

    def __init__(self, verifier: Verifier, *, max_failure_rate: float = 0.05, max_concurrency: int = 64):
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ValueError(f"max_failure_rate must be in [0, 1], got {max_failure_rate}")
        self.verifier, self.max_failure_rate, self.max_concurrency = verifier, max_failure_rate, max_concurrency

    async def score(self, responses: Sequence[str], labels: Sequence[str], group_size: int) -> RewardResult:
        """Score N = len(responses) samples in group-major order (label i for sample i).

        Raises ValueError on length / group-size mismatch, RewardFailureError when the failure rate
        exceeds max_failure_rate (the message lists the first errors).
        """
        n = len(responses)
        if len(labels) != n or group_size < 1 or n % group_size:
            raise ValueError(f"{n} responses, {len(labels)} labels, group_size {group_size}")
        sem = asyncio.Semaphore(self.max_concurrency)

        async def one(i: int) -> tuple[float, dict[str, float]]:
            out = self.verifier(responses[i], labels[i])
            if inspect.isawaitable(out):
                async with sem:
                    out = await out
            r, extra = reward_value(out)
            if not np.isfinite(r):  # a NaN/inf reward is a failed verification, not a score
                raise ValueError(f"verifier returned a non-finite reward {r!r}")
            return r, extra

        raw = await asyncio.gather(*(_guard(one, i) for i in range(n)))
        errors = {i: e for i, (_, e) in enumerate(raw) if e is not None}
        rewards = np.array([np.nan if e is not None else r[0] for r, e in raw], dtype=np.float32)
        failed = np.array([e is not None for _, e in raw], dtype=bool)
        extra = _mean_metrics([r[1] for r, e in raw if e is None])
        rate = len(errors) / max(n, 1)
        if rate > self.max_failure_rate:
            first = "; ".join(f"sample {i} (group {i // group_size}, label {labels[i]!r}): {e}"
                              for i, e in list(errors.items())[:3])
            raise RewardFailureError(f"{len(errors)}/{n} verifier calls failed (rate {rate:.3f} > "
                                     f"max_failure_rate {self.max_failure_rate}): {first}")
        mean, std = group_stats(rewards, group_size)
        ok = rewards[~failed]
        metrics = {"reward/mean": float(ok.mean()) if ok.size else float("nan"),
                   "reward/failed_count": float(len(errors)), "reward/failure_rate": rate,
                   "reward/group_std_mean": float(np.nanmean(std)) if np.isfinite(std).any() else float("nan"),
                   "reward/zero_std_groups": float(np.sum(std == 0))}
        return RewardResult(rewards=rewards, failed=failed, errors=errors, group_mean=mean, group_std=std,
                            metrics=metrics | extra, extra=extra)

    def score_sync(self, responses: Sequence[str], labels: Sequence[str], group_size: int) -> RewardResult:
        return asyncio.run(self.score(responses, labels, group_size))


async def _guard(fn, i: int) -> tuple[tuple[float, dict] | None, str | None]:
    try:
        return await fn(i), None
    except Exception as e:  # noqa: BLE001 - any verifier error is recorded, counted, and thresholded
        return None, f"{type(e).__name__}: {e}"


def _mean_metrics(per_sample: list[dict[str, float]]) -> dict[str, float]:
    """{"reward/<name>": mean of the finite values of <name>} over the samples that report it."""
    sums: dict[str, list[float]] = {}
    for m in per_sample:
        for k, v in m.items():
            acc = sums.setdefault(k, [0.0, 0.0])
            if math.isfinite(v):
                acc[0], acc[1] = acc[0] + v, acc[1] + 1
    return {f"reward/{k}": (s / c if c else float("nan")) for k, (s, c) in sums.items()}


def resolve_verifier(spec: str) -> Verifier:
    """The verifier a ``--verifier`` value names.

    spec: ``synthetic`` (``synthetic_verifier``), ``math`` (``math_verifier``, HF math-verify),
    ``pkg.module:name`` (imported; ``name`` may be dotted, e.g. ``mod:Scorer.score``) or
    ``path/to/file.py:name`` (the file is loaded as a module). Raises ValueError naming
    ``--verifier`` for an unknown name, a module that cannot be imported (with the import error),
    a missing attribute, or a target that is not callable.
    """
    if spec == "synthetic":
        return synthetic_verifier
    if spec == "math":
        return math_verifier
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"--verifier {spec!r}: expected 'synthetic', 'math' or 'module:callable'")
    module = _import_verifier_module(spec, mod_name)
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"--verifier {spec!r}: {getattr(target, '__name__', mod_name)!r} has no "
                             f"attribute {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"--verifier {spec!r}: {attr!r} is a {type(target).__name__}, not callable")
    return target


def _import_verifier_module(spec: str, mod_name: str):
    try:
        if mod_name.endswith(".py"):
            if not os.path.isfile(mod_name):
                raise FileNotFoundError(f"no such file {mod_name!r}")
            name = f"_verifier_{os.path.splitext(os.path.basename(mod_name))[0]}"
            loader_spec = importlib.util.spec_from_file_location(name, mod_name)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module  # pickling / dataclasses inside it look the module up
            loader_spec.loader.exec_module(module)
            return module
        return importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the flag's fault; say which
        raise ValueError(f"--verifier {spec!r}: cannot import {mod_name!r}: {type(e).__name__}: {e}") from e


def group_stats(rewards: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group mean and population std (ddof=0) of float [N] rewards, ignoring NaN: float32 [G] each."""
    g = rewards.reshape(-1, group_size).astype(np.float64)
    valid = np.isfinite(g)
    cnt = valid.sum(1)
    s = np.where(valid, g, 0.0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(cnt > 0, s / cnt, np.nan)
        var = np.where(valid, (g - mean[:, None]) ** 2, 0.0).sum(1) / cnt
    return mean.astype(np.float32), np.sqrt(np.where(cnt > 0, var, np.nan)).astype(np.float32)


async def score_group(verifier: Verifier, responses: Sequence[str], label: str, *,
                      max_failure_rate: float = 0.05) -> RewardResult:
    """Score one prompt group (all responses share `label`); see RewardRunner.score."""
    runner = RewardRunner(verifier, max_failure_rate=max_failure_rate)
    return await runner.score(responses, [label] * len(responses), len(responses))
