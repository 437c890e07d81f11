"""The loss the RL loop trains: clipped policy loss on rollout tokens + SFT NLL on demonstration
tokens (HPT) - entropy bonus + KL to the reference, over one global normaliser.

Legend: N rows (samples, or padded rows), L positions; every tensor is [N, L] in the label frame
(position t scores the token at t + 1), masked positions may hold any value.
Normaliser: every term is a token sum divided by ``global_num_tokens`` (all loss tokens, RL +
SFT, of the global mini-batch: all micro-batches, all DP ranks), except the policy term under a
sequence-level ``agg`` (``policy.aggregate_loss``); so the returned loss is this micro-batch's
share of the global mini-batch loss and the shares add up exactly.
Built from ``policy.policy_loss`` (or a drop-in such as ``ops.fused_policy_loss``),
``sft.sft_loss``, ``kl.entropy_loss`` and ``kl.kl_loss``; HPT's per-prompt switch (arXiv
2509.04419 sec. 4, eq. 7-8) is decided upstream: demonstration rows carry ``sft_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatron_rl.losses.kl import entropy_loss, kl_loss
from megatron_rl.losses.policy import policy_loss
from megatron_rl.losses.sft import sft_loss


@dataclass(frozen=True, kw_only=True)
class PolicyLossSettings:
    """The scalars of the trained loss fixed for a run (see ``RLConfig``).

    eps_low / eps_high: PPO clip range; agg: ``policy.AGG_MODES``; max_response_len: Dr. GRPO's
        constant normaliser (tokens).
    entropy_coef: entropy bonus ``-coef * sum(H) / global_num_tokens`` on RL tokens (0 = off).
    entropy_metric: compute ``train/entropy`` (needs the logits; no grad when entropy_coef = 0).
    kl_coef / kl_kind: KL-to-reference loss ``coef * sum(k) / global_num_tokens`` on RL tokens,
        active when > 0 and the batch has ``ref_logprobs`` (``losses.kl.kl_estimate``).
    loss_impl: "fused" (``megatron_rl.ops``: one-pass vocab-parallel logprobs + entropy with the
        gradient written in place, fused PPO clipping), "torch" (Megatron's
        ``vocab_parallel_cross_entropy`` + ``losses/``), or "auto" = fused where the compiled op
        exists for the model's device (``ops.resolve_loss_impl``).
    """

    eps_low: float
    eps_high: float
    agg: str
    max_response_len: int
    entropy_coef: float = 0.0
    entropy_metric: bool = True
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    loss_impl: str = "auto"


def rl_loss(logprobs: torch.Tensor, loss_mask: torch.Tensor, advantages: torch.Tensor,
            old_logprobs: torch.Tensor, settings: PolicyLossSettings, *, global_num_tokens,
            global_num_seqs, sft_mask: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
            ref_logprobs: torch.Tensor | None = None, is_weights: torch.Tensor | None = None,
            policy_fn: Callable = policy_loss) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's share of the trained RL loss and its additive metrics.

    Args:
        logprobs: [N, L] float log pi_theta(label) in nats, with grad.
        loss_mask: [N, L] 0/1, every token whose loss counts (RL and SFT).
        advantages / old_logprobs: [N, L] of the RL tokens (``policy.policy_loss``).
        settings: ``PolicyLossSettings``. global_num_tokens / global_num_seqs: the global
            normalisers (``policy.aggregate_loss``; tokens = RL + SFT tokens).
        sft_mask: [N, L] 0/1, demonstration tokens (HPT): NLL instead of the policy loss.
        entropy: [N, L] nats (with grad when ``settings.entropy_coef`` != 0), or None.
        ref_logprobs: [N, L] reference logprobs (KL term when ``settings.kl_coef`` > 0), or None.
        is_weights: [N, L] TIS weights on the policy term, or None.
        policy_fn: ``policy.policy_loss`` or a function of the same signature and metrics
            (``ops.fused_policy_loss``).
    Returns:
        ``(loss [], metrics)``, metrics local float sums that add over micro-batches: ``tokens``
        (RL tokens), ``clipped`` (clipped RL tokens), ``all_tokens`` (RL + SFT), ``sft_tokens``,
        ``ratio_dev_max`` (max |ratio - 1| over RL tokens, a max, 0 without RL tokens), and
        ``entropy_sum`` (over all loss tokens) / ``kl_sum`` (estimator over RL tokens) when those
        terms are present.
    Raises:
        ValueError: from ``policy_fn`` (bad agg) or ``kl_loss`` (bad kind).
    """
    mask = loss_mask.bool()
    sft = sft_mask.bool() & mask if sft_mask is not None else torch.zeros_like(mask)
    rl = mask & ~sft
    loss, m = policy_fn(logprobs, old_logprobs, advantages, rl, eps_low=settings.eps_low,
                        eps_high=settings.eps_high, is_weights=is_weights, agg=settings.agg,
                        global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs,
                        max_response_len=settings.max_response_len)
    n_rl, n_sft = float(rl.sum()), float(sft.sum())
    out = {"tokens": 0.0, "clipped": 0.0, "ratio_dev_max": 0.0, "all_tokens": n_rl + n_sft,
           "sft_tokens": n_sft}
    if n_rl > 0:
        out.update(tokens=n_rl, clipped=float(m["clip_frac_low"] + m["clip_frac_high"]) * n_rl,
                   ratio_dev_max=max(float(m["ratio_max"]) - 1.0, 1.0 - float(m["ratio_min"])))
    if n_sft:  # HPT: token-sum NLL of the demonstrations over the same global normaliser
        loss = loss + sft_loss(logprobs, sft, global_num_tokens=global_num_tokens)[0]
    if entropy is not None:
        out["entropy_sum"] = float(entropy.detach()[mask].sum())
        if settings.entropy_coef != 0.0:
            loss = loss + entropy_loss(rl, entropies=entropy, coef=settings.entropy_coef,
                                       global_num_tokens=global_num_tokens)[0]
    if settings.kl_coef > 0 and ref_logprobs is not None:
        kl, km = kl_loss(logprobs, ref_logprobs, rl, coef=settings.kl_coef, kind=settings.kl_kind,
                         global_num_tokens=global_num_tokens)
        loss = loss + kl
        out["kl_sum"] = float(km["kl"]) * n_rl
    return loss, out
