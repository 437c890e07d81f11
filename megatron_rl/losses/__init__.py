"""Pure tensor losses for post-training, organised as the unified policy-gradient estimator
(UPGE, arXiv 2509.04419): ``grad = 1_stable * (1 / pi_ref) * A_hat * grad pi_theta``.

  advantages.py  A_hat: GRPO / Dr. GRPO, RLOO, REINFORCE++, GAE
  policy.py      1_stable and pi_ref: clipped surrogate (PPO, DAPO clip-higher, dual clip, GSPO)
                 + the global-normaliser loss aggregation shared by every loss
  kl.py          KL (k1/k2/k3) as loss or reward shaping; entropy bonus
  mismatch.py    rollout-vs-trainer mismatch: TIS weights, IcePop / sequence masks
  sft.py         SFT NLL (HPT's SFT term)
  rl_loss.py     the loss the RL loop trains: policy + SFT (HPT) + entropy bonus + KL, one normaliser
Every function takes tensors and scalars only and returns ``(value, metrics)``.
"""

from megatron_rl.losses.advantages import (gae_advantages, grpo_advantages, reinforce_pp_advantages,
                                           rloo_advantages, to_tokens)
from megatron_rl.losses.kl import (entropy_from_logits, entropy_loss, kl_estimate, kl_loss,
                                   kl_penalty_rewards)
from megatron_rl.losses.mismatch import mismatch_correction
from megatron_rl.losses.policy import AGG_MODES, aggregate_loss, masked_mean, policy_loss
from megatron_rl.losses.rl_loss import PolicyLossSettings, rl_loss
from megatron_rl.losses.sft import sft_loss
from megatron_rl.losses.shaping import overlong_penalty, shaped_group_advantages

__all__ = [
    "AGG_MODES", "PolicyLossSettings", "aggregate_loss", "entropy_from_logits", "entropy_loss",
    "gae_advantages", "grpo_advantages", "kl_estimate", "kl_loss", "kl_penalty_rewards",
    "masked_mean", "mismatch_correction", "overlong_penalty", "policy_loss", "reinforce_pp_advantages",
    "rl_loss", "rloo_advantages", "sft_loss", "shaped_group_advantages", "to_tokens",
]
