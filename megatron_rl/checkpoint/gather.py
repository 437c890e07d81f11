"""Gather a sharded Megatron model into full tensors under global names (debug / tests / small
models): every rank returns ``{name: tensor}`` for what its pipeline stage and expert-parallel
rank hold, with TP / expert-TP shards concatenated. Merging the per-rank dicts of all ranks gives
the single-rank model's state dict (same names and shapes), so two layouts can be compared
tensor by tensor. Memory: the full tensors of this rank's layers; not for large models (the
streaming HF export in this package is the production path).

Parameters only (no buffers such as DeepSeek-V3's router ``expert_bias``); the production HF
path with bounded memory and mapped buffers is ``checkpoint.export.iter_hf_tensors``.
Global names: ``decoder.layers.{global_layer}`` and ``local_experts.{global_expert}``; vocab
rows are the padded Megatron vocab (callers slice to the HF vocab size).
"""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"local_experts\.(\d+)\.")


def _gather(t: torch.Tensor, group, dim: int, gated: bool) -> torch.Tensor:
    size = torch.distributed.get_world_size(group)
    if size == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(size)]
    torch.distributed.all_gather(parts, t.detach().contiguous(), group=group)
    if gated:  # each shard is [gate_r; up_r] along dim 0: rebuild [gate; up]
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def gather_full_state_dict(model) -> dict[str, torch.Tensor]:
    """Full (TP/ETP-gathered) tensors of this rank's parameters under global names.

    Args:
        model: this rank's GPTModel chunk (DDP-wrapped or not). Collective over the TP and
            expert-TP groups: every rank must call it.
    Returns:
        ``{global_name: tensor}`` (CPU clones).
    """
    from megatron.core import parallel_state as ps

    module = getattr(model, "module", model)
    gated = bool(module.config.gated_linear_unit)
    layers = {i: layer.layer_number - 1 for i, layer in enumerate(module.decoder.layers)}
    out = {}
    for name, p in module.named_parameters():
        is_expert = ".experts." in name
        group = (ps.get_expert_tensor_parallel_group() if is_expert
                 else ps.get_tensor_model_parallel_group())
        if getattr(p, "tensor_model_parallel", False):
            full = _gather(p, group, p.partition_dim,
                           gated and name.endswith("linear_fc1.weight"))
        else:
            full = p.detach().clone()
        m = _LAYER.search(name)
        if m:
            name = name.replace(m.group(0), f"decoder.layers.{layers[int(m.group(1))]}.", 1)
        out[name] = full.cpu()
    return _globalise_experts(module, out)


def _globalise_experts(module, out: dict) -> dict:
    """Rename ``local_experts.{j}`` to the global expert index of this EP rank."""
    from megatron.core import parallel_state as ps

    cfg = module.config
    if not cfg.num_moe_experts:
        return out
    ep_rank = ps.get_expert_model_parallel_rank()
    n_local = cfg.num_moe_experts // ps.get_expert_model_parallel_world_size()
    renamed = {}
    for name, t in out.items():
        m = _EXPERT.search(name)
        if m:
            g = ep_rank * n_local + int(m.group(1))
            name = name.replace(m.group(0), f"local_experts.{g}.", 1)
        renamed[name] = t
    return renamed
