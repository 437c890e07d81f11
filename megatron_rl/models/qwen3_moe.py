"""Qwen3-MoE: HF config -> Megatron.

RMSNorm, GQA, QK-norm (RMSNorm over head_dim, per head = Megatron's ``qk_layernorm``), RoPE
(rotate-half), SwiGLU experts, softmax top-k router with ``norm_topk_prob``, dense layers per
``mlp_only_layers`` / ``decoder_sparse_step``, untied embeddings by default, no linear biases.
Source: transformers ``models/qwen3_moe/modeling_qwen3_moe.py`` (Qwen3MoeSparseMoeBlock).
Left out: sliding-window attention (``use_sliding_window``), rope scaling.
"""

from __future__ import annotations

from megatron_rl.models import common
from megatron_rl.models.base import Family, register

_moe_layer_freq = common.moe_layer_freq  # kept for callers of the old name


def config_kwargs(hf: dict) -> dict:
    common.unsupported("qwen3_moe", hf, {
        "use_sliding_window": (False, "no sliding-window attention"),
        "attention_bias": (False, "q/k/v/o biases are not mapped")})
    kw = common.decoder_kwargs("qwen3_moe", hf)
    kw.update(common.router_kwargs(
        hf, num_experts=hf.get("num_experts", hf.get("num_local_experts")),
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        norm_topk_prob=bool(hf.get("norm_topk_prob", False))))
    kw.update(
        ffn_hidden_size=hf.get("intermediate_size", hf["moe_intermediate_size"]),
        qk_layernorm=True,
        moe_layer_freq=common.moe_layer_freq(hf),
    )
    return kw


def gpt_kwargs(hf: dict) -> dict:
    return common.gpt_kwargs("qwen3_moe", hf)


FAMILY = register(
    Family(name="qwen3_moe", model_types=("qwen3_moe",), config_kwargs=config_kwargs,
           gpt_kwargs=gpt_kwargs)
)
