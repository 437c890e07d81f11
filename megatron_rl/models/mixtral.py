"""Mixtral: HF config -> Megatron.

RMSNorm, GQA, no QK norm, RoPE (``rope_theta``), every layer MoE with SwiGLU experts of size
``intermediate_size``, softmax top-k router renormalised over the k (HF ``MixtralTopKRouter``:
softmax over all, top-k, divide by the sum -- always, there is no ``norm_topk_prob``), untied
embeddings, no biases. Source: transformers ``models/mixtral/modeling_mixtral.py``.
Left out: sliding-window attention (Mistral-style ``sliding_window``; Mixtral ships null) and
``router_jitter_noise`` (training-time input noise, 0 in the released configs; not applied).
"""

from __future__ import annotations

from megatron_rl.models import common
from megatron_rl.models.base import Family, register


def config_kwargs(hf: dict) -> dict:
    common.unsupported("mixtral", hf, {"sliding_window": (None, "no sliding-window attention")})
    kw = common.decoder_kwargs("mixtral", hf)
    kw.update(common.router_kwargs(hf, num_experts=hf["num_local_experts"],
                                   moe_ffn_hidden_size=hf["intermediate_size"],
                                   norm_topk_prob=True))
    kw.update(ffn_hidden_size=hf["intermediate_size"], moe_layer_freq=1)
    return kw


def gpt_kwargs(hf: dict) -> dict:
    return common.gpt_kwargs("mixtral", hf)


FAMILY = register(Family(name="mixtral", model_types=("mixtral",), config_kwargs=config_kwargs,
                         gpt_kwargs=gpt_kwargs))
