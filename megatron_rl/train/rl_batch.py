"""Rollout samples -> padded RL training micro-batches, and the Megatron forward step of the policy loss.

Legend: N samples in the rollout batch, B rows per micro-batch, S = padded length (prompt +
response, the rollout's longest), every per-token tensor is [B, S] in the *label frame*: position
t scores ``tokens[t + 1]`` (``labels[t]``), so ``loss_mask[t] = 1`` exactly where ``labels[t]``
is a response token of a sample whose reward is valid. Position S - 1 and padding are masked.

Loss normalisation (see ``losses/policy.py`` and ``engine.masked_token_loss``): ``policy_loss``
returns this micro-batch's share ``L_mb`` of the mini-batch loss, given the mini-batch's global
normalisers (all micro-batches, all DP ranks). Megatron (``calculate_per_token_loss``) sums the
returned losses' gradients over micro-batches and DP ranks and divides them by the all-reduced
sum of the returned token counts, which is ``global_num_tokens``; so the forward step returns
``(L_mb * global_num_tokens, local_num_tokens)`` and the optimizer sees ``grad sum_mb L_mb``,
the exact global-batch loss for every aggregation mode.
Left out: sequence packing (rows are right-padded), entropy (needs full-vocab logits).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from megatron_rl.losses.policy import policy_loss
from megatron_rl.train.logprobs import causal_mask


@dataclass(kw_only=True)
class Sample:
    """One rollout sample as broadcast from rank 0. logprobs: the engine's, [len(output_ids)]."""

    prompt_ids: list[int]
    output_ids: list[int]
    rollout_logprobs: list[float]
    reward: float  # NaN when the verifier failed
    finish_reason: str
    weight_version: str | None


class PromptStream:
    """Shuffled, epoch-wise prompt cursor with a JSON-able state (the checkpoint's data cursor)."""

    def __init__(self, rows: list[dict], seed: int):
        if not rows:
            raise ValueError("empty prompt set")
        self.rows, self.seed, self.epoch, self.pos = rows, seed, 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[dict]:
        out = []
        while len(out) < k:
            if self.pos == len(self.rows):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm()
            out.append(self.rows[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._perm()


def collate(samples: list[Sample], advantages: torch.Tensor, seq_len: int, pad_id: int) -> dict:
    """Right-padded rows in the label frame.

    Args: samples (B of them); advantages [B] float; seq_len S >= every len(prompt + output).
    Returns: tokens/labels/position_ids [B, S] int64, attention_mask [B, 1, S, S] bool (causal),
        loss_mask [B, S] float, rollout_logprobs [B, S] float32, advantages [B, S] float32.
    """
    b = len(samples)
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(b, seq_len)
    rollout_lp = torch.zeros(b, seq_len)
    for i, s in enumerate(samples):
        p, t = len(s.prompt_ids), len(s.output_ids)
        tokens[i, : p + t] = torch.tensor(s.prompt_ids + s.output_ids, dtype=torch.long)
        if t and s.reward == s.reward:  # NaN reward (failed verifier): no loss on this sample
            loss_mask[i, p - 1: p + t - 1] = 1.0
            rollout_lp[i, p - 1: p + t - 1] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    adv = advantages.float()[:, None] * loss_mask
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": torch.arange(seq_len).expand(b, seq_len).contiguous(),
            "attention_mask": causal_mask(b, seq_len), "rollout_logprobs": rollout_lp,
            "advantages": adv}


def microbatches(samples: list[Sample], advantages: torch.Tensor, rows: int, seq_len: int,
                 pad_id: int) -> list[dict]:
    """Cut samples into micro-batches of ``rows`` rows; the last is padded with fully masked rows."""
    dummy = Sample(prompt_ids=[pad_id], output_ids=[], rollout_logprobs=[], reward=0.0,
                   finish_reason="pad", weight_version=None)
    pad = (-len(samples)) % rows
    samples = list(samples) + [dummy] * pad
    adv = torch.cat([advantages.float(), torch.zeros(pad)])
    return [collate(samples[i: i + rows], adv[i: i + rows], seq_len, pad_id)
            for i in range(0, len(samples), rows)]


@dataclass(frozen=True, kw_only=True)
class PolicyLossSettings:
    """The scalars of ``policy_loss`` fixed for a run (see ``RLConfig``)."""

    eps_low: float
    eps_high: float
    agg: str
    max_response_len: int


@dataclass
class LossStats:
    """Per optimizer step: token count, clipped-token count, max |ratio - 1| (local, then reduced)."""

    tokens: float = 0.0
    clipped: float = 0.0
    ratio_dev_max: float = 0.0
    _parts: list = field(default_factory=list, repr=False)

    def add(self, metrics: dict, n: float) -> None:
        if n <= 0:
            return
        self.tokens += n
        self.clipped += float(metrics["clip_frac_low"] + metrics["clip_frac_high"]) * n
        dev = max(float(metrics["ratio_max"]) - 1.0, 1.0 - float(metrics["ratio_min"]))
        self.ratio_dev_max = max(self.ratio_dev_max, dev)

    def reduce(self) -> dict:
        """Collective over DP and PP: ``train/clip_frac`` and ``ratio_max_abs_dev``."""
        from megatron.core import parallel_state as ps

        sums = torch.tensor([self.tokens, self.clipped], dtype=torch.float64)
        dev = torch.tensor([self.ratio_dev_max], dtype=torch.float64)
        for group in (ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group()):
            torch.distributed.all_reduce(sums, group=group)
            torch.distributed.all_reduce(dev, op=torch.distributed.ReduceOp.MAX, group=group)
        return {"train/clip_frac": float(sums[1] / sums[0].clamp(min=1)),
                "ratio_max_abs_dev": float(dev[0])}


def policy_forward_step(settings: PolicyLossSettings, global_num_tokens: int, global_num_seqs: int,
                        stats: LossStats):
    """Megatron ``forward_step_func`` computing token logprobs and the clipped policy loss.

    Batch keys: those of ``collate`` plus ``old_logprobs`` [B, S] and optional ``is_weights``.
    The loss function returns ``(L_mb * global_num_tokens, local tokens int, {"lm_loss": ...})``
    (see the module docstring), ``lm_loss = [L_mb * global_num_tokens, local tokens]`` so that
    ``engine.train_step``'s ``train/loss`` is the global mini-batch loss.
    """

    def loss_func(batch: dict, output: torch.Tensor):
        logprobs = -output.float()  # [B, S]: CE of labels under the current policy
        mask = batch["loss_mask"].to(logprobs.device)
        weights = batch.get("is_weights")
        loss, m = policy_loss(
            logprobs, batch["old_logprobs"].to(logprobs.device), batch["advantages"].to(logprobs.device),
            mask, eps_low=settings.eps_low, eps_high=settings.eps_high,
            is_weights=None if weights is None else weights.to(logprobs.device), agg=settings.agg,
            global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs,
            max_response_len=settings.max_response_len)
        n_local = mask.sum()
        stats.add(m, float(n_local))
        scaled = loss * global_num_tokens
        return scaled, n_local.to(torch.int), {"lm_loss": torch.stack([scaled.detach(), n_local])}

    def step(data_iterator, model):
        batch = next(data_iterator)
        dev = next(model.parameters()).device
        output = model(batch["tokens"].to(dev), batch["position_ids"].to(dev),
                       batch["attention_mask"].to(dev), labels=batch["labels"].to(dev))
        return output, lambda out: loss_func(batch, out)

    return step
