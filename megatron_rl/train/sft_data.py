"""SFT data: dataset rows (jsonl / parquet / HF dir) -> tokenised samples -> fixed-length packed rows -> micro-batches.

Legend: S = --seq-length (tokens per packed row), B = micro-batch rows.

Rows are packed in a deterministic order (a seeded shuffle per epoch) by appending whole samples
to the current row while they fit, so the stream position is two integers (epoch, index) and a
resumed run sees exactly the rows an uninterrupted one would. Padding tokens carry loss_mask 0
and attend only to themselves (``packed_attention_mask``).
"""

from __future__ import annotations

import random

import torch

from megatron_rl.data.chat import build_sft_sample
from megatron_rl.data.loader import RowKeys, load_rows
from megatron_rl.data.packing import pack_samples, packed_attention_mask


def load_sft_samples(path: str, tokenizer, max_len: int, *, require_label: bool = True,
                     keys: RowKeys | None = None) -> list[dict]:
    """Tokenise every row of an SFT dataset (jsonl / parquet / HF dir, ``data.loader.load_rows``;
    rows ``{"prompt", "solution", "label"}`` or ``{"messages": [...]}`` after the ``keys``
    mapping). Every row is validated before anything is trained or written.

    Raises DatasetError naming ``path:line`` (``path: row i``): malformed JSON, missing label (unless
    ``require_label=False``), no assistant target, or more than ``max_len`` tokens."""
    out = []
    for where, row in load_rows(path, keys=keys, require_label=require_label, require_solution=False):
        out.append(build_sft_sample(tokenizer, row, max_len, path=where))
    if not out:
        raise ValueError(f"{path}: no samples")
    return out


class PackedRowStream:
    """Endless stream of packed rows of exactly ``seq_length`` tokens over ``samples``.

    State (for checkpoints): ``{"epoch": int, "index": int}``.
    """

    def __init__(self, samples: list[dict], seq_length: int, seed: int, pad_id: int):
        self.samples, self.seq_length, self.seed, self.pad_id = samples, seq_length, seed, pad_id
        self.epoch, self.index = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> list[int]:
        order = list(range(len(self.samples)))
        random.Random(self.seed * 100003 + epoch).shuffle(order)
        return order

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._perm(self.epoch)

    def _next_sample(self) -> dict:
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._perm(self.epoch)
        s = self.samples[self._order[self.index]]
        self.index += 1
        return s

    def _peek_len(self) -> int:
        if self.index >= len(self._order):
            return len(self.samples[self._perm(self.epoch + 1)[0]]["input_ids"])
        return len(self.samples[self._order[self.index]]["input_ids"])

    def next_row(self) -> dict:
        """One packed row: tokens/labels/position_ids [S] int64, loss_mask [S] float,
        attention_mask [1, S, S] bool (True = masked)."""
        group, used = [], 0
        while not group or used + self._peek_len() <= self.seq_length:
            s = self._next_sample()
            group.append(s)
            used += len(s["input_ids"])
        (pack,) = pack_samples(group, self.seq_length)
        s_len, n = self.seq_length, pack.tokens.numel()
        row = {
            "tokens": torch.full((s_len,), self.pad_id, dtype=torch.long),
            "labels": torch.zeros(s_len, dtype=torch.long),
            "loss_mask": torch.zeros(s_len),
            "position_ids": torch.arange(s_len),
        }
        row["tokens"][:n] = pack.tokens
        row["labels"][:n] = pack.labels.clamp(min=0)  # ignored positions carry loss_mask 0
        row["loss_mask"][:n] = pack.loss_mask
        row["position_ids"][:n] = pack.position_ids
        row["attention_mask"] = packed_attention_mask(pack.cu_seqlens, s_len)[0]
        return row


def collate(rows: list[dict]) -> dict:
    """Stack rows into a micro-batch: [B, S] (attention_mask [B, 1, S, S])."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def dp_microbatches(rows: list[dict], dp_rank: int, dp_size: int, micro_batch_size: int
                    ) -> list[dict]:
    """This DP rank's contiguous share of a global batch of rows, as micro-batches.

    Raises ValueError unless len(rows) is divisible by dp_size * micro_batch_size."""
    if len(rows) % (dp_size * micro_batch_size):
        raise ValueError(f"global batch of {len(rows)} rows not divisible by "
                         f"dp ({dp_size}) x micro-batch size ({micro_batch_size})")
    per = len(rows) // dp_size
    mine = rows[dp_rank * per:(dp_rank + 1) * per]
    return [collate(mine[i:i + micro_batch_size]) for i in range(0, per, micro_batch_size)]
