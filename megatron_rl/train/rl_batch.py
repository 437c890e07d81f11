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
from dataclasses import dataclass, fields

import numpy as np
import torch

from megatron_rl.data.packing import first_fit_decreasing, packed_attention_mask
from megatron_rl.losses.policy import policy_loss
from megatron_rl.losses.rl_loss import PolicyLossSettings, rl_loss
from megatron_rl.moe.routing_replay import build_replay_routes
from megatron_rl.train.logprobs import causal_mask

__all__ = ["LossStats", "MicroBatch", "PolicyLossSettings", "PromptStream", "Sample", "collate",
           "local_counts", "microbatches", "pack_microbatches", "policy_forward_step"]


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
    routed_experts: np.ndarray | torch.Tensor | None = None  # engine routes int [len(prompt + output) - 1, L, K]
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


@dataclass(kw_only=True)
class MicroBatch:
    """One RL training micro-batch: B rows of S tokens, every per-token tensor in the label frame.

    Built by ``collate`` / ``pack_microbatches``; the RL step attaches ``old_logprobs`` (and
    ``is_weights``, ``ref_logprobs``) and may shrink ``loss_mask`` (mismatch masking). It is what
    Megatron's schedule hands the forward step (``data_iterator`` yields these).
    """

    tokens: torch.Tensor  # [B, S] int64 prompt + response ids, pad_id after
    labels: torch.Tensor  # [B, S] int64 tokens[:, 1:] (the label frame), 0 at S - 1
    position_ids: torch.Tensor  # [B, S] int64, restarting at 0 for every packed sample
    attention_mask: torch.Tensor  # [B, 1, S, S] bool, True = masked (causal / block-diagonal)
    seq_ids: torch.Tensor  # [B, S] int64 sample index within the micro-batch, -1 on padding
    loss_mask: torch.Tensor  # [B, S] float 1 where labels[t] is a trained token
    advantages: torch.Tensor  # [B, S] float32 the sample's advantage on its loss tokens, else 0
    rollout_logprobs: torch.Tensor  # [B, S] float32 engine logprobs mu of labels (0: demos, padding)
    sft_mask: torch.Tensor | None = None  # [B, S] float 1 on HPT demonstration tokens (None: no demo)
    sample_index: list[tuple[int, int, int, int]] | None = None  # packed: (input index, row, offset, n)
    routes: torch.Tensor | None = None  # [B, S, L, K] int the routes a pass replays (moe.step_routing)
    old_logprobs: torch.Tensor | None = None  # [B, S] float32 log pi_old(labels), no grad
    is_weights: torch.Tensor | None = None  # [B, S] float TIS weights (1 off the RL tokens)
    ref_logprobs: torch.Tensor | None = None  # [B, S] float32 reference logprobs (KL on)

    @property
    def shape(self) -> tuple[int, int]:
        """(B, S)."""
        return tuple(self.tokens.shape)

    def masked_copy(self) -> "MicroBatch":
        """Same shapes, no loss token (keeps DP ranks' schedules in step); routes -> the filler."""
        out = MicroBatch(**{f.name: (v.clone() if torch.is_tensor(v) else v)
                            for f in fields(self) for v in [getattr(self, f.name)]})
        out.loss_mask, out.advantages = torch.zeros_like(out.loss_mask), torch.zeros_like(out.advantages)
        if out.sft_mask is not None:
            out.sft_mask = torch.zeros_like(out.sft_mask)
        if out.routes is not None:
            l, k = out.routes.shape[2:]
            out.routes = build_replay_routes([None] * out.shape[0], out.shape[1], l, k)
        return out


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


def _finish(out: dict, attention_mask: torch.Tensor, any_demo: bool, route_rows: list | None,
            route_layout: tuple[int, int] | None, sample_index: list | None = None) -> MicroBatch:
    labels = torch.zeros_like(out["tokens"])
    labels[:, :-1] = out["tokens"][:, 1:]
    if not any_demo:
        out["sft_mask"] = None
    routes = None
    if route_layout is not None:  # the engine's routes [B, S, L, K]; the filler where a row has none
        routes = build_replay_routes(route_rows, out["tokens"].shape[1], *route_layout)
    return MicroBatch(**out, labels=labels, attention_mask=attention_mask, routes=routes,
                      sample_index=sample_index)


