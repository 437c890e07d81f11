"""DeepSeek-V3: HF config -> Megatron ``MLATransformerConfig`` (multi-latent attention + MoE).

Source: transformers ``models/deepseek_v3/modeling_deepseek_v3.py`` (5.x) and the
deepseek-ai/DeepSeek-V3 ``config.json``; Megatron side: ``MLASelfAttention`` (local spec) and
``TopKRouter`` of megatron-core 0.19.2.

Mapping (HF field -> Megatron field):
- MLA: ``q_lora_rank`` (None = direct ``q_proj``) -> ``q_lora_rank``; ``kv_lora_rank``;
  ``qk_nope_head_dim`` -> ``qk_head_dim``; ``qk_rope_head_dim`` -> ``qk_pos_emb_head_dim``;
  ``v_head_dim``. ``q_a_layernorm`` / ``kv_a_layernorm`` exist in Megatron's local spec only with
  ``qk_layernorm=True`` (otherwise they are IdentityOp), so it is always set.
- RoPE: HF ``rope_interleave=True`` (the default, and DeepSeek's checkpoints) de-interleaves the
  rope channels (``x[0::2], x[1::2]``) before rotate-half -- exactly Megatron's
  ``mla_rotary_interleaved=True`` path, which MLA always takes. No weight permutation needed;
  ``rope_interleave=False`` raises. YaRN (``rope_scaling``/``rope_parameters`` type "yarn")
  -> ``rope_type="yarn"``, ``rotary_scaling_factor``, ``original_max_position_embeddings``,
  ``beta_fast``/``beta_slow``, ``mscale``/``mscale_all_dim`` (attention factor and the
  ``mscale_all_dim**2`` softmax scale are computed the same way on both sides).
- Router: sigmoid scores + ``e_score_correction_bias`` (selection only) -> ``score_function=
  "sigmoid"``, ``moe_router_enable_expert_bias`` (buffer ``mlp.router.expert_bias``);
  ``n_group``/``topk_group`` -> ``moe_router_num_groups``/``moe_router_group_topk`` (Megatron
  scores a group by the sum of its top ``topk // group_topk`` experts, HF by its top 2: equal
  only when ``num_experts_per_tok // topk_group == 2``, else ValueError);
  ``routed_scaling_factor`` -> ``moe_router_topk_scaling_factor``. Megatron's sigmoid router
  always renormalises the top-k (k > 1), so ``norm_topk_prob=False`` raises.
  ``moe_router_bias_update_rate`` defaults to 0 (the bias is frozen, as in HF); override it
  through ``ModelOptions.overrides`` for aux-loss-free balancing during training.
- Shared experts: ``n_shared_experts * moe_intermediate_size`` ->
  ``moe_shared_expert_intermediate_size`` (no shared-expert gate).
- Dense layers: the first ``first_k_dense_replace`` layers (``intermediate_size``) ->
  ``moe_layer_freq`` list.
Left out: MTP (``num_nextn_predict_layers``: the checkpoint adapter ignores its weights),
attention biases, ``rope_interleave=False``, HF YaRN ``truncate=False`` / explicit
``attention_factor``, ``topk_method`` other than "noaux_tc".
"""

from __future__ import annotations

import dataclasses
import functools

import torch.nn.functional as F

from megatron_rl.models import common
from megatron_rl.models.base import Family, register

NAME = "deepseek_v3"


