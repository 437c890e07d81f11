"""HF safetensors checkpoint -> this rank's Megatron-Core GPTModel chunk, and the inverse (1 rank).

``load_hf_weights(model, hf_dir)`` reads only the tensors this rank needs (lazily, with
``safetensors.safe_open``; single-file or sharded via ``model.safetensors.index.json``), fuses
them per the family's rules (``adapter.Rule``), takes this rank's TP / ETP shard, and copies them
into the local parameters. Pipeline stage and expert-parallel rank come from the model itself:
global layer = ``decoder.layers[i].layer_number - 1``, global expert =
``decoder.layers[i].mlp.local_expert_indices[j]`` (= ep_rank * num_local_experts + j).

Everything is checked on meta tensors before the first byte is copied: a mismatch raises
``CheckpointError`` and leaves the model untouched. No collectives are used.
Left out: multi-rank streaming export (``export_hf_state_dict`` is tp=pp=ep=1 only), TE names.
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch

from megatron_rl.checkpoint.adapter import Rule, find_rule, get_adapter, split_row_selector
from megatron_rl.checkpoint.safetensors_io import SafetensorsCheckpoint
from megatron_rl.checkpoint.transforms import FUSES, AttnGeometry, ShapeError, pad_vocab, shard

_MAX_LISTED = 20


class CheckpointError(ValueError):
    """The HF checkpoint does not fit the model. ``problems`` maps a category ("missing",
    "unexpected", "shape") to its list of messages."""

    def __init__(self, where: str, problems: dict[str, list[str]]):
        self.problems = problems
        titles = {"missing": "Megatron parameters with no HF source",
                  "unexpected": "HF keys never consumed (unexpected)",
                  "shape": "shape mismatches",
                  "dtype": "one parameter fused from HF tensors of different dtypes"}
        lines = [f"HF checkpoint {where} does not fit the model:"]
        for cat, items in problems.items():
            lines.append(f"  {titles[cat]} ({len(items)}):")
            lines += [f"    {m}" for m in items[:_MAX_LISTED]]
            if len(items) > _MAX_LISTED:
                lines.append(f"    ... and {len(items) - _MAX_LISTED} more")
        super().__init__("\n".join(lines))


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / Float16Module wrappers
        model = model.module
    return model


def _geometry(config) -> AttnGeometry:
    return AttnGeometry(num_heads=config.num_attention_heads,
                        num_groups=config.num_query_groups or config.num_attention_heads,
                        head_dim=config.kv_channels)


def moe_layer_pattern(config) -> list[int]:
    """1 (MoE) / 0 (dense) per global layer; Megatron's reading of ``moe_layer_freq``
    (``gpt_layer_specs.get_gpt_decoder_layer_specs``)."""
    if not config.num_moe_experts:
        return [0] * config.num_layers
    freq = config.moe_layer_freq
    return list(freq) if isinstance(freq, list) else [int(i % freq == 0) for i in
                                                      range(config.num_layers)]


def expected_hf_keys(rules: list[Rule], config) -> set[str]:
    """Every HF tensor name the WHOLE model (all ranks) reads, row selectors stripped."""
    pattern = moe_layer_pattern(config)
    out: set[str] = set()
    for rule in rules:
        if "{layer}" not in rule.megatron:
            out.update(rule.hf_names())
            continue
        for layer, is_moe in enumerate(pattern):
            if rule.layers != "all" and rule.layers != ("moe" if is_moe else "dense"):
                continue
            experts = range(config.num_moe_experts) if rule.is_expert else [None]
            for e in experts:
                out.update(rule.hf_names(layer, e))
    return {split_row_selector(k)[0] for k in out}


def named_tensors(model, rules: list[Rule]):
    """``model.named_parameters()``, then the buffers some rule maps (e.g. DeepSeek-V3's router
    ``mlp.router.expert_bias`` <- ``mlp.gate.e_score_correction_bias``); other buffers are
    skipped. Yields ``(name, tensor)``. TE-spec names are read as local-spec ones
    (``te_names.te_to_local_name``; ``_extra_state`` skipped, FP8 parameters dequantised)."""
    from megatron_rl.checkpoint.te_names import plain, te_to_local_name

    for name, p in model.named_parameters():
        local = te_to_local_name(name)
        if local is not None:
            yield local, plain(p)
    for name, buf in model.named_buffers():
        if find_rule(rules, name) is not None:
            yield name, buf


def _to_global(model, idx: dict[str, int]) -> dict[str, int]:
    """Local ``{layer, expert}`` indices of a Megatron name -> global ones."""
    out = dict(idx)
    if "layer" in idx:
        layer = model.decoder.layers[idx["layer"]]
        out["layer"] = layer.layer_number - 1
        if "expert" in idx:
            out["expert"] = layer.mlp.local_expert_indices[idx["expert"]]
    return out


def _tp_group(rule: Rule) -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if rule.shard is None:
        return 0, 1
    if rule.is_expert:
        return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _build(rule: Rule, sources: list[torch.Tensor], geo: AttnGeometry, local_shape,
           rank: int, size: int) -> torch.Tensor:
    """HF tensors -> this rank's Megatron tensor (fuse, pad vocab, shard). Works on meta."""
    full = sources[0] if rule.fuse is None else FUSES[rule.fuse][0](*sources, geo)
    if rule.shard == "vocab":
        full = pad_vocab(full, local_shape[0] * size)
    return shard(full, rule.shard, rank, size)


