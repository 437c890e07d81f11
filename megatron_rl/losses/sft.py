"""SFT loss and HPT's switch (Hybrid Post-Training): per prompt, SFT on the demonstration or RL
on the rollouts.

Legend: B rows, T positions, G prompts; tensors [B, T] unless stated. Normaliser convention as
``policy.aggregate_loss`` (token-mean over the GLOBAL batch via ``global_num_tokens``).
HPT (Lv et al. 2025, "Towards a unified view of LLM post-training", arXiv 2509.04419, sec. 4,
eq. 7-8): ``L = alpha * L_RL + beta * L_SFT`` with ``(alpha, beta) = (0, 1)`` when the prompt's
rollout pass rate ``P <= gamma`` and ``(1, 0)`` otherwise. The switch is any ``SwitchFn``
(``train.grpo.select_training_samples`` applies ``threshold_switch`` to ``group_pass_rate``);
the combined loss over demonstration (``sft_mask``) and rollout tokens is ``rl_loss.rl_loss``.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_rl.losses.policy import aggregate_loss, masked_mean

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
