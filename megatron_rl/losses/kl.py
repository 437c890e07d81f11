"""KL regularisation (loss term or reward shaping) and the entropy bonus. Both off by default.

Legend: B rows, T response positions, V vocabulary; tensors [B, T] unless stated.
KL estimators (Schulman 2020, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html)
of KL(pi_theta || pi_ref) from samples of pi_theta, with ``log_r = ref_logprobs - logprobs``:
``k1 = -log_r`` (unbiased, high variance, can be < 0), ``k2 = log_r**2 / 2`` (biased, low
variance), ``k3 = (exp(log_r) - 1) - log_r`` (unbiased, >= 0; the GRPO KL term, arXiv
2402.03300 eq. 4). Loss aggregation and the global normaliser follow ``policy.aggregate_loss``.
Deliberately left out: vocab-parallel entropy; under tensor parallelism the caller computes
entropies with vocab-parallel reductions and passes ``entropies``.
"""

from __future__ import annotations

from typing import Literal

import torch

from megatron_rl.losses.policy import AggMode, aggregate_loss, masked_mean

KLKind = Literal["k1", "k2", "k3"]


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLKind = "k3", *,
                clamp: float | None = None) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate [B, T] (nats); differentiable in both inputs.

    Args: logprobs, ref_logprobs [B, T] log-probs of the sampled tokens. kind: k1 | k2 | k3.
        clamp: optional bound on ``|log_r|`` before the estimator (stability; biases the value).
    Raises: ValueError for an unknown kind.
    """
    log_r = ref_logprobs - logprobs
    if clamp is not None:
        log_r = log_r.clamp(-clamp, clamp)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r ** 2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r}; expected k1, k2 or k3")


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, loss_mask: torch.Tensor, *,
            coef: float = 0.0, kind: KLKind = "k3", agg: AggMode = "token-mean",
            global_num_tokens=None, global_num_seqs=None,
            max_response_len: int | None = None) -> tuple[torch.Tensor, dict]:
    """KL penalty as a loss term: ``coef * aggregate(kl_estimate(logprobs, ref_logprobs))``.

    Args: see ``kl_estimate`` and ``policy.aggregate_loss``; coef >= 0 (0 = off: the loss is a
        zero constant, still with metrics).
    Returns: ``(loss [], {"kl": local token-mean of the estimate, "kl_loss": loss})``.
    """
    mask = loss_mask.bool()
    per_token = kl_estimate(logprobs, ref_logprobs, kind)
    if coef == 0.0:
        loss = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    else:
        loss = coef * aggregate_loss(per_token, mask, agg, global_num_tokens=global_num_tokens,
                                     global_num_seqs=global_num_seqs,
                                     max_response_len=max_response_len)
    return loss, {"kl": masked_mean(per_token.detach(), mask), "kl_loss": loss.detach()}


def kl_penalty_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                       loss_mask: torch.Tensor, *, coef: float = 0.0,
                       kind: KLKind = "k1") -> tuple[torch.Tensor, dict]:
    """KL as reward shaping (InstructGPT, arXiv 2203.02155 eq. 2; REINFORCE++ eq. 4).

    ``token_rewards[b, t] = -coef * kl_t`` on valid tokens, plus ``scores[b]`` added on the
    last valid token of row b (rows without valid tokens get nothing). No gradient.

    Args: scores [B] sequence rewards; logprobs (the behaviour/old policy) and ref_logprobs
        [B, T]; loss_mask [B, T]; coef >= 0; kind: estimator (k1 is the usual choice here).
    Returns: ``(token_rewards [B, T] float, {"kl": local token-mean estimate})``.
    """
    mask = loss_mask.bool()
    with torch.no_grad():
        kl = torch.where(mask, kl_estimate(logprobs, ref_logprobs, kind), 0.0)
        rewards = -coef * kl
        pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, pos, -1).max(-1).values  # [B]
        has = last >= 0
        rows = torch.arange(mask.shape[0], device=mask.device)[has]
        rewards[rows, last[has]] += scores[has].to(rewards.dtype)
    return rewards, {"kl": masked_mean(kl, mask)}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) over the last dim: [..., V] -> [...], float32+."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp = torch.log_softmax(x, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_loss(loss_mask: torch.Tensor, *, entropies: torch.Tensor | None = None,
                 logits: torch.Tensor | None = None, coef: float = 0.0,
                 agg: AggMode = "token-mean", global_num_tokens=None, global_num_seqs=None,
                 max_response_len: int | None = None) -> tuple[torch.Tensor, dict]:
    """Entropy bonus as a loss: ``-coef * aggregate(H)`` (PPO eq. 9); coef 0 = off.

    Args: loss_mask [B, T]; exactly one of ``entropies`` [B, T] (nats) or ``logits`` [B, T, V].
    Returns: ``(loss [], {"entropy": local token-mean entropy, "entropy_loss": loss})``.
    Raises: ValueError unless exactly one of entropies / logits is given.
    """
    if (entropies is None) == (logits is None):
        raise ValueError("pass exactly one of entropies or logits")
    ent = entropies if entropies is not None else entropy_from_logits(logits)
    mask = loss_mask.bool()
    if coef == 0.0:
        loss = torch.zeros((), dtype=ent.dtype, device=ent.device)
    else:
        loss = -coef * aggregate_loss(ent, mask, agg, global_num_tokens=global_num_tokens,
                                      global_num_seqs=global_num_seqs,
                                      max_response_len=max_response_len)
    return loss, {"entropy": masked_mean(ent.detach(), mask), "entropy_loss": loss.detach()}


class _SumOverGroup(torch.autograd.Function):
    """all_reduce(SUM) with identity backward: the loss is replicated on every rank of the group,
    so each rank's local summand receives the gradient of the (shared) total (Megatron's
    ``reduce_from_tensor_model_parallel_region``)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def vocab_parallel_entropy(logits: torch.Tensor, group=None) -> torch.Tensor:
    """Entropy (nats) of softmax over a vocabulary sharded on the last dim across ``group``.

    Args: logits [..., V / tp] float (this rank's vocab shard; masked entries may be the dtype's
        lowest finite value, never -inf); group: the TP process group (None or size 1: local).
    Returns: [...] float32+ entropy ``log Z - sum_v p_v (x_v - m)`` with ``m`` the global max
        (detached: the entropy does not depend on the shift), differentiable in ``logits``;
        identical on every rank of the group. Collective over ``group`` (3 all-reduces).
    """
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    multi = group is not None and torch.distributed.get_world_size(group) > 1
    m = x.detach().max(dim=-1, keepdim=True).values  # [..., 1]
    if multi:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    z = x - m
    e = torch.exp(z)
    sums = torch.stack([e.sum(-1), (e * z).sum(-1)])  # [2, ...]: Z, sum e*z
    if multi:
        sums = _SumOverGroup.apply(sums, group)
    return torch.log(sums[0]) - sums[1] / sums[0]
