"""OLMoE: HF names <-> Megatron-Core GPTModel names (local spec + ``FullWidthQKNorm``).

Source: transformers ``models/olmoe/modeling_olmoe.py`` and the hub layout of
allenai/OLMoE-1B-7B-0924. As Qwen3-MoE (per-expert ``mlp.experts.{e}.{gate,up,down}_proj`` on
disk -- also what transformers 5 ``save_pretrained`` writes -- or the stacked in-memory
``mlp.experts.gate_up_proj`` / ``down_proj``; router ``mlp.gate``), except the QK norm spans the
whole projection: ``self_attn.q_norm.weight`` [nh*hd] and ``k_norm.weight`` [ng*hd] ->
``self_attention.{q,k}_layernorm.weight`` (``models.olmoe.FullWidthQKNorm``), split over TP by
heads (contiguous 1/tp, "column"). No dense layers.
"""

from __future__ import annotations

from megatron_rl.checkpoint.adapter import (HL, L, Adapter, Rule, decoder_rules, expert_rules,
                                            fused_expert_rules, layout_rules_for, register)

BASE_RULES = [
    *decoder_rules(qk_norm="full"),
    Rule(L + "mlp.router.weight", (HL + "mlp.gate.weight",), layers="moe"),
]
_HE = HL + "mlp.experts.{expert}."
rules_for = layout_rules_for(
    BASE_RULES + expert_rules(_HE + "gate_proj.weight", _HE + "up_proj.weight",
                              _HE + "down_proj.weight"),
    BASE_RULES + fused_expert_rules())

ADAPTER = register(Adapter(name="olmoe", model_types=("olmoe",), rules_for=rules_for))