def _plan(model, ckpt: SafetensorsCheckpoint, hf_config: dict):
    """Match every local parameter to its rule and HF sources; check names and shapes on meta.

    Returns ``[(param, rule, hf_sources, rank, size)]``; raises CheckpointError."""
    rules, ignored = get_adapter(hf_config).rules_for(ckpt.keys(), hf_config)
    geo = _geometry(model.config)
    problems: dict[str, list[str]] = defaultdict(list)
    plan = []
    for name, param in named_tensors(model, rules):
        hit = find_rule(rules, name)
        if hit is None:
            problems["missing"].append(f"{name}: no rule in the {hf_config['model_type']} map")
            continue
        rule, idx = hit
        sources = rule.hf_names(**_to_global(model, idx))
        absent = [s for s in sources if not ckpt.has(s)]
        if absent:
            problems["missing"].append(f"{name}: HF {', '.join(absent)} not in checkpoint")
            continue
        rank, size = _tp_group(rule)
        metas = [ckpt.meta(s) for s in sources]
        try:
            got = list(_build(rule, metas, geo, param.shape, rank, size).shape)
        except ShapeError as e:
            got = f"error ({e})"
        if got != list(param.shape):
            hf_shapes = ", ".join(f"{s} {list(m.shape)}" for s, m in zip(sources, metas))
            problems["shape"].append(f"{name}: expected {list(param.shape)}, got {got} from "
                                     f"{hf_shapes} (shard {rule.shard}, rank {rank}/{size})")
        plan.append((param, rule, sources, rank, size))
    unexpected = ckpt.keys() - expected_hf_keys(rules, model.config) - ignored
    problems["unexpected"] = sorted(unexpected)
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise CheckpointError(ckpt.dir, problems)
    return plan


@torch.no_grad()
def load_hf_weights(model, hf_dir: str | os.PathLike, hf_config: dict | None = None, *,
                    keep_dtype: bool = False) -> int:
    """Copy an HF checkpoint into this rank's model chunk (every parameter exactly once).

    By default each tensor is cast to its parameter's dtype (the trainer's choice). With
    ``keep_dtype`` every parameter takes the dtype of its HF source instead (conversion: no cast
    at all, so bf16 / mixed-dtype checkpoints round-trip byte for byte); a parameter fused from
    sources of different dtypes is then refused (CheckpointError "dtype") before any copy.

    Args:
        model: this rank's GPTModel chunk (possibly DDP/Float16Module-wrapped), built for the
            current parallel state (``megatron_rl.parallel.init_parallel``).
        hf_dir: HF checkpoint dir (config.json + *.safetensors [+ index]).
        hf_config: the HF config dict (default: read ``hf_dir/config.json``).
    Returns:
        number of parameters assigned.
    Raises:
        CheckpointError: Megatron params with no HF source, HF keys no rank would consume, or
            shape mismatches (each listed by name with both shapes); the model is untouched.
        ValueError: no adapter for the config's model_type.
    """
    from megatron_rl.models import load_hf_config

    model = _unwrap(model)
    hf_config = hf_config if hf_config is not None else load_hf_config(hf_dir)
    ckpt = SafetensorsCheckpoint(hf_dir)
    plan = _plan(model, ckpt, hf_config)
    if keep_dtype:
        mixed = [", ".join(f"{s} {ckpt.meta(s).dtype}" for s in sources) for _, _, sources, _, _ in plan
                 if len({ckpt.meta(s).dtype for s in sources}) > 1]
        if mixed:
            raise CheckpointError(ckpt.dir, {"dtype": mixed})
    geo = _geometry(model.config)
    for param, rule, sources, rank, size in plan:
        local = _build(rule, [ckpt.get(s) for s in sources], geo, param.shape, rank, size)
        if keep_dtype:
            param.data = local.to(param.device).clone()  # the source's dtype, own memory
        else:
            param.data.copy_(local)
    return len(plan)


