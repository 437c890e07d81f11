"""Group rollout: every prompt gets exactly n samples, even when an engine dies mid-rollout.

Legend: P = number of prompts, n = samples per prompt (the GRPO group size).

Request ids are `f"{rid_prefix}-p{i}-s{j}"`, unique per (prompt i, sample j). A request whose engine
fails is retried by `SGLangClient.generate` on another engine (direct mode) or through the router;
each (i, j) slot is filled by exactly one result, so a retry can neither lose nor duplicate a
sample. When `sampling.seed` is set, sample (i, j) uses seed + i * n + j, so the n samples of a
group differ and the whole rollout is reproducible.

Left out: partial rollouts / over-sampling and dynamic filtering (done by the trainer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from typing import Callable, Sequence

from megatron_rl.rollout.client import GenerateResult, SamplingParams, SGLangClient

log = logging.getLogger(__name__)


async def generate_groups(client: SGLangClient, prompts: Sequence[Sequence[int]], n: int,
                          sampling: SamplingParams, *, return_logprob: bool = True,
                          return_routed_experts: bool = False, rid_prefix: str | None = None,
                          on_result: Callable[[], None] | None = None) -> list[list[GenerateResult]]:
    """Generate n samples for each of P token-id prompts; ``on_result()`` is called as each sample
    completes (e.g. a progress bar's update).

    Returns [P][n] GenerateResult; result [i][j] has rid f"{rid_prefix}-p{i}-s{j}".
    Dead engines found during the rollout are in `client.dead_engines` (and logged).
    Raises the first request error (EngineRequestError, EngineResponseError,
    AllEnginesFailedError) after cancelling the other requests; RuntimeError if a group does not
    hold exactly n distinct rids (an internal invariant, checked, never assumed).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    prefix = rid_prefix or uuid.uuid4().hex[:12]
    dead_before = set(client.dead_engines)

    async def one(i: int, j: int, sp: SamplingParams) -> GenerateResult:
        out = await client.generate(prompts[i], sp, return_logprob=return_logprob,
                                    return_routed_experts=return_routed_experts, rid=f"{prefix}-p{i}-s{j}")
        if on_result is not None:
            on_result()
        return out

    groups = await gather_grid(one, len(prompts), n, sampling)
    for i, g in enumerate(groups):
        rids = {r.rid for r in g}
        if len(g) != n or len(rids) != n:
            raise RuntimeError(f"prompt {i}: {len(g)} samples / {len(rids)} distinct rids, expected {n}")
    newly_dead = [u for u in client.dead_engines if u not in dead_before]
    if newly_dead:
        log.warning("rollout finished without loss; engines dead during it: %s", newly_dead)
    return groups


def rollout_metrics(groups: list[list[GenerateResult]], client: SGLangClient) -> dict[str, float]:
    """Scalar metrics: rollout/{num_samples, mean_response_len, truncated_frac, aborted_count,
    dead_engines, retried_requests}. Lengths in tokens."""
    flat = [r for g in groups for r in g]
    n = max(len(flat), 1)
    return {
        "rollout/num_samples": float(len(flat)),
        "rollout/mean_response_len": sum(len(r.output_ids) for r in flat) / n,
        "rollout/truncated_frac": sum(r.finish_reason == "length" for r in flat) / n,
        "rollout/aborted_count": float(sum(r.finish_reason == "abort" for r in flat)),
        "rollout/dead_engines": float(len(client.dead_engines)),
        "rollout/retried_requests": float(client.n_retried),
    }


def sample_sampling(sampling: SamplingParams, i: int, j: int, n: int) -> SamplingParams:
    """Sampling params of sample j of prompt i: ``sampling.seed + i * n + j`` when seeded, so the n
    samples of a group differ and a rollout is reproducible; unchanged when unseeded."""
    return sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + i * n + j)


async def gather_grid(one, n_prompts: int, n: int, sampling: SamplingParams) -> list[list]:
    """Run ``await one(i, j, sample_sampling(sampling, i, j, n))`` for every prompt i < n_prompts and
    sample j < n concurrently; returns the results as [n_prompts][n]. The first error is raised
    after every other task is cancelled and awaited (no request keeps running behind the caller)."""
    tasks = [[asyncio.ensure_future(one(i, j, sample_sampling(sampling, i, j, n))) for j in range(n)]
             for i in range(n_prompts)]
    flat = [t for row in tasks for t in row]
    try:
        await asyncio.gather(*flat)
    except BaseException:
        for t in flat:
            t.cancel()
        await asyncio.gather(*flat, return_exceptions=True)
        raise
    return [[t.result() for t in row] for row in tasks]
