"""Fused PPO log-ratio / clipping (``torch.ops.megatron_rl.ppo_token_loss``) as a policy loss.

Legend: B sequences (rows), L positions; every per-token tensor is [B, L]. One O(B*L) op computes,
per token, the mismatch correction (TIS weight min(rho, C), IcePop band on rho, per-row sequence
mask on the geometric-mean rho; rho = pi_old / mu) and the clipped surrogate (clip-higher,
dual clip, log-ratio clamp +-20) with its derivative d loss_t / d logp_t, plus the counters the
loop logs; the aggregation over tokens / sequences is ``losses.policy.aggregate_loss`` (autograd).
Semantics equal ``ops.reference.ppo_reference`` (= ``losses.mismatch`` then ``losses.policy``).
Left out: GSPO (ratio_level="sequence") and denominator="current": use ``losses.policy``.
"""

from __future__ import annotations

import torch

from megatron_rl.losses.policy import aggregate_loss
from megatron_rl.ops._ext import require

COUNTERS = ("valid", "kept", "clip_low", "clip_high", "dual_clip", "tis_clip", "masked",
            "ratio_sum", "ratio_max", "ratio_min", "approx_kl", "abs_logp_diff", "mismatch_k3")


class _PpoSurrogate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, old, rollout, adv, mask, is_weights, settings):
        loss, dlogp, keep, counters = torch.ops.megatron_rl.ppo_token_loss(
            logprobs, old, rollout, adv, mask, is_weights, *settings)
        ctx.save_for_backward(dlogp)
        ctx.mark_non_differentiable(keep, counters)
        return loss, keep, counters

    @staticmethod
    def backward(ctx, g_loss, _g_keep, _g_counters):
        (dlogp,) = ctx.saved_tensors
        return g_loss * dlogp, None, None, None, None, None, None


def _settings(eps_low, eps_high, dual_clip_c, tis_cap, icepop_bounds, seq_bounds) -> tuple:
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    if tis_cap is not None and tis_cap <= 0:
        raise ValueError(f"tis_cap must be > 0, got {tis_cap}")
    for name, b in (("icepop_bounds", icepop_bounds), ("seq_bounds", seq_bounds)):
        if b is not None and not 0 < b[0] <= b[1]:
            raise ValueError(f"{name} must satisfy 0 < low <= high, got {b}")
    ice = icepop_bounds or (0.0, 0.0)
    seq = seq_bounds or (0.0, 0.0)
    return (float(eps_low), float(eps_high), float(dual_clip_c or 0.0), float(tis_cap or 0.0),
            float(ice[0]), float(ice[1]), float(seq[0]), float(seq[1]))


def counters_to_metrics(counters: torch.Tensor, dtype=torch.float32) -> dict:
    """The op's counter sums -> ``policy_loss``-style local means (over kept tokens) and
    ``mismatch/*`` means (over the input loss-mask tokens), as detached 0-dim tensors."""
    c = dict(zip(COUNTERS, counters.double().tolist()))
    kept, valid = max(c["kept"], 1.0), max(c["valid"], 1.0)
    big = torch.finfo(dtype).max
    vals = {
        "clip_frac_low": c["clip_low"] / kept, "clip_frac_high": c["clip_high"] / kept,
        "dual_clip_frac": c["dual_clip"] / kept, "ratio_mean": c["ratio_sum"] / kept,
        "ratio_max": c["ratio_max"] if c["kept"] else -big,
        "ratio_min": c["ratio_min"] if c["kept"] else big,
        "approx_kl": c["approx_kl"] / kept,
        "mismatch/abs_logp_diff": c["abs_logp_diff"] / valid, "mismatch/k3_kl": c["mismatch_k3"] / valid,
        "mismatch/masked_frac": c["masked"] / valid, "mismatch/tis_clip_frac": c["tis_clip"] / valid,
    }
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in vals.items()}


def fused_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      loss_mask: torch.Tensor, *, rollout_logprobs: torch.Tensor | None = None,
                      is_weights: torch.Tensor | None = None, eps_low: float = 0.2,
                      eps_high: float = 0.2, dual_clip_c: float | None = None,
                      tis_cap: float | None = None, icepop_bounds: tuple[float, float] | None = None,
                      seq_bounds: tuple[float, float] | None = None, agg: str = "token-mean",
                      global_num_tokens=None, global_num_seqs=None,
                      max_response_len: int | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient loss with the rollout/trainer mismatch correction, fused.

    Per token (valid = ``loss_mask``): ``rho = exp(old - rollout)``; dropped if IcePop
    ``rho`` is outside ``icepop_bounds`` or the row's ``exp(mean log rho)`` is outside
    ``seq_bounds``; weight ``w = min(rho, tis_cap) * is_weights``; ``r = exp(clamp(logp - old,
    +-20))``; ``l = w * max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``, with
    ``dual_clip_c`` and A < 0: ``min(l, -A c)`` before weighting. PPO (Schulman et al. 2017,
    eq. 7), DAPO clip-higher (arXiv 2503.14476 eq. 10), dual clip (arXiv 1912.09729 eq. 5), TIS
    (Yao et al. 2025), IcePop (Ling team 2025).

    Args:
        logprobs: [B, L] float32/64 log pi_theta in nats, with grad. old_logprobs, advantages,
            rollout_logprobs (optional, needed by tis_cap / icepop_bounds / seq_bounds),
            is_weights (optional, detached): [B, L], the same dtype. loss_mask: [B, L] bool/0-1.
        agg, global_num_tokens, global_num_seqs, max_response_len: ``losses.policy.aggregate_loss``
            (over the kept tokens; the normalisers are the caller's).
    Returns:
        (loss [] with grad to ``logprobs``, metrics): ``policy_loss``'s metric names (local
        means over kept tokens; pg_loss) plus mismatch/{abs_logp_diff, k3_kl, masked_frac,
        tis_clip_frac} over the input loss-mask tokens, and ``kept_mask`` [B, L] bool.
    Raises:
        ValueError: bad settings; RuntimeError: the op is not built for this device, or a wrong
            dtype / device / shape (the message names the argument).
    """
    require(logprobs.device)
    settings = _settings(eps_low, eps_high, dual_clip_c, tis_cap, icepop_bounds, seq_bounds)
    iw = None if is_weights is None else is_weights.detach()
    per_token, keep, counters = _PpoSurrogate.apply(
        logprobs, old_logprobs.detach(), None if rollout_logprobs is None else rollout_logprobs.detach(),
        advantages, loss_mask, iw, settings)
    loss = aggregate_loss(per_token, keep, agg, global_num_tokens=global_num_tokens,
                          global_num_seqs=global_num_seqs, max_response_len=max_response_len)
    metrics = counters_to_metrics(counters, logprobs.dtype)
    metrics["pg_loss"] = loss.detach()
    metrics["kept_mask"] = keep
    return loss, metrics
