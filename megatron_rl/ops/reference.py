"""Pure-PyTorch references (and fallbacks) of the fused ops in ``ops/vocab.py`` and ``ops/ppo.py``.

``logprobs_entropy_reference``: the float64-capable dense formula on full (gathered) logits.
``vocab_parallel_logprobs_entropy_torch``: the same quantities over a TP-sharded vocabulary with
plain torch collectives (max + sums), the fallback where the compiled op is missing.
``ppo_reference``: ``losses.mismatch.mismatch_correction`` then ``losses.policy.policy_loss``,
the composition the fused ``ppo_token_loss`` op must equal.
"""

from __future__ import annotations

import torch

from megatron_rl.losses.kl import _SumOverGroup, vocab_parallel_entropy
from megatron_rl.losses.mismatch import mismatch_correction
from megatron_rl.losses.policy import policy_loss


def logprobs_entropy_reference(logits: torch.Tensor, target: torch.Tensor, *,
                               temperature: float = 1.0, vocab_size: int | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs, entropy) [...] of softmax(logits[..., :vocab_size] / T), in the logits' dtype
    (float32 for 16-bit logits). logits: [..., V] full vocabulary; target: int64 [...]."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if vocab_size is not None:
        x = x[..., :vocab_size]
    logp = torch.log_softmax(x / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1), entropy


def vocab_parallel_logprobs_entropy_torch(logits: torch.Tensor, target: torch.Tensor, *,
                                          group=None, temperature: float = 1.0
                                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch twin of ``ops.vocab.vocab_parallel_logprobs_entropy`` (every column counts,
    vocab_start = rank * V_local). Differentiable by autograd; allocates several [T, V_local]
    buffers. Collective over ``group`` (entropy: 3 all-reduces, logprobs: 3)."""
    x = (logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits) / temperature
    entropy = vocab_parallel_entropy(x, group)
    multi = group is not None and torch.distributed.get_world_size(group) > 1
    v_local = x.shape[-1]
    start = torch.distributed.get_rank(group) * v_local if multi else 0
    m = x.detach().max(dim=-1).values
    if multi:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    local = target - start
    inside = (local >= 0) & (local < v_local)
    z_t = x.gather(-1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    sums = torch.stack([torch.exp(x - m.unsqueeze(-1)).sum(-1), torch.where(inside, z_t, 0.0)])
    if multi:
        sums = _SumOverGroup.apply(sums, group)
    return sums[1] - m - torch.log(sums[0]), entropy


def ppo_reference(logprobs, old_logprobs, advantages, loss_mask, *, rollout_logprobs=None,
                  is_weights=None, eps_low=0.2, eps_high=0.2, dual_clip_c=None, tis_cap=None,
                  icepop_bounds=None, seq_bounds=None, **agg_kwargs) -> tuple[torch.Tensor, dict]:
    """``mismatch_correction`` (TIS / IcePop / sequence mask on pi_old / mu) then ``policy_loss``
    on the kept tokens. Same arguments as ``ops.ppo.fused_policy_loss``; returns (loss, metrics)
    with policy_loss's metrics plus mismatch/*."""
    mask = loss_mask.bool()
    metrics = {}
    if rollout_logprobs is not None:
        w, mask_kept, metrics = mismatch_correction(old_logprobs, rollout_logprobs, mask,
                                                    tis_cap=tis_cap, icepop_bounds=icepop_bounds,
                                                    seq_bounds=seq_bounds)
        if w is not None:
            is_weights = w if is_weights is None else is_weights * w
        mask = mask_kept
    loss, m = policy_loss(logprobs, old_logprobs, advantages, mask, eps_low=eps_low,
                          eps_high=eps_high, dual_clip_c=dual_clip_c, is_weights=is_weights,
                          **agg_kwargs)
    return loss, m | metrics
