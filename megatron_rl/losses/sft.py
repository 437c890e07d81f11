"""SFT loss and HPT (Hybrid Post-Training): per prompt, SFT on the demonstration or RL on rollouts.

Legend: B rows, T positions, G prompts; tensors [B, T] unless stated. Normaliser convention as
``policy.aggregate_loss`` (token-mean over the GLOBAL batch via ``global_num_tokens``).
HPT (Lv et al. 2025, "Towards a unified view of LLM post-training", arXiv 2509.04419, sec. 4,
eq. 7-8): ``L = alpha * L_RL + beta * L_SFT`` with ``(alpha, beta) = (0, 1)`` when the prompt's
rollout pass rate ``P <= gamma`` and ``(1, 0)`` otherwise. The switch is any ``SwitchFn``.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_rl.losses.policy import aggregate_loss, masked_mean, policy_loss

SwitchFn = Callable[[torch.Tensor], torch.Tensor]
"""pass_rate [G] float in [0, 1] -> use_sft [G] bool (True: SFT on the demonstration)."""


def threshold_switch(gamma: float = 0.0) -> SwitchFn:
    """The paper's switch: SFT when ``P <= gamma`` (gamma = 0: only prompts never solved)."""
    return lambda pass_rate: pass_rate <= gamma


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


def group_pass_rate(correct: torch.Tensor, group_ids: torch.Tensor,
                    num_groups: int) -> torch.Tensor:
    """Per-prompt pass rate [G] float64 from correctness [N] bool and dense ids [N] in [0, G)."""
    z = torch.zeros(num_groups, dtype=torch.float64, device=correct.device)
    hits = z.index_add(0, group_ids, correct.double())
    size = z.index_add(0, group_ids, torch.ones_like(correct, dtype=torch.float64))
    return hits / size.clamp(min=1)


def hpt_masks(loss_mask: torch.Tensor, group_ids: torch.Tensor, is_demo: torch.Tensor,
              pass_rate: torch.Tensor, switch: SwitchFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``loss_mask`` into (sft_mask, rl_mask), each [B, T] bool.

    Args: group_ids [B] dense prompt index in [0, G); is_demo [B] bool (row is the demonstration);
        pass_rate [G] (from ``group_pass_rate`` on the rollouts). Demonstration rows of prompts
        where ``switch`` says SFT go to sft_mask; rollout rows of the other prompts go to rl_mask;
        everything else is dropped.
    """
    use_sft = switch(pass_rate).bool()[group_ids]  # [B]
    mask, demo = loss_mask.bool(), is_demo.bool()
    sft = mask & (demo & use_sft)[:, None]
    rl = mask & (~demo & ~use_sft)[:, None]
    return sft, rl


def hpt_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
             sft_mask: torch.Tensor, rl_mask: torch.Tensor, *, global_num_tokens=None,
             **policy_kwargs) -> tuple[torch.Tensor, dict]:
    """HPT loss: SFT NLL on ``sft_mask`` + clipped policy loss on ``rl_mask`` (from ``hpt_masks``).

    Both terms are token sums over one normaliser, ``global_num_tokens`` = number of tokens in
    ``sft_mask | rl_mask`` over the global batch (None = local), so the result is a token mean
    over all active tokens and micro-batch contributions add up.
    Args: logprobs / old_logprobs / advantages [B, T] as ``policy.policy_loss`` (values on
        demonstration rows of old_logprobs/advantages are ignored); policy_kwargs: clip options
        of ``policy_loss`` (eps_low, eps_high, dual_clip_c, ratio_level, denominator, is_weights).
    Returns: ``(loss [], metrics)``: the SFT and policy metrics plus ``hpt/sft_token_frac``.
    """
    sft_m, rl_m = sft_mask.bool(), rl_mask.bool()
    n = (sft_m | rl_m).sum() if global_num_tokens is None else global_num_tokens
    l_sft, m_sft = sft_loss(logprobs, sft_m, global_num_tokens=n)
    l_rl, m_rl = policy_loss(logprobs, old_logprobs, advantages, rl_m, agg="token-mean",
                             global_num_tokens=n, **policy_kwargs)
    both = (sft_m | rl_m).sum().clamp(min=1)
    metrics = {**m_sft, **m_rl, "hpt/sft_token_frac": sft_m.sum().double() / both}
    return l_sft + l_rl, metrics
