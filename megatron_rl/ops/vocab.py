"""Fused vocab-parallel token logprobs + entropy (``csrc/fused_loss*``), with the TP combine.

Legend: T tokens (any leading shape [T] or [S, B] / [B, S]), V_local = this TP rank's vocabulary
shard, tp = the tensor-parallel group size. One pass over the logits per rank
(``torch.ops.megatron_rl.vocab_stats``: running max, sum exp, sum z*exp, target logit), ONE
all_reduce of the [tp, T, 5] partial statistics over the TP group (each rank fills its own slot,
zeros elsewhere: the sum is exact), then an in-order merge over ranks: exact logprobs and entropy,
deterministic, the full vocabulary never gathered. Backward: ``vocab_backward_`` writes
dL/dlogits into the logits' own storage (no new [T, V_local] buffer) from dL/dlogp and dL/dH.

Design read from (not copied): Megatron-Core ``tensor_parallel/cross_entropy.py`` (in-place
gradient, target masking per shard), ``fusions/fused_cross_entropy.py``.
Left out: fusing the output-layer matmul (the logits are materialised by the model).
"""

from __future__ import annotations

import torch

from megatron_rl.ops._ext import require

_STATS = 5  # [m, s, w, target z, has target]


def combine_stats(stats: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge per-shard statistics across ``group``: (logprobs, entropy, lse), each [...].

    Args: stats [..., 5] float32/64 from ``vocab_stats`` on this rank's shard; group: the TP
        process group (None or size 1: local). Collective: one all_reduce over ``group``.
    Returns: logprobs (NaN where no rank holds the target), entropy (nats) and the global
        log-sum-exp of the tempered logits, in the dtype of ``stats``.
    """
    world = 1 if group is None else torch.distributed.get_world_size(group)
    if world > 1:
        buf = stats.new_zeros((world,) + tuple(stats.shape))
        buf[torch.distributed.get_rank(group)] = stats
        torch.distributed.all_reduce(buf, group=group)
        parts = buf.unbind(0)
    else:
        parts = (stats,)
    m_glob = parts[0][..., 0]
    for p in parts[1:]:
        m_glob = torch.maximum(m_glob, p[..., 0])
    s_sum = torch.zeros_like(m_glob)
    w_sum = torch.zeros_like(m_glob)
    tgt = torch.zeros_like(m_glob)
    has = torch.zeros_like(m_glob)
    for p in parts:  # fixed rank order: deterministic, independent of T
        m, s, w = p[..., 0], p[..., 1], p[..., 2]
        a = torch.exp(m - m_glob)
        s_sum = s_sum + a * s
        w_sum = w_sum + a * (w + (m - m_glob) * s)
        tgt = tgt + p[..., 3]
        has = has + p[..., 4]
    log_s = torch.log(s_sum)
    lse = m_glob + log_s
    entropy = log_s - w_sum / s_sum
    logprobs = torch.where(has > 0, (tgt - m_glob) - log_s, torch.full_like(lse, float("nan")))
    return logprobs, entropy, lse


class _FusedLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, n_valid, inv_t, group, inplace):
        stats = torch.ops.megatron_rl.vocab_stats(logits, target, vocab_start, n_valid, inv_t)
        logprobs, entropy, lse = combine_stats(stats, group)
        ctx.save_for_backward(logits, target, lse, entropy)
        ctx.cfg = (vocab_start, n_valid, inv_t, inplace)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, g_lp, g_h):
        logits, target, lse, entropy = ctx.saved_tensors
        vocab_start, n_valid, inv_t, inplace = ctx.cfg
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.to(lse.dtype).contiguous()
        g_h = torch.zeros_like(lse) if g_h is None else g_h.to(lse.dtype).contiguous()
        grad = logits if inplace else torch.empty_like(logits)
        torch.ops.megatron_rl.vocab_backward_(logits, grad, target, vocab_start, n_valid, inv_t,
                                              lse, entropy, g_lp, g_h)
        return grad, None, None, None, None, None, None


def shard_bounds(v_local: int, group=None, vocab_start: int | None = None,
                 vocab_size: int | None = None) -> tuple[int, int]:
    """(vocab_start, n_valid) of this rank's shard: start = rank * V_local by default; n_valid =
    the shard's columns below ``vocab_size`` (None: all, e.g. Megatron's padded vocabulary)."""
    if vocab_start is None:
        rank = 0 if group is None else torch.distributed.get_rank(group)
        vocab_start = rank * v_local
    n_valid = v_local if vocab_size is None else max(0, min(v_local, vocab_size - vocab_start))
    return vocab_start, n_valid


def vocab_parallel_logprobs_entropy(logits: torch.Tensor, target: torch.Tensor, *, group=None,
                                    vocab_start: int | None = None, vocab_size: int | None = None,
                                    temperature: float = 1.0, inplace_backward: bool = True
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probabilities and entropies of softmax(logits / temperature) over a TP-sharded
    vocabulary, fused (one read of the logits forward, one read + one write backward).

    Args:
        logits: [T, V_local] or [S, B, V_local] float32 / bfloat16 / float16 / float64 (any
            leading strides, unit stride on the vocab dim: Megatron's [S, B, V] views are fine);
            this rank's vocabulary shard. Finite values (|x| < 1e30).
        target: int64 global token ids, the logits' leading shape.
        group: the TP process group (None or size 1: the shard is the whole vocabulary).
        vocab_start: global id of this shard's first column (default rank * V_local).
        vocab_size: the real vocabulary size; columns at or beyond it (padding) are excluded from
            the softmax and get zero gradient. None: every column counts (Megatron's
            ``vocab_parallel_cross_entropy`` semantics).
        temperature: T > 0; the softmax is over logits / T (gradients are temperature-aware).
        inplace_backward: write dL/dlogits into the logits' storage (default; the logits must
            not be needed by anything else afterwards, and ``retain_graph`` second passes are
            not supported); False allocates a new gradient tensor (gradcheck, shared logits).
    Returns:
        (logprobs, entropy), each of the leading shape, float32 (float64 for float64 logits),
        identical on every rank of ``group``; logprobs is NaN where no rank holds the target.
    Raises:
        RuntimeError: the op is not built for this device, or a bad argument (the message names
            it: dtype, device, shape, strides).
    Collective over ``group`` (one all_reduce of [tp, T, 5] floats).
    """
    require(logits.device)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    start, n_valid = shard_bounds(logits.shape[-1], group, vocab_start, vocab_size)
    return _FusedLogprobsEntropy.apply(logits, target, start, n_valid, 1.0 / temperature, group,
                                       inplace_backward)
