"""The running batch's KV cache: one HF `DynamicCache` over B left-padded rows, plus its attention mask.

Legend: B = rows (running sequences), S = cache columns (the longest row; shorter rows are left-padded
with masked columns), H = KV heads, D = head dim.

Continuous batching on top of HF transformers' padded batched forward (what `generate` does with a
`DynamicCache` and a 2-D attention mask): newly prefilled rows are `merge`d in by left-padding the
shorter side's keys/values with zeros (masked out), finished rows are dropped with `keep`, and columns
that are padding in every remaining row are trimmed. Positions are per row (`lengths`, the count of real
tokens), so each row's rotary positions equal those of an unpadded forward of the same tokens.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class KVBatch:
    """B rows of KV cache. `mask` long [B, S] (1 = real token), `lengths` long [B] (real tokens per row)."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor):
        self.cache, self.mask = cache, mask
        self.lengths = mask.sum(dim=1)

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    def _layers(self) -> list:
        return [layer for layer in self.cache.layers if getattr(layer, "keys", None) is not None]

    def append_column(self) -> None:
        """Account for one decoded token per row (the forward itself appends its keys/values)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)
        self.lengths = self.lengths + 1

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order), then trim columns that are padding in every row."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        first = int(mask.any(dim=0).long().argmax()) if mask.numel() else 0
        for layer in self._layers():
            layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
            layer.values = layer.values.index_select(0, idx)[:, :, first:]
        self.mask = mask[:, first:]
        self.lengths = self.lengths.index_select(0, idx)

    def merge(self, other: "KVBatch") -> None:
        """Append `other`'s rows after ours, left-padding whichever side has fewer columns."""
        s_self, s_other = self.mask.shape[1], other.mask.shape[1]
        width = max(s_self, s_other)
        for mine, theirs in zip(self._layers(), other._layers()):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)], dim=0)
        self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(other.mask, width, dim=1)], dim=0)
        self.lengths = torch.cat([self.lengths, other.lengths])


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zero-pad `t` on the left along `dim` to `width` entries (keys/values: dim 2 of [B, H, S, D])."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
