"""SFT loss (token-mean NLL), also HPT's SFT term.

Legend: B rows, T positions; tensors [B, T]. Normaliser convention as ``policy.aggregate_loss``
(token-mean over the GLOBAL batch via ``global_num_tokens``).
HPT (Lv et al. 2025, "Towards a unified view of LLM post-training", arXiv 2509.04419, sec. 4,
eq. 7-8): ``L = alpha * L_RL + beta * L_SFT`` with ``(alpha, beta) = (0, 1)`` when the prompt's
rollout pass rate ``P <= gamma`` and ``(1, 0)`` otherwise; the switch is decided per prompt in
``train.grpo.select_training_samples`` and the combined loss over demonstration (``sft_mask``)
and rollout tokens is ``rl_loss.rl_loss``.
"""

from __future__ import annotations

import torch

from megatron_rl.losses.policy import aggregate_loss, masked_mean


def sft_loss(logprobs: torch.Tensor, loss_mask: torch.Tensor, *,
             global_num_tokens=None) -> tuple[torch.Tensor, dict]:
    """Token-mean negative log-likelihood ``-sum(m * logprobs) / global_num_tokens``.

    Args: logprobs [B, T] float log pi_theta(target) in nats; loss_mask [B, T] bool/0-1;
        global_num_tokens: valid tokens in the global batch (None = local count).
    Returns: ``(loss [], {"sft_nll": local token-mean NLL})``.
    """
    mask = loss_mask.bool()
    loss = aggregate_loss(-logprobs, mask, "token-mean", global_num_tokens=global_num_tokens)
    return loss, {"sft_nll": masked_mean(-logprobs.detach(), mask)}
