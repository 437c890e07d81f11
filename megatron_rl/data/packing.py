"""Sequence packing without cross-document attention (Megatron THD layout).

Legend: D = documents in a pack, T = tokens in a pack (sum of their lengths, no padding).

Per document with tokens t[0..n) and loss_mask m[0..n) (m[j] = 1: token j is trained on):
    labels[j]    = t[j+1]   for j < n-1,  -100 at j = n-1 (no next token inside the document)
    loss_mask[j] = m[j+1]   for j < n-1,  0    at j = n-1
    position_ids[j] = j     (restarts at 0 for every document)
so no position predicts a token of another document. Attention isolation comes from either
`cu_seqlens` (THD kernels: `PackedBatch.packed_seq_params()`) or, where the backend has no THD
support (the CPU path), the block-diagonal causal mask of `packed_attention_mask`.

Left out: padding packs to a common length or to a CP-divisible multiple (callers that batch
several packs pad them; Megatron's `cu_seqlens_*_padded` is not used).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PackedBatch:
    """One pack of whole documents.

    tokens [T] int64, labels [T] int64 (IGNORE_INDEX at each document's last token),
    loss_mask [T] float32, position_ids [T] int64, cu_seqlens [D+1] int32 (0, end of doc 0, ...,
    T), max_seqlen = longest document, sample_indices = input index of each document in pack order.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    sample_indices: tuple[int, ...]

    def packed_seq_params(self):
        """Megatron-Core `PackedSeqParams` (qkv_format="thd") for this pack; imports megatron.core."""
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens,
                               cu_seqlens_kv=self.cu_seqlens, max_seqlen_q=self.max_seqlen,
                               max_seqlen_kv=self.max_seqlen)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin indices by first-fit-decreasing; ties keep input order, so the result is deterministic.

    Raises ValueError if a length is < 1 or > capacity.
    """
    bad = [(i, n) for i, n in enumerate(lengths) if not 1 <= n <= capacity]
    if bad:
        i, n = bad[0]
        raise ValueError(f"sample {i} has length {n}; every sample needs 1 <= length <= {capacity}")
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def _pack(samples: Sequence[dict], indices: list[int]) -> PackedBatch:
    tokens, labels, loss_mask, position_ids, cu = [], [], [], [], [0]
    for i in indices:
        ids, mask = list(samples[i]["input_ids"]), list(samples[i]["loss_mask"])
        if len(ids) != len(mask):
            raise ValueError(f"sample {i}: input_ids has {len(ids)} tokens, loss_mask {len(mask)}")
        tokens += ids
        labels += ids[1:] + [IGNORE_INDEX]
        loss_mask += mask[1:] + [0]
        position_ids += range(len(ids))
        cu.append(cu[-1] + len(ids))
    return PackedBatch(
        tokens=torch.tensor(tokens, dtype=torch.int64),
        labels=torch.tensor(labels, dtype=torch.int64),
        loss_mask=torch.tensor(loss_mask, dtype=torch.float32),
        position_ids=torch.tensor(position_ids, dtype=torch.int64),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=max(b - a for a, b in zip(cu, cu[1:])),
        sample_indices=tuple(indices),
    )


def pack_samples(samples: Sequence[dict], max_tokens: int) -> list[PackedBatch]:
    """Pack samples ({"input_ids": list[int], "loss_mask": list[int]}) into packs of <= max_tokens.

    First-fit-decreasing over sample lengths (deterministic); packs come out in bin-creation order
    and documents inside a pack in placement order (`sample_indices`). Never splits a document.
    Raises ValueError for an empty or over-long sample or mismatched input_ids/loss_mask lengths.
    """
    bins = first_fit_decreasing([len(s["input_ids"]) for s in samples], max_tokens)
    return [_pack(samples, b) for b in bins]


def packed_attention_mask(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """Block-diagonal causal mask [1, 1, T, T] bool, Megatron convention: True = masked out.

    Query i may attend key j iff both lie in the same document and j <= i. Positions at or beyond
    cu_seqlens[-1] (padding) attend only to themselves, so no softmax row is empty.
    Raises ValueError unless cu_seqlens is 1-D, starts at 0, is non-decreasing and ends <= T.
    """
    cu = cu_seqlens.to(torch.int64).cpu()
    if cu.dim() != 1 or cu.numel() < 1 or cu[0] != 0 or bool((cu[1:] < cu[:-1]).any()) or cu[-1] > T:
        raise ValueError(f"cu_seqlens must be 1-D, start at 0, be non-decreasing and end <= T={T}; "
                         f"got {cu.tolist()}")
    pos = torch.arange(T)
    doc = torch.bucketize(pos, cu[1:], right=True)  # [T] document of each position
    pad = pos >= cu[-1]  # [T]
    allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])  # [T, T] (query, key)
    allowed &= ~pad[:, None] & ~pad[None, :]
    allowed |= torch.eye(T, dtype=torch.bool)
    return (~allowed)[None, None].to(cu_seqlens.device)
