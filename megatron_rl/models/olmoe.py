"""OLMoE: HF config -> Megatron, with a full-width QK norm.

RMSNorm, GQA, RoPE, every layer MoE (SwiGLU experts of ``intermediate_size``), softmax top-k
router with ``norm_topk_prob`` (default False), untied embeddings, no biases.
Source: transformers ``models/olmoe/modeling_olmoe.py``.

QK norm: OLMoE normalises the WHOLE projection -- ``q_norm = RMSNorm(nh*hd)`` on ``q_proj(x)``
and ``k_norm = RMSNorm(ng*hd)`` on ``k_proj(x)``, before the split into heads -- whereas
Megatron's ``qk_layernorm`` normalises each head over ``hd``. The two differ (one RMS per token
vs one per head), so the layer spec swaps ``q_layernorm`` / ``k_layernorm`` for
``FullWidthQKNorm``: RMS over all heads of the token, weight [nh*hd] / [ng*hd]. Under tensor
parallelism a rank holds nh/tp query heads (ng/tp key heads): its weight is the matching
contiguous 1/tp slice (a TP-sharded parameter, partition dim 0) and the sum of squares is
all-reduced over the TP group (backward: all-reduce of the gradient), which is exact.
Refused: TP with fewer key heads than ranks (Megatron then replicates key heads across ranks,
so a rank's keys are not a slice of the projection), ``clip_qkv``, ``attention_bias``.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from megatron_rl.models import common
from megatron_rl.models.base import Family, register


def config_kwargs(hf: dict) -> dict:
    common.unsupported("olmoe", hf, {
        "clip_qkv": (None, "q/k/v clamping is not in Megatron attention"),
        "attention_bias": (False, "q/k/v/o biases are not mapped")})
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise ValueError(f"olmoe: head_dim={hf['head_dim']} != hidden_size / heads "
                         f"({hf['hidden_size']} / {heads}); HF's q_norm is hidden_size wide")
    kw = common.decoder_kwargs("olmoe", hf)
    kw.update(common.router_kwargs(hf, num_experts=hf["num_experts"],
                                   moe_ffn_hidden_size=hf["intermediate_size"],
                                   norm_topk_prob=bool(hf.get("norm_topk_prob", False))))
    kw.update(ffn_hidden_size=hf["intermediate_size"], moe_layer_freq=1, qk_layernorm=True)
    return kw


def gpt_kwargs(hf: dict) -> dict:
    return common.gpt_kwargs("olmoe", hf)


def check_parallel(hf: dict, sizes: dict) -> None:
    """Refuse TP sizes that split a key head's group (``num_key_value_heads % tp != 0``)."""
    ng = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if ng % sizes["tp"]:
        raise ValueError(f"olmoe: tp={sizes['tp']} must divide num_key_value_heads={ng}: the "
                         "full-width k_norm needs each rank to hold whole key heads")


class _AllReduceSum(torch.autograd.Function):
    """Sum over a process group; the gradient is summed over the group as well (every rank's
    copy of the sum feeds that rank's heads, so d loss / d sum is the sum of the ranks' parts)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class FullWidthQKNorm(torch.nn.Module):
    """RMSNorm over all heads of a token's q (or k), TP-sharded by heads.

    Args (as Megatron's ``SelfAttention`` builds q/k norms, plus ``which``):
        hidden_size: head_dim (checked against ``config.kv_channels``).
        config: TransformerConfig (heads, groups, TP size, params dtype).
        eps: RMSNorm epsilon.
        which: "q" (width nh*hd) or "k" (width ng*hd).
    Forward: x [sq, b, n_local, hd] -> same shape and dtype;
    ``y = weight_local * (x / sqrt(mean_over_all_heads(x^2) + eps))`` in fp32, cast back before
    the weight multiply (as HF ``OlmoeRMSNorm``). Raises ValueError if TP does not divide the
    heads.
    """

    def __init__(self, hidden_size: int, config, eps: float = 1e-6, *, which: str):
        super().__init__()
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        heads = config.num_attention_heads if which == "q" else config.num_query_groups
        if hidden_size != config.kv_channels:
            raise ValueError(f"FullWidthQKNorm: head size {hidden_size} != {config.kv_channels}")
        self.tp = ps.get_tensor_model_parallel_world_size()
        if heads % self.tp:
            raise ValueError(f"FullWidthQKNorm({which}): tp={self.tp} does not divide {heads} "
                             "heads")
        self.full_width = heads * hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(self.full_width // self.tp,
                                                    dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        x32 = x.float().flatten(-2)  # [sq, b, n_local * hd]
        sumsq = x32.pow(2).sum(-1, keepdim=True)  # [sq, b, 1]
        if self.tp > 1:
            sumsq = _AllReduceSum.apply(sumsq, ps.get_tensor_model_parallel_group())
        y = (x32 * torch.rsqrt(sumsq / self.full_width + self.eps)).to(x.dtype)
        return (self.weight * y).view_as(x)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Distributed-checkpoint view: ``weight`` sharded over TP along dim 0."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)


def layer_spec(block_spec, config):
    """Megatron's decoder block spec with ``FullWidthQKNorm`` as q/k layernorm in every layer."""
    q = functools.partial(FullWidthQKNorm, which="q")
    k = functools.partial(FullWidthQKNorm, which="k")
    layers = []
    for spec in block_spec.layer_specs:
        attn = spec.submodules.self_attention
        attn = dataclasses.replace(attn, submodules=dataclasses.replace(
            attn.submodules, q_layernorm=q, k_layernorm=k))
        layers.append(dataclasses.replace(spec, submodules=dataclasses.replace(
            spec.submodules, self_attention=attn)))
    return dataclasses.replace(block_spec, layer_specs=layers)


FAMILY = register(Family(name="olmoe", model_types=("olmoe",), config_kwargs=config_kwargs,
                         gpt_kwargs=gpt_kwargs, layer_spec=layer_spec,
                         check_parallel=check_parallel))
