"""Advantage estimators: GRPO / Dr. GRPO, RLOO, REINFORCE++(-baseline), GAE.

Legend: N responses; G prompts (groups); B, T = rows and response positions of a token batch.
Sequence-level estimators take ``rewards`` [N] with ``group_ids`` [N] (int, any labels) or
``rewards`` [G, n] (one row per prompt, ``group_ids=None``); they return advantages of the same
shape as ``rewards``. ``to_tokens`` broadcasts [N] -> [N, T] under ``loss_mask``.

Edge cases (all estimators): a group of size 1 has no baseline to compare against, so its
advantage is 0 (GRPO, RLOO). A zero-variance group (all rewards equal) has advantage exactly 0:
the deviation is 0 and the std normaliser is ``std + eps`` (never 0/0). Failed samples
(non-finite rewards) are excluded by ``group_advantages`` (the trainer's entry point).
Deliberately left out: KL-in-reward (``kl.kl_penalty_rewards`` shapes token rewards for GAE).
"""

from __future__ import annotations

import torch


def _flatten(rewards: torch.Tensor, group_ids: torch.Tensor | None):
    """-> (rewards [N] float, dense group index [N] int64, number of groups)."""
    if group_ids is None:
        if rewards.dim() != 2:
            raise ValueError(f"rewards must be [G, n] when group_ids is None, got {rewards.shape}")
        g, n = rewards.shape
        idx = torch.arange(g, device=rewards.device).repeat_interleave(n)
        return rewards.reshape(-1), idx, g
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards {rewards.shape} and group_ids {group_ids.shape} must be [N]")
    _, idx = torch.unique(group_ids, return_inverse=True)
    return rewards, idx, int(idx.max()) + 1 if idx.numel() else 0


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor | None = None):
    """Per-response group size, mean and unbiased (Bessel) std, each [N] (std = 0 for size 1)."""
    r, idx, g = _flatten(rewards, group_ids)
    r = r.double()
    size = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, idx, torch.ones_like(r))
    mean = torch.zeros_like(size).index_add_(0, idx, r) / size
    sq = torch.zeros_like(size).index_add_(0, idx, (r - mean[idx]) ** 2)
    std = (sq / (size - 1).clamp(min=1)).sqrt()
    return size[idx], mean[idx], std[idx]


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor | None = None, *,
                    normalize_std: bool = True, eps: float = 1e-6) -> tuple[torch.Tensor, dict]:
    """GRPO outcome advantages (Shao et al. 2024, arXiv 2402.03300, sec. 4.1.2).

    ``A_i = (r_i - mean_g) / (std_g + eps)`` with the unbiased group std (as TRL / verl);
    ``normalize_std=False`` gives Dr. GRPO ``A_i = r_i - mean_g`` (Liu et al. 2025,
    arXiv 2503.20783, eq. 3). Groups of size 1 get 0.

    Args: rewards [N] + group_ids [N], or [G, n]; float (any unit). eps: std floor (>= 0).
    Returns: ``(advantages, metrics)``: same shape/dtype as rewards; metrics has
        ``adv_mean``, ``adv_std``, ``zero_std_frac`` (fraction of responses in zero-variance
        groups of size > 1).
    """
    size, mean, std = group_stats(rewards, group_ids)
    adv = rewards.reshape(-1).double() - mean
    if normalize_std:
        adv = adv / (std + eps)
    adv = torch.where(size > 1, adv, torch.zeros_like(adv))
    metrics = {"adv_mean": adv.mean(), "adv_std": adv.std(correction=0),
               "zero_std_frac": ((std == 0) & (size > 1)).double().mean()}
    return adv.to(rewards.dtype).reshape(rewards.shape), metrics


