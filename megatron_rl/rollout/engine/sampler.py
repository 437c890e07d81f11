"""Batched token sampler of the embedded engine: SGLang's order of operations, per-row parameters.

Legend: B = rows sampled together, V = vocab. Logits are float32 [B, V] on the model's device.

Order (SGLang: python/sglang/srt/sampling/sampling_batch_info.py `apply_logits_bias`, penaltylib/*,
python/sglang/srt/layers/sampler.py `top_k_top_p_min_p_sampling_from_probs_torch`):
 1. penalties over the request's OUTPUT tokens so far (counts c[v]):
    repetition (multiplicative: l < 0 -> l * r, else l / r, where c[v] > 0),
    frequency (l -= f * c[v]), presence (l -= p * [c[v] > 0]),
    min_new_tokens (l = -inf for EOS ids and stop_token_ids while fewer than min_new_tokens were made);
 2. logit_bias (l[v] += b[v]);
 3. greedy rows (temperature < 1e-6 or top_k == 1): argmax, first index on ties;
    other rows: probs = softmax(l / temperature), sorted descending; entries of rank >= top_k, those
    past the top_p mass (cumsum - p > top_p) and those below min_p * max(probs) are zeroed;
    the kept mass is sampled by inverse CDF (over the sorted order; over the vocab order for rows
    without top_k/top_p/min_p, skipping the sort) with ONE uniform draw from the request's own
    torch.Generator per step, so a row's token depends only on its own logits and seed, never on
    what else shares the batch (SGLang hashes (seed, position) for the same property).
Reported logprobs: log_softmax(l / temperature) after steps 1-2 (before top-k/p/min-p, which only
truncate what is sampled); greedy rows use temperature 1; `original=True` (SGLANG_RETURN_ORIGINAL_LOGPROB)
gives log_softmax(l) of the adjusted, unscaled logits.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .sampling import SamplingParams


class Row(Protocol):
    """What the sampler needs from a request: params, tokens made so far, its generator."""

    params: SamplingParams
    output_ids: list[int]
    generator: torch.Generator


def adjust_logits(logits: torch.Tensor, rows: list[Row], eos_ids: set[int]) -> torch.Tensor:
    """Steps 1-2 on float32 logits [B, V]; returns a new tensor (the input is left alone)."""
    out = logits.clone()
    vocab = out.shape[1]
    for i, r in enumerate(rows):
        p = r.params
        if p.needs_penalties and r.output_ids:
            counts = torch.bincount(torch.tensor(r.output_ids, device=out.device), minlength=vocab)[:vocab]
            counts = counts.to(out.dtype)
            seen = counts > 0
            row = out[i]
            if p.repetition_penalty != 1.0:
                row = torch.where(seen, torch.where(row < 0, row * p.repetition_penalty,
                                                    row / p.repetition_penalty), row)
            out[i] = row - p.frequency_penalty * counts - p.presence_penalty * seen.to(out.dtype)
        if len(r.output_ids) < p.min_new_tokens:
            banned = sorted((set(eos_ids) | set(p.stop_token_ids)) & set(range(vocab)))
            if banned:
                out[i, banned] = float("-inf")
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=out.device)
            out[i, ids] += torch.tensor(list(p.logit_bias.values()), dtype=out.dtype, device=out.device)
    return out


def filtered_probs(adjusted: torch.Tensor, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3's distribution for sampled rows: (kept probs sorted descending [B, V], their vocab ids [B, V]).

    Greedy rows are treated with temperature 1 and no truncation (their result is unused)."""
    dev, vocab = adjusted.device, adjusted.shape[1]
    temps = torch.tensor([1.0 if r.params.greedy else r.params.temperature for r in rows], device=dev)
    probs = torch.softmax(adjusted / temps.unsqueeze(1), dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    cum = torch.cumsum(sorted_p, dim=-1)
    rank = torch.arange(vocab, device=dev).unsqueeze(0)
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in rows], device=dev)
    top_p = torch.tensor([r.params.top_p for r in rows], device=dev)
    min_p = torch.tensor([r.params.min_p for r in rows], device=dev)
    drop = (rank >= top_k.unsqueeze(1)) | ((cum - sorted_p) > top_p.unsqueeze(1))
    drop |= sorted_p < (sorted_p[:, :1] * min_p.unsqueeze(1))
    return sorted_p.masked_fill(drop, 0.0), order


def sample(logits: torch.Tensor, rows: list[Row], eos_ids: set[int], original: bool = False
           ) -> tuple[list[int], torch.Tensor]:
    """One token per row from float32 logits [B, V].

    Returns (token ids, logprob rows float32 [B, V] -- the reported distribution, see module doc).
    Each non-greedy row draws exactly one uniform from its own generator.
    """
    adjusted = adjust_logits(logits, rows, eos_ids)
    greedy = [r.params.greedy for r in rows]
    temps = torch.tensor([1.0 if g else r.params.temperature for g, r in zip(greedy, rows)],
                         device=adjusted.device)
    logprobs = torch.log_softmax(adjusted if original else adjusted / temps.unsqueeze(1), dim=-1)
    tokens = torch.argmax(adjusted, dim=-1).tolist()
    plain = [i for i, (g, r) in enumerate(zip(greedy, rows)) if not g and not _truncates(r.params)]
    cut = [i for i, (g, r) in enumerate(zip(greedy, rows)) if not g and _truncates(r.params)]
    if plain:  # no top-k/p/min-p: inverse CDF over the vocab order (no sort needed)
        probs = torch.softmax(adjusted[plain] / temps[plain].unsqueeze(1), dim=-1)
        drawn = _inverse_cdf(probs, [rows[i] for i in plain])
        for i, t in zip(plain, drawn.tolist()):
            tokens[i] = t
    if cut:
        sub = [rows[i] for i in cut]
        kept, order = filtered_probs(adjusted[cut], sub)
        drawn = order.gather(1, _inverse_cdf(kept, sub).unsqueeze(1)).squeeze(1)
        for i, t in zip(cut, drawn.tolist()):
            tokens[i] = t
    return tokens, logprobs


def _truncates(p: SamplingParams) -> bool:
    return p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0


def _inverse_cdf(probs: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Column index per row of probs [B, V] (unnormalised, >= 0), one uniform per row from its generator."""
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.tensor([float(torch.rand((), generator=r.generator)) for r in rows], dtype=cdf.dtype,
                     device=cdf.device)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    # never land on a zero-probability column (u * total can round up to the total)
    last = probs.shape[1] - 1 - torch.argmax((probs.flip(1) > 0).to(torch.int8), dim=1)
    return torch.minimum(idx, last)
