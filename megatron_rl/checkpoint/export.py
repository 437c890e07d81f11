"""Streaming HF export of a LIVE, sharded Megatron-Core model: ``iter_hf_tensors``.

Legend: unit = one Megatron parameter (full, i.e. TP/ETP-gathered) under global indices; owner =
the lowest global rank holding a unit; dst = the rank that receives the HF tensors; bucket = a
plain ``{hf_name: tensor}`` dict of at most ``bucket_bytes``.

Protocol (every rank runs the same steps, in the same order):
1. Plan: each rank matches its parameters to the family's ``adapter.Rule``s (local -> global
   layer / expert indices as ``hf_loader`` does) and describes them (full shape, dtype, TP/ETP
   group). One ``all_gather_object`` of these descriptions gives every rank the same schedule:
   units sorted layer by layer (embedding, layers 0..L-1, final norm / output), each with its
   owner, cut into transfers of consecutive units of one owner and <= ``bucket_bytes``.
2. Per transfer: the owner's TP (or expert-TP) group all-gathers each unit's shards (a gated
   ``linear_fc1`` shard is [gate_r; up_r]: rebuilt as [gate; up]); the owner packs the full
   tensors (vocab padding dropped) into one flat byte buffer and ``send``s it to dst, which
   ``recv``s it (no copy when owner == dst). DP replicas and non-owner groups do nothing.
3. dst converts each complete group of units (one unit, or every expert of a fused-expert
   stack) with ``hf_loader._to_hf`` (the adapter rules: no mapping logic here) and fills buckets.
Every collective happens while the generator is iterated, so every rank must iterate it to the
end (on other ranks it yields nothing); dst must not stop early. Deadlock freedom: each rank
performs its operations in schedule order, and an operation of transfer k only waits for
operations of transfer k on other ranks.

Memory on dst: about one transfer + one bucket (+ one fused expert stack); on an owner: one
transfer. Tensors stay on the parameters' device. TE-spec names are read as local ones
(``checkpoint.te_names``, via ``hf_loader.named_tensors``). Left out: virtual pipeline chunks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

import torch

from megatron_rl.checkpoint.adapter import find_rule, get_adapter, split_row_selector
from megatron_rl.checkpoint.gather import _gather
from megatron_rl.checkpoint.hf_loader import (
    CheckpointError,
    _to_global,
    _to_hf,
    _unwrap,
    named_tensors,
)

DEFAULT_BUCKET_BYTES = 512 * 2**20


@dataclass(frozen=True)
class _Unit:
    """One full Megatron tensor as scheduled (picklable, identical on every rank)."""

    key: tuple[str, ...]  # its HF source names (global), the dedup key
    group: tuple[str, ...]  # HF base names it contributes to (fused experts share one)
    order: tuple[int, int, int]  # (layer position, rule index, expert)
    name: str  # Megatron name with global indices
    gidx: tuple[tuple[str, int], ...]
    shape: tuple[int, ...]  # full shape sent (vocab rows sliced to the HF vocab)
    dtype: torch.dtype
    expert: bool

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def _local_units(module, hf_config: dict, fused_experts: bool) -> dict[tuple, tuple]:
    """This rank's ``{key: (_Unit, param, shard kind)}`` for every local parameter. The shard
    kind is the rule's (``Rule.shard``): the gather is the exact inverse of the loader's split.

    Raises CheckpointError naming parameters that no rule maps."""
    rules, _ = get_adapter(hf_config).rules_for(set(), hf_config, fused_experts=fused_experts)
    cfg = module.config
    out, missing = {}, []
    for name, p in named_tensors(module, rules):  # params + mapped buffers (expert bias)
        hit = find_rule(rules, name)
        if hit is None:
            missing.append(f"{name}: no rule in the {hf_config.get('model_type')} map")
            continue
        rule, idx = hit
        gidx = _to_global(module, idx)
        key = tuple(rule.hf_names(**gidx))
        shape = list(p.shape)
        if rule.shard is not None:
            shape[1 if rule.shard == "row" else 0] *= _group_size(rule.is_expert)
        if rule.shard == "vocab":
            shape[0] = min(shape[0], hf_config["vocab_size"])
        layer = gidx.get("layer", -1 if name.startswith("embedding") else cfg.num_layers)
        unit = _Unit(key=key, group=tuple(sorted({split_row_selector(k)[0] for k in key})),
                     order=(layer, rules.index(rule), gidx.get("expert", -1)),
                     name=rule.megatron.format(**gidx), gidx=tuple(sorted(gidx.items())),
                     shape=tuple(shape), dtype=p.dtype, expert=rule.is_expert)
        out[key] = (unit, p, rule.shard)
    if missing:
        raise CheckpointError("export", {"missing": missing})
    return out


def _group_size(expert: bool) -> int:
    from megatron.core import parallel_state as ps

    return (ps.get_expert_tensor_parallel_world_size() if expert
            else ps.get_tensor_model_parallel_world_size())


def _my_groups() -> dict:
    from megatron.core import parallel_state as ps

    ranks = torch.distributed.get_process_group_ranks
    return {False: tuple(ranks(ps.get_tensor_model_parallel_group())),
            True: tuple(ranks(ps.get_expert_tensor_parallel_group()))}


def _schedule(local: dict, bucket_bytes: int):
    """All ranks' unit descriptions -> (transfers, groups of each rank).

    transfers: ``[(owner, [_Unit])]`` in order; the same list on every rank."""
    world = torch.distributed.get_world_size()
    mine = ([u for u, _, _ in local.values()], _my_groups())
    every = [None] * world
    if world == 1:
        every = [mine]
    else:
        torch.distributed.all_gather_object(every, mine)
    owner_of: dict[tuple, tuple[int, _Unit]] = {}
    for rank, (units, _) in enumerate(every):
        for u in units:
            owner_of.setdefault(u.key, (rank, u))
    units = sorted(owner_of.values(), key=lambda ru: (ru[1].order, ru[1].key))
    transfers: list[tuple[int, list[_Unit]]] = []
    size = 0
    for owner, u in units:
        if transfers and transfers[-1][0] == owner and size + u.nbytes <= bucket_bytes:
            transfers[-1][1].append(u)
            size += u.nbytes
        else:
            transfers.append((owner, [u]))
            size = u.nbytes
    return transfers, [groups for _, groups in every]


def _full(unit: _Unit, param, shard: str | None) -> torch.Tensor:
    """The full tensor of a unit (collective over its TP / ETP group when sharded): shards
    concatenated along dim 0 ("column", "vocab"), dim 1 ("row"), or per half ("glu_column":
    each shard is [gate_r; up_r])."""
    from megatron.core import parallel_state as ps

    if shard is not None and _group_size(unit.expert) > 1:
        group = (ps.get_expert_tensor_parallel_group() if unit.expert
                 else ps.get_tensor_model_parallel_group())
        t = _gather(param, group, 1 if shard == "row" else 0, shard == "glu_column")
    else:
        t = param.detach()
    return t[: unit.shape[0]] if t.shape[0] != unit.shape[0] else t


def _pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def _unpack(buf: torch.Tensor, units: list[_Unit]) -> list[torch.Tensor]:
    out, off = [], 0
    for u in units:
        out.append(buf[off:off + u.nbytes].view(u.dtype).reshape(u.shape))
        off += u.nbytes
    return out


def _transfer(owner: int, units: list[_Unit], local: dict, groups: list, rank: int, dst: int,
              device) -> list[torch.Tensor] | None:
    """Run one transfer on this rank; the full tensors on dst, None elsewhere."""
    tensors = []
    for u in units:
        participants = groups[owner][u.expert]
        if rank in participants and u.key in local:
            full = _full(u, local[u.key][1], local[u.key][2])
            if rank == owner:
                tensors.append(full)
    if owner == dst:
        return tensors if rank == dst else None
    if rank == owner:
        torch.distributed.send(_pack(tensors), dst)
        return None
    if rank == dst:
        buf = torch.empty(sum(u.nbytes for u in units), dtype=torch.uint8, device=device)
        torch.distributed.recv(buf, owner)
        return _unpack(buf, units)
    return None


@torch.no_grad()
def iter_hf_tensors(model, hf_config: dict, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                    fused_experts: bool = False, dst: int = 0
                    ) -> Iterator[dict[str, torch.Tensor]]:
    """Stream the model's weights as HF tensors to global rank ``dst``, bucket by bucket.

    Collective (see the module docstring): every rank calls it and iterates it to the end.

    Args:
        model: this rank's GPTModel chunk (DDP/Float16Module-wrapped or not), any TP / PP / EP /
            ETP / DP layout of ``megatron_rl.parallel.init_parallel``.
        hf_config: HF config dict (family, ``vocab_size``, tying).
        bucket_bytes: max bytes of one yielded bucket; a single HF tensor larger than that is
            yielded alone. Also the max size of one transfer (except a single larger unit).
        fused_experts: yield transformers' stacked expert layout ([E, 2I, H] / [E, H, I])
            instead of the hub's per-expert tensors.
        dst: global rank that receives the tensors.
    Yields:
        on ``dst``: ``{hf_name: tensor}`` (new contiguous tensors in the parameters' dtype and
        device; every HF name exactly once over all buckets); nothing on other ranks.
    Raises:
        CheckpointError: a parameter has no rule in the family's map.
        ValueError: ``bucket_bytes`` < 1; no adapter for the config's model_type.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    module = _unwrap(model)
    local = _local_units(module, hf_config, fused_experts)
    transfers, groups = _schedule(local, bucket_bytes)
    rank = torch.distributed.get_rank()
    device = next(module.parameters()).device
    pending: dict[tuple, list] = defaultdict(list)  # group -> [(name, tensor, gidx)]
    remaining = defaultdict(int)  # group -> units not yet received
    for _, units in transfers:
        for u in units:
            remaining[u.group] += 1
    bucket, size = {}, 0
    for owner, units in transfers:
        got = _transfer(owner, units, local, groups, rank, dst, device)
        if got is None:
            continue
        ready = []
        for u, t in zip(units, got):
            pending[u.group].append((u.name, t, dict(u.gidx)))
            remaining[u.group] -= 1
            if remaining[u.group] == 0:
                ready += pending.pop(u.group)
        if not ready:
            continue
        for hf_name, t in _to_hf(ready, module.config, hf_config, fused_experts).items():
            n = t.numel() * t.element_size()
            if bucket and size + n > bucket_bytes:
                yield bucket
                bucket, size = {}, 0
            bucket[hf_name] = t
            size += n
    if bucket:
        yield bucket
