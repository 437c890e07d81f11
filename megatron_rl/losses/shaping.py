"""Reward shaping applied before the advantages: DAPO's soft overlong punishment; and the RL
loop's rewards -> advantages step (shaping + ``advantages.group_advantages``).

Legend: N samples, P prompts x n samples each; lengths are response tokens.
"""

from __future__ import annotations

import torch

from megatron_rl.losses.advantages import group_advantages


def overlong_penalty(response_lengths: torch.Tensor, max_len: int, buffer_len: int,
                     factor: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Soft overlong punishment, DAPO (Yu et al. 2025, arXiv 2503.14476) eq. 13.

    With L_max = ``max_len`` and L_cache = ``buffer_len``, a response of |y| tokens gets
    ``0`` if |y| <= L_max - L_cache, ``((L_max - L_cache) - |y|) / L_cache`` inside the buffer
    (linear from 0 to -1), and ``-1`` beyond L_max; the result is scaled by ``factor`` and added to
    the verifier's reward by the caller.

    Args:
        response_lengths: [N] int/float, generated tokens per sample.
        max_len: L_max (the generation limit, ``--max-new-tokens``), > 0.
        buffer_len: L_cache, 0 < L_cache < L_max.
        factor: penalty scale (>= 0).
    Returns:
        ``(penalty [N] float64 in [-factor, 0], {"rollout/overlong_penalty_mean",
        "rollout/overlong_penalized_frac"})``.
    Raises:
        ValueError: ``max_len <= 0``, ``buffer_len`` outside (0, max_len), or ``factor < 0``.
    """
    if max_len <= 0 or not 0 < buffer_len < max_len:
        raise ValueError(f"need max_len > 0 and 0 < buffer_len < max_len, got {max_len}, {buffer_len}")
    if factor < 0:
        raise ValueError(f"factor must be >= 0, got {factor}")
    y = response_lengths.double()
    expected = float(max_len - buffer_len)
    pen = ((expected - y) / buffer_len).clamp(min=-1.0, max=0.0) * factor
    metrics = {"rollout/overlong_penalty_mean": float(pen.mean()) if pen.numel() else 0.0,
               "rollout/overlong_penalized_frac": float((pen < 0).double().mean()) if pen.numel() else 0.0}
    return pen, metrics


def shaped_group_advantages(rewards: torch.Tensor, response_lengths: torch.Tensor, estimator: str, *,
                            max_len: int, overlong_buffer: int = 0,
                            overlong_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Verifier rewards (+ the soft overlong punishment when ``overlong_buffer`` > 0) ->
    group-wise advantages (``advantages.group_advantages``: non-finite rewards left out).

    Args:
        rewards: [P, n] float64 verifier rewards (NaN: the verification failed).
        response_lengths: [P, n] int generated tokens. estimator: ``RLConfig.advantage``.
        max_len / overlong_buffer / overlong_factor: L_max, L_cache (0 = off) and the scale of
            ``overlong_penalty``.
    Returns:
        ``(advantages [P, n] float64, carries [P, n] bool, metrics)``: carries is False for a
        non-finite reward or a group with < 2 finite rewards (advantage 0); metrics
        ``reward/failure_rate``, ``reward/no_loss_groups`` (groups without a carrying sample)
        and, with the punishment, ``overlong_penalty``'s.
    Raises:
        ValueError: see ``overlong_penalty``.
    """
    metrics = {}
    if overlong_buffer:
        pen, metrics = overlong_penalty(response_lengths.reshape(-1), max_len, overlong_buffer, overlong_factor)
        rewards = rewards + pen.view_as(rewards)
    adv, carries = group_advantages(rewards, estimator)
    metrics["reward/failure_rate"] = float((~torch.isfinite(rewards)).double().mean())
    metrics["reward/no_loss_groups"] = float((~carries.any(1)).sum())
    return adv, carries, metrics
