"""Train / inference mismatch correction between the rollout engine and the trainer.

Legend: B rows, T response positions; tensors [B, T]. The rollout engine (SGLang) samples with
``rollout_logprobs`` (mu); the trainer recomputes ``old_logprobs`` (pi_old) for the same tokens.
Kernels differ, so ``rho = pi_old / mu = exp(old_logprobs - rollout_logprobs)`` != 1. Fixes:
  - TIS: per-token weight ``min(rho, C)`` (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training", https://fengyao.notion.site/off-policy-rl), passed to
    ``policy.policy_loss(is_weights=...)``;
  - IcePop (Ling team 2025, "Small leak can sink a great ship: IcePop"): tokens with ``rho`` outside
    ``[a, b]`` are dropped from ``loss_mask``;
  - sequence masking: rows whose geometric-mean ``rho`` over valid tokens is outside
    ``[lo, hi]`` are dropped whole.
Apply before computing the global normalisers (they count the surviving tokens / rows).
"""

from __future__ import annotations

import torch

from megatron_rl.losses.policy import masked_mean


def mismatch_correction(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                        loss_mask: torch.Tensor, *, tis_cap: float | None = None,
                        icepop_bounds: tuple[float, float] | None = None,
                        seq_bounds: tuple[float, float] | None = None,
                        ) -> tuple[torch.Tensor | None, torch.Tensor, dict]:
    """Importance weights and masks correcting the rollout/trainer mismatch (all off by default).

    Args:
        old_logprobs: [B, T] trainer log-probs of the sampled tokens (nats, no grad).
        rollout_logprobs: [B, T] engine log-probs of the same tokens.
        loss_mask: [B, T] bool/0-1.
        tis_cap: C > 0 for TIS weights ``min(rho, C)``; None = no weights.
        icepop_bounds: (a, b), 0 < a <= 1 <= b: keep tokens with ``a <= rho <= b``.
        seq_bounds: (lo, hi): keep rows with ``lo <= exp(mean_t log rho) <= hi``.
    Returns:
        ``(is_weights [B, T] or None, loss_mask [B, T] bool, metrics)``. Metrics (always, local,
        over the *input* valid tokens): ``mismatch/abs_logp_diff`` (mean |old - rollout|, nats),
        ``mismatch/k3_kl`` (k3 estimate of KL(mu || pi_old) on samples of mu),
        ``mismatch/masked_frac`` (fraction of valid tokens dropped), ``mismatch/tis_clip_frac``.
    Raises:
        ValueError: non-positive cap or inverted bounds.
    """
    mask = loss_mask.bool()
    with torch.no_grad():
        log_rho = torch.where(mask, old_logprobs.double() - rollout_logprobs.double(), 0.0)
        rho = log_rho.exp()
        keep = mask.clone()
        if icepop_bounds is not None:
            a, b = icepop_bounds
            if not 0 < a <= b:
                raise ValueError(f"icepop_bounds must satisfy 0 < a <= b, got {icepop_bounds}")
            keep &= (rho >= a) & (rho <= b)
        if seq_bounds is not None:
            lo, hi = seq_bounds
            if not 0 < lo <= hi:
                raise ValueError(f"seq_bounds must satisfy 0 < lo <= hi, got {seq_bounds}")
            seq = (log_rho.sum(-1) / mask.sum(-1).clamp(min=1)).exp()  # [B] geometric mean
            keep &= ((seq >= lo) & (seq <= hi))[:, None]
        weights = None
        clip_frac = torch.zeros((), dtype=torch.float64, device=rho.device)
        if tis_cap is not None:
            if tis_cap <= 0:
                raise ValueError(f"tis_cap must be > 0, got {tis_cap}")
            weights = rho.clamp(max=tis_cap).to(old_logprobs.dtype)
            clip_frac = masked_mean((rho > tis_cap).double(), mask)
        metrics = {
            "mismatch/abs_logp_diff": masked_mean(log_rho.abs(), mask),
            "mismatch/k3_kl": masked_mean(torch.expm1(log_rho) - log_rho, mask),
            "mismatch/masked_frac": masked_mean((mask & ~keep).double(), mask),
            "mismatch/tis_clip_frac": clip_frac,
        }
    return weights, keep, metrics
