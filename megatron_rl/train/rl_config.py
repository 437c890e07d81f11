"""Typed configuration of the GRPO-family RL loop (what we own; Megatron's flags stay Megatron's).

``RLConfig`` is built once from the CLI (``grpo_args.parse_args``) and handed to ``rl_step``; leaf
functions receive only the scalars they need. ``__post_init__`` rejects every combination the
loop cannot run, with a message naming the flag.
Left out: multi-step-off asynchrony (only one step off), a learned value head in the loop (GAE
exists as a loss function).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Advantage = Literal["grpo", "rloo", "dr_grpo", "reinforce_pp"]
ADVANTAGES = ("grpo", "rloo", "dr_grpo", "reinforce_pp")
KL_KINDS = ("k1", "k2", "k3")
LBL_MODES = ("off", "micro", "global")
REPLAY_MODES = ("off", "r3", "r2")


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
    temperature: rollout sampling temperature T. The engines report logprobs of softmax(logits / T)
    (SGLang's default) and the trainer divides the policy's (and the reference's) logits by T
    (``logprobs.apply_logits_temperature``), so ratios, entropy and KL are those of the sampled
    distribution, as in verl and slime; HPT's SFT term is then also at T.
    eval_interval: RL steps between evals (0 = only at the end); eval_n_samples per prompt;
    eval_temperature: sampling temperature of the evals (None = ``temperature``), so a hotter
    exploration temperature in rollouts is still scored at the deployment temperature.
    save_interval: RL steps between checkpoints (0 = only at the end).
    icepop_low / icepop_high: IcePop token mask on pi_old / mu (both or neither; None = off);
    seq_mask_low / seq_mask_high: drop whole samples whose geometric-mean pi_old / mu is outside.
    kl_coef / kl_kind / ref_hf: KL(pi_theta || pi_ref) loss (k1/k2/k3 estimator) against the frozen
    reference policy in HF dir ``ref_hf`` (required when kl_coef > 0; off by default).
    entropy_coef: entropy bonus (0 = off; the entropy is always logged).
    dynamic_sampling: drop groups whose rewards have zero variance (DAPO, arXiv 2503.14476 sec.
    3.2) and draw more prompts, up to ``dynamic_sampling_max_rounds`` rollouts per step; if the batch
    is still short it is filled with the dropped groups (they carry zero advantage).
    overlong_filter: no loss on truncated samples (DAPO sec. 3.4, overlong filtering).
    overlong_buffer: L_cache of DAPO's soft overlong punishment (eq. 13; 0 = off) with
    ``overlong_penalty`` as its scale, added to the verifier's reward.
    async_one_step_off: generate step s+1's rollouts while step s trains (samples one policy
    version stale, corrected by the PPO ratio against the recomputed pi_old and, with tis_cap,
    TIS against the engine's mu).
    hpt_gamma: HPT switch (arXiv 2509.04419 sec. 4): prompts whose rollout pass rate <= gamma get
    the SFT loss on the row's ``solution`` instead of the RL loss (None = off).
    pack_rollouts: pack rollout samples into rows of ``pack_max_tokens`` (0 = the rollout's
    longest prompt + max_new_tokens) instead of right-padding each sample.
    lbl_mode / lbl_alpha: load-balancing loss per optimizer step: "off" (default: RL from a
    trained MoE starts balanced, and the LBL gradient competes with the policy gradient), "micro"
    (Switch LBL per micro-batch) or "global" (exact global-batch LBL, arXiv 2501.11873).
    expert_bias_rate: aux-loss-free expert-bias update from the step's exact global counts
    (DeepSeek-V3 arXiv 2412.19437 sec. 2.1.2; 0 = off, and the router is otherwise untouched).
    routing_replay: "r3" replays the engine's routes (arXiv 2510.11370) in the old-logprob and
    training passes; "r2" replays the routes the trainer recorded in the old-logprob pass during
    the mini-batch updates; "off" routes live.
    loss_impl: "fused" (``megatron_rl.ops`` kernels for the logprobs, entropy and PPO clipping),
    "torch" (Megatron's cross entropy + ``losses/``) or "auto" (fused where the op is built).
    routing_flip_rate: request the engines' routes every step and log the top-k flip rate between
    them and the trainer's (recorded in the old-logprob pass; with R3 on the replayed routes are
    the engine's by construction, so the metric is only computed without R3).
    partial_rollout: run ``partial_rollout_extra_groups`` groups more than a step needs, abort what
    still runs once enough groups are complete and continue it next step (``rollout.partial``).
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
    eval_temperature: float | None = None
    save_interval: int = 0
    seed: int = 1234
    icepop_low: float | None = None
    icepop_high: float | None = None
    seq_mask_low: float | None = None
    seq_mask_high: float | None = None
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    ref_hf: str | None = None
    entropy_coef: float = 0.0
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 4
    overlong_filter: bool = False
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    async_one_step_off: bool = False
    hpt_gamma: float | None = None
    pack_rollouts: bool = False
    pack_max_tokens: int = 0
    lbl_mode: str = "off"
    lbl_alpha: float = 0.0
    expert_bias_rate: float = 0.0
    routing_replay: str = "off"
    routing_flip_rate: bool = False
    partial_rollout: bool = False
    partial_rollout_extra_groups: int = 1
    loss_impl: str = "auto"

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
        need(self.loss_impl in ("auto", "fused", "torch"),
             f"--loss-impl must be auto, fused or torch, got {self.loss_impl!r}")
        need(self.temperature > 0, f"--temperature must be > 0 (sampling), got {self.temperature}")
        need(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        need(self.num_steps >= 1, f"--num-steps must be >= 1, got {self.num_steps}")
        need(self.advantage in ADVANTAGES, f"--advantage must be one of {ADVANTAGES}, got {self.advantage!r}")
        need(0 <= self.eps_low < 1 and self.eps_high >= 0,
             f"need 0 <= --eps-low < 1 and --eps-high >= 0, got {self.eps_low}, {self.eps_high}")
        need(self.tis_cap is None or self.tis_cap > 0, f"--tis-cap must be > 0, got {self.tis_cap}")
        need(self.eval_interval >= 0 and self.save_interval >= 0, "intervals must be >= 0")
        need(self.eval_n_samples >= 1, f"--eval-n-samples must be >= 1, got {self.eval_n_samples}")
        need(self.eval_temperature is None or self.eval_temperature > 0,
             f"--eval-temperature must be > 0 (sampling), got {self.eval_temperature}")
        need((self.icepop_low is None) == (self.icepop_high is None),
             "--icepop-low and --icepop-high go together (IcePop keeps a <= pi_old/mu <= b)")
        need(self.icepop_low is None or 0 < self.icepop_low <= 1 <= self.icepop_high,
             f"IcePop needs 0 < --icepop-low <= 1 <= --icepop-high, got {self.icepop_low}, {self.icepop_high}")
        need((self.seq_mask_low is None) == (self.seq_mask_high is None),
             "--seq-mask-low and --seq-mask-high go together")
        need(self.seq_mask_low is None or 0 < self.seq_mask_low <= 1 <= self.seq_mask_high,
             f"sequence masking needs 0 < --seq-mask-low <= 1 <= --seq-mask-high, got "
             f"{self.seq_mask_low}, {self.seq_mask_high}")
        need(self.kl_coef >= 0, f"--kl-coef must be >= 0, got {self.kl_coef}")
        need(self.kl_kind in KL_KINDS, f"--kl-kind must be one of {KL_KINDS}, got {self.kl_kind!r}")
        need(self.kl_coef == 0 or self.ref_hf is not None,
             "--kl-coef > 0 needs a reference model: pass --ref-hf DIR (e.g. the policy you start from)")
        need(self.ref_hf is None or self.kl_coef > 0,
             "--ref-hf given but --kl-coef is 0: the reference model would be loaded and never used")
        need(self.entropy_coef >= 0, f"--entropy-coef must be >= 0, got {self.entropy_coef}")
        need(self.dynamic_sampling_max_rounds >= 1,
             f"--dynamic-sampling-max-rounds must be >= 1, got {self.dynamic_sampling_max_rounds}")
        need(not self.dynamic_sampling or self.n_samples_per_prompt >= 2,
             "--dynamic-sampling needs --n-samples-per-prompt >= 2 (a group of 1 has no variance)")
        need(0 <= self.overlong_buffer < self.max_new_tokens,
             f"--overlong-buffer must be in [0, --max-new-tokens), got {self.overlong_buffer}")
        need(self.overlong_penalty >= 0, f"--overlong-penalty must be >= 0, got {self.overlong_penalty}")
        need(self.hpt_gamma is None or 0 <= self.hpt_gamma < 1,
             f"--hpt-gamma must be in [0, 1), got {self.hpt_gamma}")
        need(self.pack_max_tokens >= 0, f"--pack-max-tokens must be >= 0, got {self.pack_max_tokens}")
        need(self.lbl_mode in LBL_MODES, f"--lbl-mode must be one of {LBL_MODES}, got {self.lbl_mode!r}")
        need(self.lbl_alpha >= 0, f"--lbl-alpha must be >= 0, got {self.lbl_alpha}")
        need((self.lbl_mode == "off") == (self.lbl_alpha == 0),
             f"--lbl-mode {self.lbl_mode} with --lbl-alpha {self.lbl_alpha}: set both (mode micro/global "
             "and alpha > 0) or neither")
        need(self.expert_bias_rate >= 0, f"--expert-bias-rate must be >= 0, got {self.expert_bias_rate}")
        need(self.routing_replay in REPLAY_MODES,
             f"--routing-replay must be one of {REPLAY_MODES}, got {self.routing_replay!r}")

        need(self.partial_rollout_extra_groups >= 1,
             f"--partial-rollout-extra-groups must be >= 1, got {self.partial_rollout_extra_groups}")
        need(not (self.partial_rollout and self.dynamic_sampling),
             "--partial-rollout with --dynamic-sampling is not supported; use one")
        need(not (self.partial_rollout and (self.routing_replay == "r3" or self.routing_flip_rate)),
             "--partial-rollout cannot give engine routes (R3 / --routing-flip-rate) for continued samples")

    @property
    def num_samples(self) -> int:
        """N = P * n samples per rollout batch."""
        return self.rollout_batch_size * self.n_samples_per_prompt

    @property
    def loss_agg(self) -> str:
        """Loss aggregation mode of ``losses.policy.aggregate_loss`` implied by the estimator."""
        return "seq-mean-token-sum-norm" if self.advantage == "dr_grpo" else "token-mean"
