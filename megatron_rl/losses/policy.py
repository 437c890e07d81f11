"""Clipped policy-gradient surrogate (PPO / GRPO / DAPO / GSPO) and the shared loss aggregation.

Legend: B sequences (rows) in this micro-batch, T response positions; every tensor is [B, T]
unless stated; ``loss_mask`` is 1 (True) where a token's loss counts.

Unified view (UPGE, Lv et al. 2025, arXiv 2509.04419, eq. 5):
``grad = 1_stable * (1 / pi_ref) * A_hat * grad pi_theta``. Here ``pi_ref`` is the
``denominator``: ``"old"`` (pi_old, PPO ratio) or ``"current"`` (pi_theta itself:
ratio = exp(logp - sg(logp)) == 1, so grad = A * grad log pi, the SFT-like / REINFORCE form);
``1_stable`` is the clip mask (clip-higher, dual clip); ``A_hat`` comes from ``advantages.py``.

Global normaliser convention (all modes): the returned loss is this micro-batch's *contribution*
to the global-batch loss, so summing it over every micro-batch of every data-parallel rank gives
the global-batch loss exactly. The trainer computes the normalisers once per optimizer step,
before the micro-batch loop, over the whole global batch (all micro-batches, all DP ranks:
``all_reduce(SUM)`` of the local counts over the DP group):
``global_num_tokens = sum(loss_mask)``, ``global_num_seqs = #rows with >= 1 valid token``
(after any mismatch masking, see ``mismatch.py``). Megatron's default path averages gradients
over DP ranks and divides by the number of micro-batches, so the trainer multiplies the returned
loss by ``dp_size * num_microbatches`` (or, with ``calculate_per_token_loss=True``, returns the
loss unscaled with a token count whose global sum is 1). Left ``None`` they default to the local
counts, which is right for a single un-split batch.
Deliberately left out: value-function loss (PPO critic), token-level entropy (see ``kl.py``).
"""

from __future__ import annotations

from typing import Literal

import torch

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_MAX_LOG_RATIO = 20.0  # exp() overflow guard; gradients are zero beyond it


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask`` (any shape, same as ``x``); 0 when the mask is empty."""
    m = mask.bool()
    return torch.where(m, x, torch.zeros_like(x)).sum() / m.sum().clamp(min=1)


def _count(value, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).clamp(min=1)


def aggregate_loss(per_token: torch.Tensor, loss_mask: torch.Tensor, mode: AggMode = "token-mean",
                   *, global_num_tokens=None, global_num_seqs=None,
                   max_response_len: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to this micro-batch's share of the global-batch loss.

    Modes (masked entries never contribute, even if NaN/inf):
      - ``"token-mean"``: ``sum(m * l) / global_num_tokens``.
      - ``"seq-mean-token-mean"``: ``sum_b [sum_t m*l / n_b] / global_num_seqs`` with
        ``n_b = sum_t m[b]``; fully masked rows add 0 (and are not counted in the normaliser).
      - ``"seq-mean-token-sum-norm"``: ``sum(m * l) / (global_num_seqs * max_response_len)``;
        the constant divisor of Dr. GRPO (Liu et al. 2025, arXiv 2503.20783, sec. 3.1).

    Args:
        per_token: [B, T] float.  loss_mask: [B, T] bool/0-1.
        global_num_tokens / global_num_seqs: int or 0-dim tensor, see the module docstring;
            None = local count. A normaliser < 1 is treated as 1.
        max_response_len: the generation length limit (a constant, not this batch's T);
            required for ``"seq-mean-token-sum-norm"``.
    Raises:
        ValueError: unknown mode, or missing ``max_response_len``.
    """
    m = loss_mask.bool()
    masked = torch.where(m, per_token, torch.zeros_like(per_token))
    if mode == "token-mean":
        n = m.sum() if global_num_tokens is None else global_num_tokens
        return masked.sum() / _count(n, masked)
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {AGG_MODES}")
    n_seq = (m.sum(-1) > 0).sum() if global_num_seqs is None else global_num_seqs
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / m.sum(-1).clamp(min=1).to(masked.dtype)
        return per_seq.sum() / _count(n_seq, masked)
    if max_response_len is None:
        raise ValueError("'seq-mean-token-sum-norm' needs max_response_len (a constant)")
    return masked.sum() / (_count(n_seq, masked) * max_response_len)


