"""Rewards: verifiers (typed Protocol) and a runner that never turns a verifier error into a 0.

Legend: N = samples, G = prompt groups, n = samples per group (N = G * n, group-major order).

A `Verifier` is any callable `(response: str, label: str) -> float`, sync or async. Built in:
`synthetic_verifier` (exact match on the synthetic task, `megatron_rl.data.synthetic.verify`) and
`math_verifier` (HF math-verify: parse the response's final/\\boxed answer and compare it to the
label symbolically). `RewardRunner.score` runs one verifier over a batch: async verifiers run
concurrently (bounded), sync ones inline. A sample whose verifier raises, or returns NaN or
+-inf, is marked failed, keeps its error, gets reward NaN (so it cannot pass for a real 0.0) and is
left out of group stats (and, in the trainer, of the advantages and the loss); if the failure rate
exceeds `max_failure_rate` the runner raises `RewardFailureError` naming the failed samples.

Left out: reward models served over HTTP (wrap them as an async Verifier), length penalties.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import Awaitable, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Verifier(Protocol):
    def __call__(self, response: str, label: str) -> float | Awaitable[float]: ...


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
    metrics: reward/{mean, failed_count, failure_rate, group_std_mean, zero_std_groups}."""

    rewards: np.ndarray
    failed: np.ndarray
    errors: dict[int, str]
    group_mean: np.ndarray
    group_std: np.ndarray
    metrics: dict[str, float]


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

        async def one(i: int) -> float:
            out = self.verifier(responses[i], labels[i])
            if inspect.isawaitable(out):
                async with sem:
                    out = await out
            r = float(out)
            if not np.isfinite(r):  # a NaN/inf reward is a failed verification, not a score
                raise ValueError(f"verifier returned a non-finite reward {r!r}")
            return r

        raw = await asyncio.gather(*(_guard(one, i) for i in range(n)))
        errors = {i: e for i, (_, e) in enumerate(raw) if e is not None}
        rewards = np.array([np.nan if e is not None else r for r, e in raw], dtype=np.float32)
        failed = np.array([e is not None for _, e in raw], dtype=bool)
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
                            metrics=metrics)

    def score_sync(self, responses: Sequence[str], labels: Sequence[str], group_size: int) -> RewardResult:
        return asyncio.run(self.score(responses, labels, group_size))


async def _guard(fn, i: int) -> tuple[float, str | None]:
    try:
        return await fn(i), None
    except Exception as e:  # noqa: BLE001 - any verifier error is recorded, counted, and thresholded
        return float("nan"), f"{type(e).__name__}: {e}"


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
