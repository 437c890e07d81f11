"""DeepSeek-V3: HF transformers names <-> Megatron-Core GPTModel (local spec, MLA) names.

Source of the HF side: transformers 5 ``models/deepseek_v3/modeling_deepseek_v3.py`` and the hub
layout of deepseek-ai/DeepSeek-V3; Megatron side: ``MLASelfAttention`` built by
``get_gpt_decoder_block_spec(use_transformer_engine=False)`` with ``qk_layernorm=True``,
SequentialMLP experts, ``SharedExpertMLP``, ``TopKRouter`` with expert bias.

Legend: H hidden, n heads, dn/dr/dv = qk_nope/qk_rope/v head dims, rq = q_lora_rank,
rkv = kv_lora_rank, E routed experts, I = moe_intermediate_size, Is = n_shared_experts * I.

Megatron ``decoder.layers.{l}.``X  <-  HF ``model.layers.{l}.``Y  [shape] (TP sharding):
- self_attention.linear_q_down_proj (rq set)   <- self_attn.q_a_proj  [rq, H] (column)
- self_attention.q_layernorm (rq set)          <- self_attn.q_a_layernorm  [rq] (replicated)
- self_attention.linear_q_up_proj (rq set)     <- self_attn.q_b_proj  [n(dn+dr), rq] (column)
- self_attention.linear_q_proj (rq None)       <- self_attn.q_proj  [n(dn+dr), H] (column)
- self_attention.linear_kv_down_proj           <- self_attn.kv_a_proj_with_mqa  [rkv+dr, H] (column)
- self_attention.kv_layernorm                  <- self_attn.kv_a_layernorm  [rkv] (replicated)
- self_attention.linear_kv_up_proj             <- self_attn.kv_b_proj  [n(dn+dv), rkv] (column)
- self_attention.linear_proj                   <- self_attn.o_proj  [H, n*dv] (row)
- mlp.linear_fc1 / fc2 (dense layers)          <- mlp.{gate,up}_proj / down_proj (glu / row)
- mlp.router.weight (moe)                      <- mlp.gate.weight  [E, H] (replicated)
- mlp.router.expert_bias (buffer, moe)         <- mlp.gate.e_score_correction_bias  [E] fp32
- mlp.shared_experts.linear_fc1 / fc2 (moe)    <- mlp.shared_experts.{gate,up}_proj / down_proj
                                                  [2Is, H] / [H, Is] (glu / row)
- mlp.experts.local_experts.{e}.linear_fc1/fc2 <- mlp.experts.{E}.{gate,up,down}_proj
                                                  [2I, H] / [H, I] (glu / row; e local, E global)

The column-sharded down projections (Megatron's local spec uses ColumnParallelLinear and
all-gathers their output) are split in contiguous row blocks. Rows are copied as is: HF's
``rope_interleave=True`` and Megatron's MLA RoPE read the rope channels the same way (see
``megatron_rl.models.deepseek_v3``). Experts are read per expert (hub / ``save_pretrained``) or
stacked (transformers 5 in-memory ``gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I]).
MTP: hub checkpoints store ``num_nextn_predict_layers`` extra layers as
``model.layers.{num_hidden_layers + i}.*``; they are ignored (logged), never loaded or exported.
Left out: TE spec names (``linear_q_up_proj.layer_norm_weight``), MTP weights.
"""

from __future__ import annotations

import logging
import re

from megatron_rl.checkpoint.adapter import (HL, L, Adapter, Rule, dense_mlp_rules, expert_rules,
                                            fused_expert_rules, register, tie_embeddings,
                                            FUSED_MARKER)

log = logging.getLogger(__name__)

A, HA = L + "self_attention.", HL + "self_attn."

BASE_RULES = [
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), shard="vocab"),
    Rule("output_layer.weight", ("lm_head.weight",), shard="vocab"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule(L + "input_layernorm.weight", (HL + "input_layernorm.weight",)),
    Rule(A + "linear_kv_down_proj.weight", (HA + "kv_a_proj_with_mqa.weight",), shard="column"),
    Rule(A + "kv_layernorm.weight", (HA + "kv_a_layernorm.weight",)),
    Rule(A + "linear_kv_up_proj.weight", (HA + "kv_b_proj.weight",), shard="column"),
    Rule(A + "linear_proj.weight", (HA + "o_proj.weight",), shard="row"),
    Rule(L + "pre_mlp_layernorm.weight", (HL + "post_attention_layernorm.weight",)),
    *dense_mlp_rules(L + "mlp.", HL + "mlp.", layers="dense"),
    Rule(L + "mlp.router.weight", (HL + "mlp.gate.weight",), layers="moe"),
    Rule(L + "mlp.router.expert_bias", (HL + "mlp.gate.e_score_correction_bias",), layers="moe"),
]
Q_LORA_RULES = [
    Rule(A + "linear_q_down_proj.weight", (HA + "q_a_proj.weight",), shard="column"),
    Rule(A + "q_layernorm.weight", (HA + "q_a_layernorm.weight",)),
    Rule(A + "linear_q_up_proj.weight", (HA + "q_b_proj.weight",), shard="column"),
]
Q_DIRECT_RULES = [Rule(A + "linear_q_proj.weight", (HA + "q_proj.weight",), shard="column")]
_HE = HL + "mlp.experts.{expert}."
PER_EXPERT_RULES = expert_rules(_HE + "gate_proj.weight", _HE + "up_proj.weight",
                                _HE + "down_proj.weight")
FUSED_EXPERT_RULES = fused_expert_rules()
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def shared_expert_rules(hf_config: dict) -> list[Rule]:
    """Shared-expert SwiGLU (``n_shared_experts`` > 0), TP-sharded like a dense MLP."""
    if not hf_config.get("n_shared_experts"):
        return []
    return dense_mlp_rules(L + "mlp.shared_experts.", HL + "mlp.shared_experts.", layers="moe")


def mtp_keys(hf_keys: set[str], hf_config: dict) -> set[str]:
    """HF keys of the multi-token-prediction layers (layer index >= ``num_hidden_layers``)."""
    n = hf_config["num_hidden_layers"]
    return {k for k in hf_keys if (m := _LAYER.match(k)) and int(m.group(1)) >= n}


def rules_for(hf_keys: set[str], hf_config: dict, *, fused_experts: bool | None = None
              ) -> tuple[list[Rule], set[str]]:
    """Rules for a DeepSeek-V3 checkpoint holding ``hf_keys`` (see ``Adapter.rules_for``).

    q path by ``q_lora_rank`` (None: direct ``q_proj``); experts per-expert or stacked (detected,
    or forced by ``fused_experts``); tied embeddings; MTP layer keys returned as ignored."""
    is_fused = (any(k.endswith(FUSED_MARKER) for k in hf_keys) if fused_experts is None
                else fused_experts)
    rules = [*BASE_RULES, *(Q_LORA_RULES if hf_config.get("q_lora_rank") else Q_DIRECT_RULES),
             *shared_expert_rules(hf_config),
             *(FUSED_EXPERT_RULES if is_fused else PER_EXPERT_RULES)]
    rules, ignored = tie_embeddings(rules, hf_config)
    mtp = mtp_keys(hf_keys, hf_config)
    if mtp:
        log.info("deepseek_v3: ignoring %d MTP tensors (num_nextn_predict_layers=%s; layers >= "
                 "%d): MTP is not mapped", len(mtp), hf_config.get("num_nextn_predict_layers"),
                 hf_config["num_hidden_layers"])
    return rules, ignored | mtp


ADAPTER = register(Adapter(name="deepseek_v3", model_types=("deepseek_v3",), rules_for=rules_for))