def _log_ratio(logprobs, old_logprobs, mask, ratio_level, denominator):
    """Per-token log importance ratio [B, T] (0 on masked tokens)."""
    zero = torch.zeros_like(logprobs)
    if denominator == "current":
        return torch.where(mask, logprobs - logprobs.detach(), zero)
    if denominator != "old":
        raise ValueError(f"denominator must be 'old' or 'current', got {denominator!r}")
    if old_logprobs is None:
        raise ValueError("denominator='old' needs old_logprobs")
    log_ratio = torch.where(mask, logprobs - old_logprobs, zero)
    if ratio_level == "token":
        return log_ratio
    if ratio_level != "sequence":
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    # GSPO-token (arXiv 2507.18071 eq. 13): value = log s_b (mean token log-ratio of the row),
    # grad = grad log pi_t, i.e. s_{b,t} = sg[s_b] * pi_t / sg[pi_t].
    seq = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return torch.where(mask, seq.detach() + logprobs - logprobs.detach(), zero)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None,
                advantages: torch.Tensor, loss_mask: torch.Tensor, *,
                eps_low: float = 0.2, eps_high: float = 0.2, dual_clip_c: float | None = None,
                ratio_level: Literal["token", "sequence"] = "token",
                denominator: Literal["old", "current"] = "old",
                is_weights: torch.Tensor | None = None, agg: AggMode = "token-mean",
                global_num_tokens=None, global_num_seqs=None,
                max_response_len: int | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate loss (to minimise), PPO eq. 7 with clip-higher, dual clip and GSPO.

    Per token: ``r = exp(log_ratio)``; ``l = max(-A r, -A clip(r, 1-eps_low, 1+eps_high))``
    (PPO, Schulman et al. 2017; asymmetric eps = DAPO clip-higher, arXiv 2503.14476 eq. 10);
    with ``dual_clip_c`` (> 1) and A < 0: ``l = min(l, -A c)`` (dual clip, Ye et al. 2020,
    arXiv 1912.09729 eq. 5). ``ratio_level="sequence"`` is GSPO (Zheng et al. 2025,
    arXiv 2507.18071 eq. 5-7):
    the ratio of row b is the geometric mean ``s_b = exp(mean_t (logp - old_logp))`` over its
    valid tokens, clipped per sequence (GSPO-token form, which equals GSPO when advantages are
    constant along the row). ``log_ratio`` is clamped to +-20 before exp.

    Args:
        logprobs: [B, T] float, log pi_theta(token) in nats, with grad.
        old_logprobs: [B, T] log pi_old (no grad); may be None when denominator="current".
        advantages: [B, T] (broadcast sequence advantages with ``advantages.to_tokens``).
        loss_mask: [B, T] bool/0-1; masked positions may hold any value (even NaN).
        is_weights: optional [B, T] per-token weight (e.g. TIS from ``mismatch.py``), detached.
        agg, global_num_tokens, global_num_seqs, max_response_len: see ``aggregate_loss``.
    Returns:
        ``(loss [] float, metrics)``; metrics are detached 0-dim tensors, local means over the
        valid tokens: pg_loss, clip_frac_low (A<0, r<1-eps_low), clip_frac_high (A>0,
        r>1+eps_high), dual_clip_frac, ratio_mean/max/min, approx_kl (k3 of KL(old || theta)).
    Raises:
        ValueError: bad ``denominator`` / ``ratio_level`` / ``agg`` or ``dual_clip_c <= 1``.
    """
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    mask = loss_mask.bool()
    adv = torch.where(mask, advantages, torch.zeros_like(advantages)).to(logprobs.dtype)
    log_ratio = _log_ratio(logprobs, old_logprobs, mask, ratio_level, denominator)
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(pg1, pg2)
    dual = torch.zeros_like(mask)
    if dual_clip_c is not None:
        pg3 = -adv * dual_clip_c
        dual = mask & (adv < 0) & (pg3 < per_token)
        per_token = torch.where(adv < 0, torch.minimum(per_token, pg3), per_token)
    if is_weights is not None:
        per_token = per_token * is_weights.detach().to(per_token.dtype)
    loss = aggregate_loss(per_token, mask, agg, global_num_tokens=global_num_tokens,
                          global_num_seqs=global_num_seqs, max_response_len=max_response_len)
    with torch.no_grad():
        r, lr = ratio.detach(), log_ratio.detach()
        big = torch.finfo(r.dtype).max
        metrics = {
            "pg_loss": loss.detach(),
            "clip_frac_low": masked_mean(((adv < 0) & (r < 1 - eps_low)).to(r.dtype), mask),
            "clip_frac_high": masked_mean(((adv > 0) & (r > 1 + eps_high)).to(r.dtype), mask),
            "dual_clip_frac": masked_mean(dual.to(r.dtype), mask),
            "ratio_mean": masked_mean(r, mask),
            "ratio_max": torch.where(mask, r, torch.full_like(r, -big)).max(),
            "ratio_min": torch.where(mask, r, torch.full_like(r, big)).min(),
            "approx_kl": masked_mean(torch.expm1(lr) - lr, mask),
        }
    return loss, metrics
