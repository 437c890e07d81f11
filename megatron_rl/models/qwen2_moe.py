"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): HF config -> Megatron.

As Qwen3-MoE but: q/k/v biases (``qkv_bias``, default True; o_proj has none), no QK norm, and a
shared expert in every MoE layer -- a SwiGLU MLP of ``shared_expert_intermediate_size`` whose
output is scaled by ``sigmoid(x @ shared_expert_gate.weight.T)`` ([1, H]) and added to the
routed experts' output. Megatron: ``moe_shared_expert_intermediate_size`` +
``moe_shared_expert_gate=True`` (``SharedExpertMLP``: ``output * sigmoid(x @ gate_weight.T)``,
gate_weight [1, H]). Router: softmax top-k, ``norm_topk_prob`` default False. Dense layers per
``mlp_only_layers`` / ``decoder_sparse_step`` (size ``intermediate_size``).
Source: transformers ``models/qwen2_moe/modeling_qwen2_moe.py`` (Qwen2MoeSparseMoeBlock).
Left out: sliding-window attention (``use_sliding_window``), rope scaling.
"""

from __future__ import annotations

from megatron_rl.models import common
from megatron_rl.models.base import Family, register


def config_kwargs(hf: dict) -> dict:
    common.unsupported("qwen2_moe", hf, {"use_sliding_window": (False,
                                                                "no sliding-window attention")})
    kw = common.decoder_kwargs("qwen2_moe", hf)
    kw.update(common.router_kwargs(hf, num_experts=hf["num_experts"],
                                   moe_ffn_hidden_size=hf["moe_intermediate_size"],
                                   norm_topk_prob=bool(hf.get("norm_topk_prob", False))))
    shared = hf.get("shared_expert_intermediate_size", 5632) or None  # HF default 5632
    kw.update(
        ffn_hidden_size=hf["intermediate_size"],
        add_qkv_bias=bool(hf.get("qkv_bias", True)),
        moe_layer_freq=common.moe_layer_freq(hf),
        moe_shared_expert_intermediate_size=shared,
        moe_shared_expert_gate=shared is not None,
    )
    return kw


def gpt_kwargs(hf: dict) -> dict:
    return common.gpt_kwargs("qwen2_moe", hf)


FAMILY = register(Family(name="qwen2_moe", model_types=("qwen2_moe",),
                         config_kwargs=config_kwargs, gpt_kwargs=gpt_kwargs))
