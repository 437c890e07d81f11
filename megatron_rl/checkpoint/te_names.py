"""Transformer Engine layer-spec parameter names -> our (local-spec) Megatron names, so the
declarative HF maps, the HF loader and the streaming export serve TE-spec models unchanged.

Legend: P = ``decoder.layers.{l}.``; e = local expert index.

TE spec name (``get_gpt_layer_with_transformer_engine_spec``)  ->  local spec name
    P self_attention.linear_qkv.layer_norm_weight     ->  P input_layernorm.weight
    P self_attention.linear_q_up_proj.layer_norm_weight   ->  P self_attention.q_layernorm.weight (MLA)
    P self_attention.linear_kv_up_proj.layer_norm_weight  ->  P self_attention.kv_layernorm.weight (MLA)
    P mlp.linear_fc1.layer_norm_weight (dense layers)  ->  P pre_mlp_layernorm.weight
    P mlp.experts.linear_fc{1,2}.weight{e} (TEGroupedMLP, --moe-grouped-gemm)
                                                       ->  P mlp.experts.local_experts.{e}.linear_fc{1,2}.weight
    ... ``_extra_state`` (TE FP8 metadata)             ->  skipped (None)
(``*_bias`` likewise for LayerNorm models.) Every other name is the same in both specs (TE's
``TELayerNormColumnParallelLinear.weight`` sits where the local ``ColumnParallelLinear.weight``
does; MoE layers keep a separate ``pre_mlp_layernorm``). The norm renames are those Megatron
itself declares in the local spec's ``sharded_state_dict_keys_map`` (so local and TE checkpoints
are interchangeable); ``weight{e}`` is TE ``GroupedLinear``'s per-GEMM parameter name, which
``TEGroupedMLP.sharded_state_dict`` maps to SequentialMLP's experts.
FP8 parameters (TE ``QuantizedTensor``, ``--fp8-param-gather``) are dequantised by ``plain``.
Source: Megatron-Core 0.19 ``models/gpt/gpt_layer_specs.py``, ``transformer/moe/experts.py``.
"""

from __future__ import annotations

import re

import torch

TE_NAME_RULES: tuple[tuple[str, str], ...] = (
    (r"^(.*)\.self_attention\.linear_qkv\.layer_norm_(weight|bias)$", r"\1.input_layernorm.\2"),
    (r"^(.*)\.self_attention\.linear_q_up_proj\.layer_norm_(weight|bias)$", r"\1.self_attention.q_layernorm.\2"),
    (r"^(.*)\.self_attention\.linear_kv_up_proj\.layer_norm_(weight|bias)$", r"\1.self_attention.kv_layernorm.\2"),
    (r"^(.*)\.mlp\.linear_fc1\.layer_norm_(weight|bias)$", r"\1.pre_mlp_layernorm.\2"),
    (r"^(.*)\.mlp\.experts\.linear_fc([12])\.(weight|bias)(\d+)$", r"\1.mlp.experts.local_experts.\4.linear_fc\2.\3"),
)
_COMPILED = tuple((re.compile(p), r) for p, r in TE_NAME_RULES)


def te_to_local_name(name: str) -> str | None:
    """A Megatron parameter / state-dict name of either spec -> the local-spec name; None for
    ``_extra_state`` entries (TE FP8 metadata, nothing to export)."""
    if name.endswith("_extra_state"):
        return None
    for rx, repl in _COMPILED:
        if rx.match(name):
            return rx.sub(repl, name)
    return name


def plain(t: torch.Tensor) -> torch.Tensor:
    """A TE FP8 parameter (``QuantizedTensor``: has ``dequantize()``) -> its high-precision
    value; any other tensor unchanged."""
    deq = getattr(t, "dequantize", None)
    if deq is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):  # a tensor subclass
        return deq()
    return t
