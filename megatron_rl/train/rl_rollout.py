"""The trainer's side of the rollout engines: generate + score on rank 0, broadcast to every rank.

Legend: P prompts per step, n samples per prompt, N = P * n samples (group-major order).

Only global rank 0 (the "driver") talks HTTP: it owns the ``EngineLauncher`` (engines + router)
and the ``SGLangClient``s. ``RolloutService.rollout`` generates and scores on the driver, then
``broadcast_object_list`` hands the same ``list[Sample]`` to every trainer rank. Evaluation
(n samples per held-out prompt, unbiased pass@k) runs on the driver only; its metrics are only
logged there. ``WeightSync`` is built on every rank (its ``sync`` is collective) with a client only
on the driver.
Left out: dynamic sampling / over-sampling, partial and async (one-step-off) rollouts.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from megatron_rl.rollout.client import SamplingParams, SGLangClient
from megatron_rl.rollout.rewards import RewardRunner, Verifier
from megatron_rl.rollout.rollout import generate_groups
from megatron_rl.train.pass_at_k import mean_pass_at_k, pass_at_k_by_split
from megatron_rl.train.rl_batch import Sample


def broadcast_from_driver(obj):
    """Every rank returns rank 0's ``obj`` (pickled; ``broadcast_object_list``)."""
    box = [obj if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@dataclass(kw_only=True)
class RolloutService:
    """engine_urls / router_url: the engines (driver only; None elsewhere). tokenizer decodes
    responses for the verifier; stop_token_ids end a response (end-of-turn)."""

    engine_urls: list[str] | None
    router_url: str | None
    tokenizer: object
    verifier: Verifier
    stop_token_ids: tuple[int, ...] = ()

    @property
    def is_driver(self) -> bool:
        return torch.distributed.get_rank() == 0

    def _client(self) -> SGLangClient:
        return SGLangClient(self.engine_urls, router_url=self.router_url)

    def _generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams, tag: str):
        async def go():
            async with self._client() as c:
                return await generate_groups(c, prompts, n, sampling, return_logprob=True, rid_prefix=tag)

        return asyncio.run(go())

    def rollout(self, prompts: list[list[int]], labels: list[str], n: int, sampling: SamplingParams,
                tag: str) -> tuple[list[Sample], dict]:
        """N = len(prompts) * n scored samples on every rank, and driver-side timings.

        Returns ``(samples, {"perf/rollout_time_s", "perf/reward_time_s"})`` (timings are 0 off
        the driver). Raises what ``generate_groups`` / ``RewardRunner.score`` raise, on the driver.
        """
        out, times = None, {"perf/rollout_time_s": 0.0, "perf/reward_time_s": 0.0}
        if self.is_driver:
            out, times = self._generate_and_score(prompts, labels, n, sampling, tag)
        return broadcast_from_driver(out), times

    def evaluate(self, splits: dict[str, tuple[list[list[int]], list[str]]], n: int,
                 sampling: SamplingParams) -> dict[str, float]:
        """``eval/<split>/pass@<k>`` (unbiased, k = powers of 2 up to n) on the driver; {} elsewhere.

        splits: name -> (prompt token ids, labels). A sample is correct when its reward is >= 1.
        """
        if not self.is_driver:
            return {}
        correct = {}
        for name, (prompts, labels) in splits.items():
            samples, _ = self._generate_and_score(prompts, labels, n, sampling, f"eval-{name}")
            correct[name] = [[s.reward >= 1.0 for s in samples[i * n:(i + 1) * n]] for i in range(len(prompts))]
        return {f"eval/{k}": v for k, v in pass_at_k_by_split(correct).items()}

    def _generate_and_score(self, prompts, labels, n, sampling, tag) -> tuple[list[Sample], dict]:
        t0 = time.perf_counter()
        groups = self._generate(prompts, n, sampling, tag)
        t1 = time.perf_counter()
        flat = [r for g in groups for r in g]
        texts = [self.tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in flat]
        scored = RewardRunner(self.verifier).score_sync(texts, [lab for lab in labels for _ in range(n)], n)
        samples = [Sample(prompt_ids=r.prompt_ids, output_ids=r.output_ids, rollout_logprobs=r.logprobs,
                          reward=float(x), finish_reason=r.finish_reason, weight_version=r.weight_version)
                   for r, x in zip(flat, scored.rewards)]
        return samples, {"perf/rollout_time_s": t1 - t0, "perf/reward_time_s": time.perf_counter() - t1}


def rollout_stats(samples: list[Sample], n: int) -> dict[str, float]:
    """rollout/{reward_mean, pass@1, response_len_mean, response_len_max, truncation_rate}.

    pass@1: unbiased per-prompt estimate (correct = reward >= 1) averaged over the P groups.
    """
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    lens = [len(s.output_ids) for s in samples]
    groups = [samples[i:i + n] for i in range(0, len(samples), n)]
    counts = [(n, sum(s.reward >= 1.0 for s in g)) for g in groups]
    return {"rollout/reward_mean": float(rewards.nanmean()),
            "rollout/pass@1": mean_pass_at_k(counts, [1])[1],
            "rollout/response_len_mean": sum(lens) / len(lens),
            "rollout/response_len_max": float(max(lens)),
            "rollout/truncation_rate": sum(s.finish_reason == "length" for s in samples) / len(samples)}
