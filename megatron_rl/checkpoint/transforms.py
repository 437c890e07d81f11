"""Small named tensor transforms between HF and Megatron-Core weight layouts.

Legend: H = hidden, nh = query heads, ng = query groups (KV heads), hd = head_dim,
I = FFN hidden, V = vocab, Vp = padded vocab, tp = size of the sharding group.
All functions are pure (no process groups) and raise ``ShapeError`` naming what did not fit.

Layouts, checked against megatron-core 0.19.2:
- ``linear_qkv.weight`` [ng*(nh/ng + 2)*hd, H]: per query group [q heads of the group; k; v],
  groups concatenated (``SelfAttention.get_query_key_value_tensors`` views the output as
  [.., ng, (nh/ng + 2)*hd] and splits [nh/ng*hd, hd, hd]). A TP rank holds a contiguous 1/tp of
  dim 0 (whole groups when ng >= tp; when ng < tp the rank all-gathers and re-slices).
- ``linear_fc1.weight`` of a gated MLP [2I, H] = [gate; up] (``MLP.forward``'s glu:
  ``x_glu, x_linear = torch.chunk(x, 2, dim=-1); act(x_glu) * x_linear``). A TP rank holds
  [gate_r; up_r], NOT a contiguous slice of the full [gate; up] (shard kind "glu_column").
- Vocab-parallel embedding/output: rows padded to Vp (a multiple of 128*tp) then split by TP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class ShapeError(ValueError):
    """An HF tensor does not have the shape the Megatron layout needs."""


@dataclass(frozen=True)
class AttnGeometry:
    """Global (unsharded) attention sizes: nh query heads, ng query groups, hd head_dim."""

    num_heads: int
    num_groups: int
    head_dim: int


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: AttnGeometry) -> torch.Tensor:
    """HF q_proj [nh*hd, H], k_proj/v_proj [ng*hd, H] (or 1-D biases) -> Megatron linear_qkv.

    Returns [ng*(nh/ng + 2)*hd, ...], same dtype. Raises ShapeError on inconsistent sizes."""
    nh, ng, hd = g.num_heads, g.num_groups, g.head_dim
    want = {"q": nh * hd, "k": ng * hd, "v": ng * hd}
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[0] != want[name] or t.shape[1:] != q.shape[1:]:
            expected = [want[name], *q.shape[1:]]
            raise ShapeError(f"{name}: shape {_shape(t)}, expected {expected} "
                             f"(heads={nh}, groups={ng}, head_dim={hd})")
    rest = q.shape[1:]
    parts = (q.reshape(ng, nh // ng * hd, *rest),  # [ng, nh/ng*hd, ...]
             k.reshape(ng, hd, *rest), v.reshape(ng, hd, *rest))  # [ng, hd, ...]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, g: AttnGeometry) -> list[torch.Tensor]:
    """Inverse of ``fuse_qkv``: Megatron linear_qkv -> [q, k, v] in HF layout (contiguous)."""
    nh, ng, hd = g.num_heads, g.num_groups, g.head_dim
    if qkv.shape[0] != (nh + 2 * ng) * hd:
        raise ShapeError(f"qkv: shape {_shape(qkv)}, expected dim 0 = {(nh + 2 * ng) * hd}")
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(ng, -1, *rest).split([nh // ng * hd, hd, hd], dim=1)
    return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


def fuse_glu(gate: torch.Tensor, up: torch.Tensor, g: AttnGeometry | None = None) -> torch.Tensor:
    """HF gate_proj [I, H], up_proj [I, H] -> Megatron linear_fc1 [2I, H] = [gate; up]."""
    if gate.shape != up.shape:
        raise ShapeError(f"gate {_shape(gate)} and up {_shape(up)} differ")
    return torch.cat([gate, up], dim=0)


def split_glu(fc1: torch.Tensor, g: AttnGeometry | None = None) -> list[torch.Tensor]:
    """Inverse of ``fuse_glu``: [2I, H] -> [gate [I, H], up [I, H]] (contiguous)."""
    if fc1.shape[0] % 2:
        raise ShapeError(f"fc1: shape {_shape(fc1)} has an odd dim 0")
    return [t.contiguous() for t in fc1.chunk(2, dim=0)]


# name -> (fuse(*hf, geometry), split(megatron, geometry))
FUSES = {"qkv": (fuse_qkv, split_qkv), "glu": (fuse_glu, split_glu)}


def pad_vocab(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[V, H] -> [rows, H], the added rows zero. Raises ShapeError if V > rows."""
    if t.shape[0] > rows:
        raise ShapeError(f"vocab {t.shape[0]} > padded vocab {rows}")
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


def _chunk(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    if t.dim() <= dim or t.shape[dim] % size:
        raise ShapeError(f"shape {_shape(t)}: dim {dim} not divisible by {size} ranks")
    return t.chunk(size, dim=dim)[rank]


def shard(t: torch.Tensor, kind: str | None, rank: int, size: int) -> torch.Tensor:
    """This rank's part of a full Megatron tensor (see ``Rule.shard``; "vocab" expects the
    tensor already padded). Returns a view or a new tensor; raises ShapeError if not divisible."""
    if kind is None or size == 1:
        return t
    if kind in ("column", "vocab"):
        return _chunk(t, 0, rank, size)
    if kind == "row":
        return _chunk(t, 1, rank, size)
    if kind == "glu_column":
        gate, up = split_glu(t)
        return torch.cat([_chunk(gate, 0, rank, size), _chunk(up, 0, rank, size)], dim=0)
    raise ValueError(f"unknown shard kind {kind!r}")
