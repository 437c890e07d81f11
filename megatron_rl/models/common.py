"""HF config fields shared by the Llama-style MoE families (Qwen3/Qwen2-MoE, Mixtral, OLMoE).

Each helper reads one group of ``config.json`` fields and returns TransformerConfig / GPTModel
kwargs; a family module composes them and adds its own fields. Both the hub's key style
(``rope_theta``, ``num_experts``) and transformers 5's (``rope_parameters``,
``num_local_experts``) are read. Features the Megatron mapping cannot reproduce raise
ValueError naming the family and the field (``unsupported``), never a silent approximation.
Left out: rope scaling (YaRN, linear, dynamic), sliding-window attention, biases outside q/k/v.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F


def unsupported(family: str, hf: dict, checks: dict[str, tuple[Any, str]]) -> None:
    """Raise ValueError if any ``hf[field]`` is not the supported value.

    ``checks`` maps a field to ``(supported value, why)``; a missing field counts as supported.
    The message names the family, every offending field with its value, and why."""
    bad = [f"{k}={hf[k]!r} ({why}; supported: {ok!r})" for k, (ok, why) in checks.items()
           if k in hf and hf[k] != ok]
    if bad:
        raise ValueError(f"{family}: HF config not supported by the Megatron mapping: "
                         + "; ".join(bad))


def rope_theta(family: str, hf: dict) -> float:
    """RoPE base from ``rope_theta`` (hub) or ``rope_parameters.rope_theta`` (transformers 5).

    Raises ValueError for a rope type other than "default" (YaRN / linear / dynamic scaling)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise ValueError(f"{family}: rope_type {kind!r} is not supported (only 'default' RoPE)")
    return float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))


def decoder_kwargs(family: str, hf: dict) -> dict:
    """Shape of the attention + norm + SwiGLU stack (TransformerConfig kwargs).

    Raises ValueError if ``hidden_act`` is not silu or the RoPE type is not "default" (checked
    here too, so ``transformer_config_from_hf`` refuses before a model is built)."""
    unsupported(family, hf, {"hidden_act": ("silu", "experts are SwiGLU")})
    rope_theta(family, hf)
    heads = hf["num_attention_heads"]
    return dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        normalization="RMSNorm",
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=False,
    )


def router_kwargs(hf: dict, *, num_experts: int, moe_ffn_hidden_size: int,
                  norm_topk_prob: bool) -> dict:
    """Softmax top-k router (TransformerConfig kwargs).

    HF computes softmax over all experts, takes the top k and (``norm_topk_prob``) renormalises
    them. Megatron's ``moe_router_pre_softmax=False`` is top-k on the logits then softmax over
    the k -- the same numbers as softmax + top-k + renormalise; ``pre_softmax=True`` is softmax
    over all then top-k without renormalising (``norm_topk_prob=False``)."""
    return dict(
        num_moe_experts=num_experts,
        moe_ffn_hidden_size=moe_ffn_hidden_size,
        moe_router_topk=hf["num_experts_per_tok"],
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not norm_topk_prob,
        moe_router_dtype="fp32",
        moe_shared_expert_intermediate_size=None,
    )


def moe_layer_freq(hf: dict) -> list[int]:
    """Per-layer 1 (MoE) / 0 (dense) by HF's ``mlp_only_layers`` / ``decoder_sparse_step`` rule
    (Qwen2/3-MoE): layer i is MoE iff i not in mlp_only_layers and (i + 1) % step == 0."""
    n = hf["num_hidden_layers"]
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = set(hf.get("mlp_only_layers") or [])
    return [int(i not in dense and (i + 1) % step == 0) for i in range(n)]


def gpt_kwargs(family: str, hf: dict) -> dict:
    """GPTModel kwargs: vocab (unpadded; ``build_model`` pads), positions, RoPE, tying."""
    return dict(
        vocab_size=hf["vocab_size"],
        max_sequence_length=hf.get("max_position_embeddings", 4096),
        position_embedding_type="rope",
        rotary_base=int(rope_theta(family, hf)),
        rotary_percent=1.0,
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
    )