def rope_kwargs(hf: dict) -> dict:
    """RoPE fields of ``MLATransformerConfig`` from ``rope_parameters`` (transformers 5) or
    ``rope_scaling`` + ``rope_theta`` (hub config.json).

    Raises ValueError for rope types other than default / yarn, YaRN without truncation, an
    explicit ``attention_factor``, or ``rope_interleave=False``."""
    if not hf.get("rope_interleave", True):
        raise ValueError(f"{NAME}: rope_interleave=False is not supported (Megatron MLA always "
                         "de-interleaves the rope channels)")
    scaling = hf.get("rope_scaling") or {}
    params = {**(hf.get("rope_parameters") or {}), **scaling}
    kind = (scaling.get("rope_type") or scaling.get("type") or params.get("rope_type")
            or "default")
    base = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    if kind == "default":
        return dict(rope_type="rope", rotary_base=base, rotary_scaling_factor=1.0,
                    mscale=1.0, mscale_all_dim=0.0)
    if kind != "yarn":
        raise ValueError(f"{NAME}: rope_type {kind!r} is not supported ('default' or 'yarn')")
    if params.get("attention_factor") is not None or params.get("truncate", True) is False:
        raise ValueError(f"{NAME}: YaRN attention_factor / truncate=False are not supported")
    m, m_all = params.get("mscale"), params.get("mscale_all_dim")
    # HF's attention factor: get_mscale(f, m) / get_mscale(f, m_all) if both set, else
    # get_mscale(f); Megatron's: the ratio unless mscale is None.
    mscale = float(m) if (m and m_all) else None
    return dict(
        rope_type="yarn", rotary_base=base,
        rotary_scaling_factor=float(params["factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=mscale, mscale_all_dim=float(m_all or 0.0),
    )


def router_kwargs(hf: dict) -> dict:
    """Sigmoid + expert-bias + group-limited top-k router (TransformerConfig kwargs).

    Raises ValueError where Megatron's router would compute different numbers."""
    common.unsupported(NAME, hf, {"norm_topk_prob": (True, "Megatron's sigmoid router always "
                                                     "renormalises the top-k"),
                                  "topk_method": ("noaux_tc", "only noaux_tc routing"),
                                  "scoring_func": ("sigmoid", "only sigmoid scores")})
    topk, n_group = hf["num_experts_per_tok"], hf.get("n_group") or 1
    topk_group = hf.get("topk_group") or 1
    grouped = n_group > 1
    if grouped and topk // topk_group != 2:
        raise ValueError(f"{NAME}: num_experts_per_tok // topk_group = {topk}//{topk_group} != 2 "
                         "(HF scores a group by its top-2 experts, Megatron by its top "
                         "topk//group_topk)")
    n_shared = hf.get("n_shared_experts") or 0
    return dict(
        num_moe_experts=hf["n_routed_experts"],
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        moe_router_topk=topk,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.0,
        moe_router_num_groups=n_group if grouped else None,
        moe_router_group_topk=topk_group if grouped else None,
        moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
        moe_router_pre_softmax=False,
        moe_router_dtype="fp32",
        moe_shared_expert_intermediate_size=(n_shared * hf["moe_intermediate_size"]
                                             if n_shared else None),
        moe_shared_expert_overlap=False,
    )


def config_kwargs(hf: dict) -> dict:
    common.unsupported(NAME, hf, {"hidden_act": ("silu", "experts are SwiGLU"),
                                  "attention_bias": (False, "attention biases are not mapped")})
    n, k = hf["num_hidden_layers"], hf.get("first_k_dense_replace") or 0
    heads = hf["num_attention_heads"]
    kw = dict(
        num_layers=n, hidden_size=hf["hidden_size"], num_attention_heads=heads,
        num_query_groups=heads,
        normalization="RMSNorm", layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=False,
        multi_latent_attention=True, qk_layernorm=True,
        q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
        qk_head_dim=hf["qk_nope_head_dim"], qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"], rotary_percent=1.0,
        ffn_hidden_size=hf["intermediate_size"],
        moe_layer_freq=[0] * min(k, n) + [1] * max(n - k, 0),
    )
    kw.update(rope_kwargs(hf))
    kw.update(router_kwargs(hf))
    return kw


def gpt_kwargs(hf: dict) -> dict:
    """GPTModel kwargs. MLA builds its own rotary embedding (GPTModel skips its one when
    ``multi_latent_attention``); ``rotary_base`` is passed for completeness."""
    return dict(
        vocab_size=hf["vocab_size"],
        max_sequence_length=hf.get("max_position_embeddings", 4096),
        position_embedding_type="rope",
        rotary_base=int(rope_kwargs(hf)["rotary_base"]),
        rotary_percent=1.0,
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
    )


def check_parallel(hf: dict, sizes: dict) -> None:
    """The local spec column-shards the MLA down projections over TP too: their output widths
    (``q_lora_rank``, ``kv_lora_rank + qk_rope_head_dim``) and the head count must divide."""
    tp = sizes["tp"]
    widths = {"num_attention_heads": hf["num_attention_heads"],
              "kv_lora_rank + qk_rope_head_dim": hf["kv_lora_rank"] + hf["qk_rope_head_dim"]}
    if hf.get("q_lora_rank"):
        widths["q_lora_rank"] = hf["q_lora_rank"]
    bad = [f"{k}={v}" for k, v in widths.items() if v % tp]
    if bad:
        raise ValueError(f"{NAME}: tp={tp} does not divide {', '.join(bad)}")


def layer_spec(block_spec, config):
    """Edit every layer's MLA spec: swap Megatron's local ``DotProductAttention`` for
    ``MLADotProductAttention`` (the local one rejects MLA's ``k_channels``/``v_channels``; TE
    specs are kept) and, with ``q_lora_rank=None``, use ``DirectQMLASelfAttention`` without a
    q norm (HF has no ``q_a_layernorm`` then; Megatron's resolver would ask for a TE fused
    norm+linear ``linear_q_proj``, i.e. a second norm HF does not have)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    layers = []
    for spec in block_spec.layer_specs:
        attn = spec.submodules.self_attention
        edits = {}
        if attn.submodules.core_attention is DotProductAttention:
            edits["core_attention"] = mla_dot_product_attention_cls()
        if config.q_lora_rank is None:
            edits["q_layernorm"] = IdentityOp
        attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, **edits))
        if config.q_lora_rank is None and attn.module is MLASelfAttention:
            attn = dataclasses.replace(attn, module=direct_q_mla_self_attention_cls())
        layers.append(dataclasses.replace(spec, submodules=dataclasses.replace(
            spec.submodules, self_attention=attn)))
    return dataclasses.replace(block_spec, layer_specs=layers)


@functools.cache
def mla_dot_product_attention_cls():
    """``DotProductAttention`` accepting MLA's ``k_channels`` (qk_nope + qk_rope head dim) and
    ``v_channels`` (v_head_dim): query/key [s, b, np, k_channels], value [s, b, np, v_channels]
    -> context [s, b, np * v_channels]. The softmax scale comes from MLA (incl. YaRN mscale)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        def __init__(self, *args, k_channels: int | None = None, v_channels: int | None = None,
                     **kwargs):
            super().__init__(*args, **kwargs)
            if v_channels is not None:  # the context view uses [np_local * v_head_dim]
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    return MLADotProductAttention


@functools.cache
def direct_q_mla_self_attention_cls():
    """``MLASelfAttention`` for ``q_lora_rank=None`` with separate (non-fused) norms: q from
    ``linear_q_proj(hidden)`` with no q norm, kv norm as a standalone module (HF DeepSeek-V2-Lite
    style). Megatron 0.19.2's ``QKNormConfigResolver`` only allows a fused norm+linear there."""
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    class DirectQMLASelfAttention(MLASelfAttention):
        def _resolve_qk_norm_config(self, submodules):
            assert self.config.q_lora_rank is None
            return dict(linear_q_proj=submodules.linear_q_proj, linear_q_up_proj=IdentityOp,
                        linear_kv_up_proj=submodules.linear_kv_up_proj, q_layernorm=IdentityOp,
                        kv_layernorm=submodules.kv_layernorm)

    return DirectQMLASelfAttention


def mla_config(**kw):
    """``MLATransformerConfig(**kw)``, imported on first use (importing the family registry does
    not import Megatron)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    return MLATransformerConfig(**kw)


FAMILY = register(
    Family(name=NAME, model_types=(NAME,), config_kwargs=config_kwargs, gpt_kwargs=gpt_kwargs,
           layer_spec=layer_spec, check_parallel=check_parallel,
           config_cls=mla_config)
)
