"""Qwen3-MoE (and Qwen2-MoE-shaped configs without a shared expert): HF config -> Megatron.

RMSNorm, GQA, QK-norm (RMSNorm over head_dim), RoPE (rotate-half), SwiGLU experts, softmax
top-k router with ``norm_topk_prob``, untied embeddings by default, no linear biases.
Source: transformers ``models/qwen3_moe/modeling_qwen3_moe.py`` (Qwen3MoeSparseMoeBlock).
"""

from __future__ import annotations

import torch.nn.functional as F

from megatron_rl.models.base import Family, register


def _moe_layer_freq(hf: dict) -> list[int]:
    """Per-layer 1 (MoE) / 0 (dense), following HF's ``mlp_only_layers`` and
    ``decoder_sparse_step`` rule: layer i is MoE iff i not in mlp_only_layers and
    num_experts > 0 and (i + 1) % decoder_sparse_step == 0."""
    n = hf["num_hidden_layers"]
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = set(hf.get("mlp_only_layers") or [])
    return [int(i not in dense and (i + 1) % step == 0) for i in range(n)]


def config_kwargs(hf: dict) -> dict:
    heads = hf["num_attention_heads"]
    norm_topk = bool(hf.get("norm_topk_prob", False))
    return dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf.get("intermediate_size", hf["moe_intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads", heads),
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        normalization="RMSNorm",
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(hf.get("attention_bias", False)),
        num_moe_experts=hf.get("num_experts", hf.get("num_local_experts")),
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        moe_router_topk=hf["num_experts_per_tok"],
        moe_layer_freq=_moe_layer_freq(hf),
        moe_router_score_function="softmax",
        # Megatron: pre_softmax=False -> top-k on logits then softmax over the k (== HF softmax +
        # top-k + renormalise, i.e. norm_topk_prob=True); pre_softmax=True -> softmax then top-k.
        moe_router_pre_softmax=not norm_topk,
        moe_router_dtype="fp32",
        moe_shared_expert_intermediate_size=None,
    )


def gpt_kwargs(hf: dict) -> dict:
    return dict(
        vocab_size=hf["vocab_size"],
        max_sequence_length=hf.get("max_position_embeddings", 4096),
        position_embedding_type="rope",
        rotary_base=int(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta",
                                                                               10000))),
        rotary_percent=1.0,
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
    )


FAMILY = register(
    Family(name="qwen3_moe", model_types=("qwen3_moe",), config_kwargs=config_kwargs,
           gpt_kwargs=gpt_kwargs)
)
