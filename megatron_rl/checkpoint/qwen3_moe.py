"""Qwen3-MoE: HF transformers names <-> Megatron-Core GPTModel (local spec) names.

Source of the HF side: transformers ``models/qwen3_moe/modeling_qwen3_moe.py`` and the hub layout
of Qwen/Qwen3-30B-A3B; Megatron side: ``get_gpt_decoder_block_spec(use_transformer_engine=False)``
with SequentialMLP experts. Two on-disk expert layouts are read:
- per expert (hub, and what transformers 5 ``save_pretrained`` writes):
  ``mlp.experts.{e}.{gate,up,down}_proj.weight``  [I, H] / [I, H] / [H, I]
- fused (transformers 5 in-memory ``state_dict()``): ``mlp.experts.gate_up_proj`` [E, 2I, H]
  (rows [gate; up]) and ``mlp.experts.down_proj`` [E, H, I].
QK norm per head: ``self_attn.{q,k}_norm.weight`` [hd] -> ``self_attention.{q,k}_layernorm``.
Router ``mlp.gate.weight`` [E, H] -> ``mlp.router.weight``; dense layers (``mlp_only_layers``)
``mlp.{gate,up,down}_proj`` -> ``mlp.linear_fc1/fc2``.
Tied embeddings: ``output_layer.weight`` (last PP stage when pp > 1) comes from
``model.embed_tokens.weight``; a ``lm_head.weight`` in the checkpoint is then ignored.
Left out: attention biases (Qwen3 has none), TE spec names.
"""

from __future__ import annotations

from megatron_rl.checkpoint.adapter import (FUSED_MARKER, HL, L, Adapter, Rule, decoder_rules,
                                            dense_mlp_rules, expert_rules, fused_expert_rules,
                                            layout_rules_for, register)

BASE_RULES = [
    *decoder_rules(qk_norm="head"),
    Rule(L + "mlp.router.weight", (HL + "mlp.gate.weight",), layers="moe"),
    *dense_mlp_rules(L + "mlp.", HL + "mlp.", layers="dense"),
]
_HE = HL + "mlp.experts.{expert}."
PER_EXPERT_RULES = expert_rules(_HE + "gate_proj.weight", _HE + "up_proj.weight",
                                _HE + "down_proj.weight")
FUSED_EXPERT_RULES = fused_expert_rules()


def has_fused_experts(hf_keys: set[str]) -> bool:
    """True if the checkpoint stores experts stacked (``mlp.experts.gate_up_proj``)."""
    return any(k.endswith(FUSED_MARKER) for k in hf_keys)


rules_for = layout_rules_for(BASE_RULES + PER_EXPERT_RULES, BASE_RULES + FUSED_EXPERT_RULES)

ADAPTER = register(Adapter(name="qwen3_moe", model_types=("qwen3_moe",), rules_for=rules_for))
