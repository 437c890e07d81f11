"""Rollout samples -> padded RL training micro-batches, and the Megatron forward step of the policy loss.

Legend: N samples in the rollout batch, B rows per micro-batch, S = padded length (prompt +
response, the rollout's longest), every per-token tensor is [B, S] in the *label frame*: position
t scores ``tokens[t + 1]`` (``labels[t]``), so ``loss_mask[t] = 1`` exactly where ``labels[t]``
is a response token of a sample whose reward is valid (for a multi-turn sample, a policy token:
``Sample.loss_mask`` is 0 on the environment's tokens). Position S - 1 and padding are masked.

Loss normalisation (see ``losses/policy.py`` and ``engine.masked_token_loss``): ``policy_loss``
returns this micro-batch's share ``L_mb`` of the mini-batch loss, given the mini-batch's global
normalisers (all micro-batches, all DP ranks). Megatron (``calculate_per_token_loss``) sums the
returned losses' gradients over micro-batches and DP ranks and divides them by the all-reduced
sum of the returned token counts, which is ``global_num_tokens``; so the forward step returns
``(L_mb * global_num_tokens, local_num_tokens)`` and the optimizer sees ``grad sum_mb L_mb``,
the exact global-batch loss for every aggregation mode.
Sequence packing (``pack_microbatches``): whole samples per row with block-diagonal attention
and restarting position ids; the loss regroups tokens per sample via ``seq_ids``.
Left out: context parallelism, splitting a sample across rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from megatron_rl.data.packing import first_fit_decreasing, packed_attention_mask
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
    is_demo: bool = False  # HPT: a demonstration (SFT loss on output_ids), not a rollout
    group: int = -1  # prompt index of the sample within its rollout batch (-1: unknown)
    routed_experts: object = None  # engine routes int [len(prompt + output) - 1, L, K] (R3), or None
    # multi-turn (rollout.multiturn): per output token 1 = policy, 0 = environment (None: all policy)
    loss_mask: list[int] | None = None
    turns: list | None = None  # [start, end) of each policy turn in output_ids
    env_outcomes: list[str] | None = None  # the environment's outcome per turn
    token_versions: list[int] | None = None  # partial rollouts: policy version of each output token


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


def _place(s: Sample, adv: float, out: dict, r: int, off: int, j: int) -> None:
    """Write sample ``s`` at row r, columns [off, off + len) of the [B, S] tensors in ``out``."""
    p, t = len(s.prompt_ids), len(s.output_ids)
    n = p + t
    out["tokens"][r, off: off + n] = torch.tensor(s.prompt_ids + s.output_ids, dtype=torch.long)
    out["position_ids"][r, off: off + n] = torch.arange(n)
    out["seq_ids"][r, off: off + n] = j
    if t and s.reward == s.reward:  # NaN reward (failed verifier): no loss on this sample
        lo, hi = off + p - 1, off + n - 1  # label frame: position p-1 scores output_ids[0]
        out["loss_mask"][r, lo:hi] = 1.0
        out["advantages"][r, lo:hi] = float(adv)
        if s.loss_mask is not None:  # multi-turn: no loss on environment tokens
            if len(s.loss_mask) != t:
                raise ValueError(f"sample loss_mask has {len(s.loss_mask)} entries for {t} output tokens")
            keep = torch.tensor(s.loss_mask, dtype=torch.float32)
            out["loss_mask"][r, lo:hi] *= keep
            out["advantages"][r, lo:hi] *= keep
        if s.is_demo:
            out["sft_mask"][r, lo:hi] = 1.0
        elif s.rollout_logprobs:
            out["rollout_logprobs"][r, lo:hi] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)


def _empty(b: int, seq_len: int, pad_id: int) -> dict:
    return {"tokens": torch.full((b, seq_len), pad_id, dtype=torch.long),
            "position_ids": torch.arange(seq_len).repeat(b, 1),
            "seq_ids": torch.full((b, seq_len), -1, dtype=torch.long),
            "loss_mask": torch.zeros(b, seq_len), "advantages": torch.zeros(b, seq_len),
            "rollout_logprobs": torch.zeros(b, seq_len), "sft_mask": torch.zeros(b, seq_len)}


def _finish(out: dict, attention_mask: torch.Tensor, any_demo: bool) -> dict:
    labels = torch.zeros_like(out["tokens"])
    labels[:, :-1] = out["tokens"][:, 1:]
    out.update(labels=labels, attention_mask=attention_mask)
    if not any_demo:
        del out["sft_mask"]
    return out


def collate(samples: list[Sample], advantages: torch.Tensor, seq_len: int, pad_id: int) -> dict:
    """Right-padded rows in the label frame, one sample per row.

    Args: samples (B of them); advantages [B] float; seq_len S >= every len(prompt + output).
    Returns: tokens/labels/position_ids [B, S] int64, attention_mask [B, 1, S, S] bool (causal),
        loss_mask [B, S] float, rollout_logprobs [B, S] float32, advantages [B, S] float32
        (0 off the loss mask), seq_ids [B, S] int64 (row index on the sample's tokens, -1 on
        padding), and ``sft_mask`` [B, S] float (1 on demonstration tokens) only if some sample
        has ``is_demo`` (its tokens are in loss_mask too; its rollout_logprobs stay 0).
    """
    b = len(samples)
    out = _empty(b, seq_len, pad_id)
    for i, s in enumerate(samples):
        _place(s, float(advantages[i]), out, i, 0, i)
    return _finish(out, causal_mask(b, seq_len), any(s.is_demo for s in samples))


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


def pack_microbatches(samples: list[Sample], advantages: torch.Tensor, max_tokens: int,
                      pad_id: int, *, rows: int = 1) -> list[dict]:
    """Sequence packing: whole samples into rows of ``max_tokens`` by first-fit-decreasing.

    Every micro-batch has ``rows`` rows of S = ``max_tokens`` (the last one is completed with
    empty rows), keys as ``collate`` with, per row, a block-diagonal causal ``attention_mask``
    [B, 1, S, S] (a token attends only to earlier tokens of its own sample) and ``position_ids``
    restarting at 0 for each sample, so per-token logprobs equal the unpacked ones (to float
    rounding: Megatron's RoPE in the BSHD layout ignores position_ids, but rotary attention
    depends only on relative offsets, which the block-diagonal mask keeps per sample). The last
    token of a sample (whose label is the next sample's first token) is never in ``loss_mask``.
    Extra keys: ``seq_ids`` [B, S] int64 = index of the sample within this micro-batch (-1 on
    padding), which the loss uses to aggregate per sample (all ``agg`` modes and GSPO work);
    ``sample_index``: list of (input index, row, offset, length), one per sample, in
    ``seq_ids`` order (map per-sample data, e.g. routing-replay routes, with it).
    Raises: ValueError if a sample is longer than ``max_tokens`` or ``rows`` < 1.
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    bins = first_fit_decreasing([len(s.prompt_ids) + len(s.output_ids) for s in samples],
                                max_tokens)
    bins += [[] for _ in range((-len(bins)) % rows)]
    out = []
    for lo in range(0, len(bins), rows):
        mb, index, masks = _empty(rows, max_tokens, pad_id), [], []
        for r, members in enumerate(bins[lo: lo + rows]):
            cu = [0]
            for i in members:
                _place(samples[i], float(advantages[i]), mb, r, cu[-1], len(index))
                n = len(samples[i].prompt_ids) + len(samples[i].output_ids)
                index.append((i, r, cu[-1], n))
                cu.append(cu[-1] + n)
            masks.append(packed_attention_mask(torch.tensor(cu), max_tokens))
        demo = any(samples[i].is_demo for i, *_ in index)
        out.append(_finish(mb, torch.cat(masks), demo) | {"sample_index": index})
    return out


def local_counts(mb: dict) -> tuple[int, int]:
    """(loss tokens, samples with >= 1 loss token) of one micro-batch, padded or packed."""
    mask, ids = mb["loss_mask"], mb["seq_ids"]
    seqs = torch.unique(ids[(mask > 0) & (ids >= 0)]).numel()
    return int(mask.sum()), int(seqs)


@dataclass(frozen=True, kw_only=True)
class PolicyLossSettings:
    """The scalars of the policy loss fixed for a run (see ``RLConfig``).

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


@dataclass
class LossStats:
    """Per optimizer step, local sums then reduced: RL/all/SFT token counts, clipped tokens,
    entropy and KL sums, max |ratio - 1|."""

    tokens: float = 0.0  # RL tokens (the policy metrics' denominator)
    clipped: float = 0.0
    ratio_dev_max: float = 0.0
    all_tokens: float = 0.0  # RL + SFT tokens
    sft_tokens: float = 0.0
    entropy_sum: float = 0.0  # over all loss tokens
    entropy_on: float = 0.0
    kl_sum: float = 0.0  # over RL tokens
    kl_on: float = 0.0

    def add(self, metrics: dict, n: float) -> None:
        """Policy metrics (local means over ``n`` RL tokens) of one micro-batch."""
        if n <= 0:
            return
        self.tokens += n
        self.clipped += float(metrics["clip_frac_low"] + metrics["clip_frac_high"]) * n
        dev = max(float(metrics["ratio_max"]) - 1.0, 1.0 - float(metrics["ratio_min"]))
        self.ratio_dev_max = max(self.ratio_dev_max, dev)

    def reduce(self) -> dict:
        """Collective over DP and PP: ``train/clip_frac``, ``ratio_max_abs_dev``, and when
        present ``train/entropy`` (token-mean over loss tokens), ``train/kl`` (token-mean of the
        estimator over RL tokens), ``train/sft_token_frac`` (SFT / all loss tokens)."""
        from megatron.core import parallel_state as ps

        sums = torch.tensor([self.tokens, self.clipped, self.all_tokens, self.sft_tokens,
                             self.entropy_sum, self.entropy_on, self.kl_sum, self.kl_on],
                            dtype=torch.float64)
        dev = torch.tensor([self.ratio_dev_max], dtype=torch.float64)
        for group in (ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group()):
            torch.distributed.all_reduce(sums, group=group)
            torch.distributed.all_reduce(dev, op=torch.distributed.ReduceOp.MAX, group=group)
        tok, clipped, all_tok, sft, ent, ent_on, kl, kl_on = sums.tolist()
        out = {"train/clip_frac": clipped / max(tok, 1.0), "ratio_max_abs_dev": float(dev[0])}
        if ent_on > 0:
            out["train/entropy"] = ent / max(all_tok, 1.0)
        if kl_on > 0:
            out["train/kl"] = kl / max(tok, 1.0)
        if sft > 0:
            out["train/sft_token_frac"] = sft / max(all_tok, 1.0)
        return out


_PER_TOKEN = ("loss_mask", "advantages", "old_logprobs", "is_weights", "ref_logprobs", "sft_mask")


def _per_sample_view(batch: dict, tensors: dict) -> dict:
    """Per-token tensors [B, S] -> [N, L] with one sample per row (packed batches; ``seq_ids``).

    Sample j's tokens, in order, fill row j from column 0; the rest of the row is masked out of
    ``loss_mask`` (other tensors hold arbitrary values there). Gradients flow through.
    """
    ids = batch["seq_ids"].to(tensors["loss_mask"].device).reshape(-1)  # [B*S]
    n = int(ids.max()) + 1 if ids.numel() else 0
    pos = torch.nonzero(ids >= 0).squeeze(-1)  # row-major positions, samples contiguous
    sid = ids[pos]
    counts = torch.bincount(sid, minlength=n)  # [N]
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(pos.numel(), device=pos.device) - starts[sid]
    width = int(counts.max()) if n else 1
    index = torch.zeros(n, width, dtype=torch.long, device=pos.device)
    valid = torch.zeros(n, width, dtype=torch.bool, device=pos.device)
    index[sid, col], valid[sid, col] = pos, True
    out = {k: v.reshape(-1)[index] for k, v in tensors.items()}
    out["loss_mask"] = out["loss_mask"] * valid
    return out


def _logprobs_entropy(output: torch.Tensor, labels: torch.Tensor, settings: PolicyLossSettings,
                      fused: bool = False):
    """(logprobs [B, S] float, entropy [B, S] or None) from the model output: CE [B, S] when the
    model was called with labels, else logits [B, S, V / tp] (fused: ``ops`` one-pass op, the
    entropy returned only when the metric or the bonus needs it)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_rl.losses.kl import vocab_parallel_entropy

    if output.dim() == 2:
        return -output.float(), None
    group = ps.get_tensor_model_parallel_group()
    if fused:
        from megatron_rl.ops import vocab_parallel_logprobs_entropy

        logprobs, entropy = vocab_parallel_logprobs_entropy(output, labels.to(output.device), group=group)
        if settings.entropy_coef == 0.0:
            entropy = entropy.detach() if settings.entropy_metric else None
        return logprobs, entropy
    if settings.entropy_coef != 0.0:
        entropy = vocab_parallel_entropy(output, group)
    else:
        with torch.no_grad():
            entropy = vocab_parallel_entropy(output, group)
    # after the entropy: Megatron's CE shifts float32 logits in place
    ce = tensor_parallel.vocab_parallel_cross_entropy(output, labels.to(output.device))  # [B, S]
    return -ce.float(), entropy


def _policy_term(settings: PolicyLossSettings, t: dict, rl, n_glob, s_glob, fused: bool):
    """The clipped surrogate of the RL tokens: ``losses.policy.policy_loss`` or the fused op."""
    kw = dict(eps_low=settings.eps_low, eps_high=settings.eps_high, is_weights=t.get("is_weights"),
              agg=settings.agg, global_num_tokens=n_glob, global_num_seqs=s_glob,
              max_response_len=settings.max_response_len)
    if fused:
        from megatron_rl.ops import fused_policy_loss

        return fused_policy_loss(t["logprobs"], t["old_logprobs"], t["advantages"], rl, **kw)
    return policy_loss(t["logprobs"], t["old_logprobs"], t["advantages"], rl, **kw)


def _rl_loss(settings: PolicyLossSettings, t: dict, n_glob, s_glob, stats: LossStats,
             fused: bool = False):
    """The loss of one micro-batch from per-sample (or padded-row) tensors ``t`` [N, L]."""
    from megatron_rl.losses.kl import kl_loss

    lp, mask = t["logprobs"], t["loss_mask"].bool()
    sft = t["sft_mask"].bool() & mask if "sft_mask" in t else torch.zeros_like(mask)
    rl = mask & ~sft
    loss, m = _policy_term(settings, t, rl, n_glob, s_glob, fused)
    n_rl, n_sft = float(rl.sum()), float(sft.sum())
    stats.add(m, n_rl)
    stats.all_tokens += n_rl + n_sft
    if n_sft:  # HPT: token-sum NLL of the demonstrations over the same global normaliser
        loss = loss + torch.where(sft, -lp, torch.zeros_like(lp)).sum() / max(float(n_glob), 1.0)
        stats.sft_tokens += n_sft
    if t.get("entropy") is not None:
        ent = t["entropy"]
        stats.entropy_on, stats.entropy_sum = 1.0, stats.entropy_sum + float(ent.detach()[mask].sum())
        if settings.entropy_coef != 0.0:
            loss = loss - settings.entropy_coef * torch.where(rl, ent, torch.zeros_like(ent)).sum() \
                / max(float(n_glob), 1.0)
    if settings.kl_coef > 0 and t.get("ref_logprobs") is not None:
        kl, km = kl_loss(lp, t["ref_logprobs"], rl, coef=settings.kl_coef, kind=settings.kl_kind,
                         global_num_tokens=n_glob)
        loss = loss + kl
        stats.kl_on, stats.kl_sum = 1.0, stats.kl_sum + float(km["kl"]) * n_rl
    return loss


def policy_forward_step(settings: PolicyLossSettings, global_num_tokens: int, global_num_seqs: int,
                        stats: LossStats):
    """Megatron ``forward_step_func``: token logprobs, the clipped policy loss, and optionally the
    entropy bonus, the KL-to-reference loss and HPT's SFT loss on demonstration tokens.

    Batch keys: those of ``collate`` / ``pack_microbatches`` plus ``old_logprobs`` [B, S] and
    optional ``is_weights``, ``ref_logprobs`` [B, S] (label frame), ``sft_mask`` [B, S].
    Batches with ``sample_index`` (packed) are aggregated per sample through ``seq_ids``.
    ``global_num_tokens`` counts every loss token (RL + SFT), ``global_num_seqs`` the samples
    with >= 1 loss token (``local_counts`` summed over micro-batches and DP ranks).
    The loss function returns ``(L_mb * global_num_tokens, local tokens int, {"lm_loss": ...})``
    (see the module docstring), ``lm_loss = [L_mb * global_num_tokens, local tokens]`` so that
    ``engine.train_step``'s ``train/loss`` is the global mini-batch loss.
    """
    logits = settings.entropy_metric or settings.entropy_coef != 0.0
    impl = {}  # resolved once, on the model's device

    def loss_func(batch: dict, output: torch.Tensor):
        fused = impl["fused"]
        logprobs, entropy = _logprobs_entropy(output, batch["labels"], settings, fused)
        dev = logprobs.device
        t = {k: batch[k].to(dev) for k in _PER_TOKEN if batch.get(k) is not None}
        t["logprobs"] = logprobs
        if entropy is not None:
            t["entropy"] = entropy
        if "sample_index" in batch:
            t = _per_sample_view(batch, t)
        loss = _rl_loss(settings, t, global_num_tokens, global_num_seqs, stats, fused)
        n_local = batch["loss_mask"].sum().to(dev)
        scaled = loss * global_num_tokens
        return scaled, n_local.to(torch.int), {"lm_loss": torch.stack([scaled.detach(), n_local])}

    def step(data_iterator, model):
        batch = next(data_iterator)
        dev = next(model.parameters()).device
        if "fused" not in impl:
            from megatron_rl.ops import resolve_loss_impl

            impl["fused"] = resolve_loss_impl(settings.loss_impl, dev) == "fused"
        labels = None if logits or impl["fused"] else batch["labels"].to(dev)
        output = model(batch["tokens"].to(dev), batch["position_ids"].to(dev),
                       batch["attention_mask"].to(dev), labels=labels)
        return output, lambda out: loss_func(batch, out)

    return step
