"""Typed configuration of the GRPO-family RL loop (what we own; Megatron's flags stay Megatron's).

``RLConfig`` is built once from the CLI (``grpo.parse_args``) and handed to ``rl_step``; leaf
functions receive only the scalars they need. ``__post_init__`` rejects every combination the
loop cannot run, with a message naming the flag.
Left out (not implemented, rejected or absent): KL to a reference model, dynamic sampling /
over-sampling, async (one-step-off) rollouts, HPT, sequence packing of rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Advantage = Literal["grpo", "rloo", "dr_grpo"]
ADVANTAGES = ("grpo", "rloo", "dr_grpo")


@dataclass(kw_only=True)
class RLConfig:
    """One RL run. Units: counts are samples / prompts / steps; lengths are tokens.

    rollout_batch_size: prompts per RL step (P); n_samples_per_prompt: group size (n);
    the rollout batch is N = P * n samples, split into ``mini_batches_per_rollout`` (k) optimizer
    steps (k = 1: fully on-policy), each cut into micro-batches of ``micro_batch_size`` rows per
    data-parallel rank.
    advantage: "grpo" (std-normalised, token-mean loss), "rloo" (leave-one-out, token-mean),
    "dr_grpo" (no std, constant ``max_new_tokens`` normaliser: Liu et al. 2025 arXiv 2503.20783).
    eps_low / eps_high: PPO clip range (clip-higher when eps_high > eps_low).
    tis_cap: truncated importance sampling cap on pi_old / mu (None = off).
    eval_interval: RL steps between evals (0 = only at the end); eval_n_samples per prompt.
    save_interval: RL steps between checkpoints (0 = only at the end).
    """

    rollout_batch_size: int = 8
    n_samples_per_prompt: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    num_steps: int = 10
    mini_batches_per_rollout: int = 1
    micro_batch_size: int = 4
    advantage: Advantage = "grpo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    tis_cap: float | None = None
    eval_interval: int = 0
    eval_n_samples: int = 4
    eval_max_prompts: int = 64
    save_interval: int = 0
    seed: int = 1234

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.rollout_batch_size >= 1, f"--rollout-batch-size must be >= 1, got {self.rollout_batch_size}")
        need(self.n_samples_per_prompt >= 1,
             f"--n-samples-per-prompt must be >= 1, got {self.n_samples_per_prompt}")
        need(self.mini_batches_per_rollout >= 1, "--mini-batches-per-rollout must be >= 1 (1 = fully "
             f"on-policy), got {self.mini_batches_per_rollout}")
        need(self.num_samples % self.mini_batches_per_rollout == 0,
             f"rollout batch of {self.num_samples} samples (--rollout-batch-size x "
             f"--n-samples-per-prompt) is not divisible by --mini-batches-per-rollout "
             f"{self.mini_batches_per_rollout}")
        need(self.micro_batch_size >= 1, f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        need(self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        need(self.temperature > 0, f"--temperature must be > 0 (sampling), got {self.temperature}")
        need(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        need(self.num_steps >= 1, f"--num-steps must be >= 1, got {self.num_steps}")
        need(self.advantage in ADVANTAGES, f"--advantage must be one of {ADVANTAGES}, got {self.advantage!r}")
        need(0 <= self.eps_low < 1 and self.eps_high >= 0,
             f"need 0 <= --eps-low < 1 and --eps-high >= 0, got {self.eps_low}, {self.eps_high}")
        need(self.tis_cap is None or self.tis_cap > 0, f"--tis-cap must be > 0, got {self.tis_cap}")
        need(self.eval_interval >= 0 and self.save_interval >= 0, "intervals must be >= 0")
        need(self.eval_n_samples >= 1, f"--eval-n-samples must be >= 1, got {self.eval_n_samples}")

    @property
    def num_samples(self) -> int:
        """N = P * n samples per rollout batch."""
        return self.rollout_batch_size * self.n_samples_per_prompt

    @property
    def loss_agg(self) -> str:
        """Loss aggregation mode of ``losses.policy.aggregate_loss`` implied by the estimator."""
        return "seq-mean-token-sum-norm" if self.advantage == "dr_grpo" else "token-mean"