@torch.no_grad()
def export_hf_state_dict(model, hf_config: dict | str | os.PathLike, *,
                         fused_experts: bool = False) -> dict[str, torch.Tensor]:
    """Single-rank (tp=pp=ep=etp=1) Megatron model -> HF state dict (inverse of the load).

    Args:
        model: a whole GPTModel (possibly wrapped).
        hf_config: HF config dict or dir (``vocab_size`` to slice the padding off, tying).
        fused_experts: write transformers' stacked expert layout instead of the hub's per-expert
            one.
    Returns:
        ``{hf_name: tensor}``, new contiguous tensors in the parameters' dtype.
    Raises:
        ValueError: the model is sharded. CheckpointError: a parameter has no rule.
    """
    from megatron.core import parallel_state as ps

    from megatron_rl.models import load_hf_config

    sizes = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
             ps.get_expert_model_parallel_world_size(),
             ps.get_expert_tensor_parallel_world_size())
    if sizes != (1, 1, 1, 1):
        raise ValueError(f"export_hf_state_dict needs tp=pp=ep=etp=1, got {sizes}")
    model = _unwrap(model)
    named = ((name, p, _to_global(model, idx)) for name, p, idx in _with_indices(model, hf_config))
    return _to_hf(named, model.config, load_hf_config(hf_config), fused_experts)


def _with_indices(model, hf_config):
    from megatron_rl.models import load_hf_config

    rules, _ = get_adapter(load_hf_config(hf_config)).rules_for(set(), load_hf_config(hf_config))
    for name, param in named_tensors(model, rules):
        hit = find_rule(rules, name)
        if hit is None:
            raise CheckpointError("export", {"missing": [f"{name}: no rule"]})
        yield name, param, hit[1]


@torch.no_grad()
def full_state_to_hf(full: dict[str, torch.Tensor], config, hf_config: dict, *,
                     fused_experts: bool = False) -> dict[str, torch.Tensor]:
    """Megatron tensors under *global* names (``checkpoint.gather.gather_full_state_dict``
    merged over ranks) -> HF state dict. ``config`` is the TransformerConfig (attention
    geometry). Raises CheckpointError for a name with no rule."""
    rules, _ = get_adapter(hf_config).rules_for(set(), hf_config, fused_experts=fused_experts)

    def named():
        for name, t in full.items():
            hit = find_rule(rules, name)
            if hit is None:
                raise CheckpointError("export", {"missing": [f"{name}: no rule"]})
            yield name, t, hit[1]

    return _to_hf(named(), config, hf_config, fused_experts)


def _to_hf(named, config, hf_config: dict, fused_experts: bool) -> dict[str, torch.Tensor]:
    """(name, tensor, global {layer, expert} indices) triples -> HF state dict."""
    rules, _ = get_adapter(hf_config).rules_for(set(), hf_config, fused_experts=fused_experts)
    geo = _geometry(config)
    out: dict[str, torch.Tensor] = {}
    stacked: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for name, param, gidx in named:
        rule, _ = find_rule(rules, name)
        t = param.detach()
        if rule.shard == "vocab":
            t = t[: hf_config["vocab_size"]]
        parts = [t] if rule.fuse is None else FUSES[rule.fuse][1](t, geo)
        for source, part in zip(rule.hf_names(**gidx), parts):
            base, row = split_row_selector(source)
            if row is None:
                out[base] = part.clone(memory_format=torch.contiguous_format)
            else:
                stacked[base][row] = part
    for base, rows in stacked.items():
        out[base] = torch.stack([rows[i] for i in range(len(rows))])
    return out