def collate(samples: list[Sample], advantages: torch.Tensor, seq_len: int, pad_id: int, *,
            route_layout: tuple[int, int] | None = None) -> MicroBatch:
    """Right-padded rows in the label frame, one sample per row.

    Args: samples (B of them); advantages [B] float; seq_len S >= every len(prompt + output);
        route_layout: (L MoE layers, top-k K) of the engine's routes: when given, ``routes``
        [B, S, L, K] holds each sample's ``routed_experts`` (``build_replay_routes``; the
        filler route on rows and positions without one).
    Returns: a ``MicroBatch``: tokens/labels/position_ids [B, S] int64, attention_mask
        [B, 1, S, S] bool (causal), loss_mask [B, S] float, rollout_logprobs [B, S] float32,
        advantages [B, S] float32 (0 off the loss mask), seq_ids [B, S] int64 (row index on the
        sample's tokens, -1 on padding), and ``sft_mask`` [B, S] float (1 on demonstration
        tokens) only if some sample has ``is_demo`` (its tokens are in loss_mask too; its
        rollout_logprobs stay 0).
    Raises: ValueError: a multi-turn ``loss_mask`` of the wrong length, routes of the wrong shape.
    """
    b = len(samples)
    out = _empty(b, seq_len, pad_id)
    for i, s in enumerate(samples):
        _place(s, float(advantages[i]), out, i, 0, i)
    rows = [s.routed_experts for s in samples]
    return _finish(out, causal_mask(b, seq_len), any(s.is_demo for s in samples), rows, route_layout)


def microbatches(samples: list[Sample], advantages: torch.Tensor, rows: int, seq_len: int,
                 pad_id: int, *, route_layout: tuple[int, int] | None = None) -> list[MicroBatch]:
    """Cut samples into micro-batches of ``rows`` rows; the last is padded with fully masked rows."""
    dummy = Sample(prompt_ids=[pad_id], output_ids=[], rollout_logprobs=[], reward=0.0,
                   finish_reason="pad", weight_version=None)
    pad = (-len(samples)) % rows
    samples = list(samples) + [dummy] * pad
    adv = torch.cat([advantages.float(), torch.zeros(pad)])
    return [collate(samples[i: i + rows], adv[i: i + rows], seq_len, pad_id, route_layout=route_layout)
            for i in range(0, len(samples), rows)]


def pack_microbatches(samples: list[Sample], advantages: torch.Tensor, max_tokens: int,
                      pad_id: int, *, rows: int = 1,
                      route_layout: tuple[int, int] | None = None) -> list[MicroBatch]:
    """Sequence packing: whole samples into rows of ``max_tokens`` by first-fit-decreasing.

    Every micro-batch has ``rows`` rows of S = ``max_tokens`` (the last one is completed with
    empty rows), fields as ``collate`` with, per row, a block-diagonal causal ``attention_mask``
    [B, 1, S, S] (a token attends only to earlier tokens of its own sample) and ``position_ids``
    restarting at 0 for each sample, so per-token logprobs equal the unpacked ones (to float
    rounding: Megatron's RoPE in the BSHD layout ignores position_ids, but rotary attention
    depends only on relative offsets, which the block-diagonal mask keeps per sample). The last
    token of a sample (whose label is the next sample's first token) is never in ``loss_mask``.
    ``seq_ids`` [B, S] int64 = index of the sample within this micro-batch (-1 on padding),
    which the loss uses to aggregate per sample (all ``agg`` modes and GSPO work);
    ``sample_index``: list of (input index, row, offset, length), one per sample, in
    ``seq_ids`` order; ``routes`` (with ``route_layout``) holds each sample's engine routes at
    its offset.
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
        route_rows = [[] for _ in range(rows)]
        for r, members in enumerate(bins[lo: lo + rows]):
            cu = [0]
            for i in members:
                _place(samples[i], float(advantages[i]), mb, r, cu[-1], len(index))
                n = len(samples[i].prompt_ids) + len(samples[i].output_ids)
                index.append((i, r, cu[-1], n))
                if samples[i].routed_experts is not None:  # demonstrations have none
                    route_rows[r].append((cu[-1], samples[i].routed_experts))
                cu.append(cu[-1] + n)
            masks.append(packed_attention_mask(torch.tensor(cu), max_tokens))
        demo = any(samples[i].is_demo for i, *_ in index)
        out.append(_finish(mb, torch.cat(masks), demo, route_rows, route_layout,
                           sample_index=index))
    return out


def local_counts(mb: MicroBatch) -> tuple[int, int]:
    """(loss tokens, samples with >= 1 loss token) of one micro-batch, padded or packed."""
    mask, ids = mb.loss_mask, mb.seq_ids
    seqs = torch.unique(ids[(mask > 0) & (ids >= 0)]).numel()
    return int(mask.sum()), int(seqs)


@dataclass
class LossStats:
    """Per optimizer step: the additive metrics of ``losses.rl_loss.rl_loss`` summed over this
    rank's micro-batches (``ratio_dev_max`` a max), then reduced by ``reduce``."""

    tokens: float = 0.0  # RL tokens (the policy metrics' denominator)
    clipped: float = 0.0
    ratio_dev_max: float = 0.0
    all_tokens: float = 0.0  # RL + SFT tokens
    sft_tokens: float = 0.0
    entropy_sum: float = 0.0  # over all loss tokens
    entropy_on: float = 0.0
    kl_sum: float = 0.0  # over RL tokens
    kl_on: float = 0.0

    def add(self, metrics: dict[str, float]) -> None:
        """Accumulate one micro-batch's ``rl_loss`` metrics."""
        for key in ("tokens", "clipped", "all_tokens", "sft_tokens"):
            setattr(self, key, getattr(self, key) + metrics[key])
        self.ratio_dev_max = max(self.ratio_dev_max, metrics["ratio_dev_max"])
        if "entropy_sum" in metrics:
            self.entropy_on, self.entropy_sum = 1.0, self.entropy_sum + metrics["entropy_sum"]
        if "kl_sum" in metrics:
            self.kl_on, self.kl_sum = 1.0, self.kl_sum + metrics["kl_sum"]

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