def rloo_advantages(rewards: torch.Tensor,
                    group_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """RLOO leave-one-out advantages (Ahmadian et al. 2024, arXiv 2402.14740, eq. 6).

    ``A_i = r_i - 1/(n-1) * sum_{j != i} r_j = n/(n-1) * (r_i - mean_g)``; 0 for groups of
    size 1 (no other sample to form the baseline).
    Args / Returns: as ``grpo_advantages`` (metrics ``adv_mean``, ``adv_std``).
    """
    size, mean, _ = group_stats(rewards, group_ids)
    r = rewards.reshape(-1).double()
    scale = size / (size - 1).clamp(min=1)
    adv = torch.where(size > 1, scale * (r - mean), torch.zeros_like(r))
    metrics = {"adv_mean": adv.mean(), "adv_std": adv.std(correction=0)}
    return adv.to(rewards.dtype).reshape(rewards.shape), metrics


def reinforce_pp_advantages(rewards: torch.Tensor, group_ids: torch.Tensor | None = None, *,
                            token_counts: torch.Tensor | None = None,
                            eps: float = 1e-6) -> tuple[torch.Tensor, dict]:
    """REINFORCE++(-baseline) advantages (Hu 2025, arXiv 2501.03262, sec. 3.2, eq. 6-7).

    Group-mean baseline (skipped when ``group_ids`` is None and rewards are [N]), then global
    batch normalisation ``A = (a - mean_batch) / (std_batch + eps)`` with the population std.
    The batch statistics are over responses, or token-weighted (as OpenRLHF whitens over all
    response tokens) when ``token_counts`` [N] (valid tokens per response) is given. Call on
    the whole rollout batch (all DP ranks) so the statistics are global.

    Args: rewards [N] (+ group_ids [N]) or [G, n]. token_counts: optional [N] >= 0.
    Returns: ``(advantages, metrics)`` (same shape as rewards; ``batch_mean``, ``batch_std``).
    """
    if group_ids is None and rewards.dim() == 1:
        a = rewards.double()
    else:
        _, mean, _ = group_stats(rewards, group_ids)
        a = rewards.reshape(-1).double() - mean
    w = torch.ones_like(a) if token_counts is None else token_counts.reshape(-1).double()
    mu = (w * a).sum() / w.sum().clamp(min=1e-12)
    sd = ((w * (a - mu) ** 2).sum() / w.sum().clamp(min=1e-12)).sqrt()
    adv = (a - mu) / (sd + eps)
    return adv.to(rewards.dtype).reshape(rewards.shape), {"batch_mean": mu, "batch_std": sd}


def group_advantages(rewards: torch.Tensor, estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[P, n] float rewards -> ([P, n] advantages of ``estimator``, [P, n] bool ``carries``).

    A non-finite reward (NaN: the verifier failed; inf) is left out of its group's statistics
    (and of reinforce_pp's batch statistics); a sample carries loss only when its reward is
    finite and its group keeps >= 2 finite rewards (else there is no baseline). Advantages are
    0 where ``carries`` is False. Estimators: ``RLConfig.advantage``.
    """
    valid = torch.isfinite(rewards)
    carries = valid & (valid.sum(1, keepdim=True) >= 2)
    gid = torch.arange(rewards.shape[0]).unsqueeze(1).expand_as(rewards)[carries]
    r = rewards[carries]
    if estimator == "rloo":
        a = rloo_advantages(r, gid)[0]
    elif estimator == "reinforce_pp":
        a = reinforce_pp_advantages(r, gid)[0]
    else:
        a = grpo_advantages(r, gid, normalize_std=estimator == "grpo")[0]
    return torch.zeros_like(rewards).masked_scatter(carries, a), carries


def to_tokens(advantages: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Broadcast sequence advantages [N] (or [G, n]) to tokens [N, T]; 0 where masked."""
    a = advantages.reshape(-1, 1).to(torch.promote_types(advantages.dtype, torch.float32))
    return torch.where(loss_mask.bool(), a, torch.zeros_like(a))


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, loss_mask: torch.Tensor, *,
                   gamma: float = 1.0, lam: float = 0.95,
                   ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Generalised advantage estimation (Schulman et al. 2015, arXiv 1506.02438, eq. 16).

    Over the valid tokens of each row in order (masked positions, e.g. tool outputs inside a
    multi-turn response, are skipped: the recursion links each valid token to the next valid
    one), ``delta_t = r_t + gamma V_next - V_t``, ``A_t = delta_t + gamma lam A_next``, with
    ``V_next = A_next = 0`` after the last valid token (terminal). Returns ``R_t = A_t + V_t``.

    Args:
        rewards: [B, T] float token rewards (e.g. the score on the last valid token plus the
            per-token KL penalty from ``kl.kl_penalty_rewards``). values: [B, T] critic values.
        loss_mask: [B, T] bool/0-1 (rewards on masked positions are ignored).
        gamma, lam: discount and GAE lambda in [0, 1].
    Returns:
        ``(advantages [B, T], returns [B, T], metrics)``, 0 on masked positions (no grad).
    """
    mask = loss_mask.bool()
    zero = torch.zeros_like(values[:, 0])
    next_v, next_a = zero, zero
    adv = torch.zeros_like(values)
    with torch.no_grad():
        for t in range(values.shape[1] - 1, -1, -1):
            m = mask[:, t]
            delta = rewards[:, t] + gamma * next_v - values[:, t]
            a = delta + gamma * lam * next_a
            adv[:, t] = torch.where(m, a, zero)
            next_v = torch.where(m, values[:, t], next_v)
            next_a = torch.where(m, a, next_a)
        returns = torch.where(mask, adv + values, torch.zeros_like(values))
    metrics = {"adv_mean": (adv.sum() / mask.sum().clamp(min=1)).detach()}
    return adv, returns, metrics