def _per_sample_view(seq_ids: torch.Tensor, tensors: dict) -> dict:
    """Per-token tensors [B, S] -> [N, L] with one sample per row (packed batches; ``seq_ids``).

    Sample j's tokens, in order, fill row j from column 0; the rest of the row is masked out of
    ``loss_mask`` (other tensors hold arbitrary values there). Gradients flow through.
    """
    ids = seq_ids.to(tensors["loss_mask"].device).reshape(-1)  # [B*S]
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


def policy_forward_step(settings: PolicyLossSettings, global_num_tokens: int, global_num_seqs: int,
                        stats: LossStats):
    """Megatron ``forward_step_func`` of the trained RL loss (``losses.rl_loss.rl_loss``): token
    logprobs (+ entropy) from the model output, then the clipped policy loss and optionally the
    entropy bonus, the KL-to-reference loss and HPT's SFT loss on demonstration tokens; each
    micro-batch's metrics are added to ``stats``.

    The data iterator yields ``MicroBatch``es with ``old_logprobs`` set (and optionally
    ``is_weights``, ``ref_logprobs``, ``sft_mask``). Packed micro-batches (``sample_index``) are
    aggregated per sample through ``seq_ids``. ``global_num_tokens`` counts every loss token
    (RL + SFT), ``global_num_seqs`` the samples with >= 1 loss token (``local_counts`` summed
    over micro-batches and DP ranks). The loss function returns ``(L_mb * global_num_tokens,
    local tokens int, {"lm_loss": ...})`` (see the module docstring), ``lm_loss = [L_mb *
    global_num_tokens, local tokens]`` so that ``engine.train_step``'s ``train/loss`` is the
    global mini-batch loss.
    """
    logits = settings.entropy_metric or settings.entropy_coef != 0.0
    impl = {}  # resolved once, on the model's device

    def loss_func(mb: MicroBatch, output: torch.Tensor):
        fused = impl["fused"]
        logprobs, entropy = _logprobs_entropy(output, mb.labels, settings, fused)
        dev = logprobs.device
        t = {k: getattr(mb, k).to(dev) for k in _PER_TOKEN if getattr(mb, k) is not None}
        t["logprobs"] = logprobs
        if entropy is not None:
            t["entropy"] = entropy
        if mb.sample_index is not None:
            t = _per_sample_view(mb.seq_ids, t)
        policy_fn = policy_loss
        if fused:
            from megatron_rl.ops import fused_policy_loss as policy_fn
        loss, metrics = rl_loss(t["logprobs"], t["loss_mask"], t["advantages"], t["old_logprobs"], settings,
                                global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs,
                                sft_mask=t.get("sft_mask"), entropy=t.get("entropy"),
                                ref_logprobs=t.get("ref_logprobs"), is_weights=t.get("is_weights"),
                                policy_fn=policy_fn)
        stats.add(metrics)
        n_local = mb.loss_mask.sum().to(dev)
        scaled = loss * global_num_tokens
        return scaled, n_local.to(torch.int), {"lm_loss": torch.stack([scaled.detach(), n_local])}

    def step(data_iterator, model):
        mb = next(data_iterator)
        dev = next(model.parameters()).device
        if "fused" not in impl:
            from megatron_rl.ops import resolve_loss_impl

            impl["fused"] = resolve_loss_impl(settings.loss_impl, dev) == "fused"
        labels = None if logits or impl["fused"] else mb.labels.to(dev)
        output = model(mb.tokens.to(dev), mb.position_ids.to(dev), mb.attention_mask.to(dev), labels=labels)
        return output, lambda out: loss_func(mb, out)

    return step
