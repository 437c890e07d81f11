"""Mixtral: HF names <-> Megatron-Core GPTModel (local spec) names.

Source: transformers ``models/mixtral/modeling_mixtral.py`` + ``conversion_mapping.py`` (5.23)
and the hub layout of mistralai/Mixtral-8x7B-v0.1. Two on-disk layouts, both read and written:
- hub (also what transformers 5 ``save_pretrained`` writes -- it reverts its load-time
  conversion): ``block_sparse_moe.gate.weight`` [E, H] (router) and
  ``block_sparse_moe.experts.{e}.w1`` (gate) [I, H], ``w3`` (up) [I, H], ``w2`` (down) [H, I];
- transformers 5 in memory (``state_dict()``): ``mlp.gate.weight`` and stacked
  ``mlp.experts.gate_up_proj`` [E, 2I, H] (= [w1; w3] per expert), ``mlp.experts.down_proj``
  [E, H, I].
Megatron: router ``mlp.router.weight``, experts ``mlp.experts.local_experts.{e}.linear_fc1``
(= [w1; w3]) / ``linear_fc2`` (= w2). Attention and norms as Llama (no QK norm, no biases).
Left out: TE spec names.
"""

from __future__ import annotations

from megatron_rl.checkpoint.adapter import (HL, L, Adapter, Rule, decoder_rules, expert_rules,
                                            fused_expert_rules, layout_rules_for, register)

_HE = HL + "block_sparse_moe.experts.{expert}."
HUB_RULES = [
    *decoder_rules(),
    Rule(L + "mlp.router.weight", (HL + "block_sparse_moe.gate.weight",), layers="moe"),
    *expert_rules(_HE + "w1.weight", _HE + "w3.weight", _HE + "w2.weight"),
]
FUSED_RULES = [
    *decoder_rules(),
    Rule(L + "mlp.router.weight", (HL + "mlp.gate.weight",), layers="moe"),
    *fused_expert_rules(),
]

rules_for = layout_rules_for(HUB_RULES, FUSED_RULES)

ADAPTER = register(Adapter(name="mixtral", model_types=("mixtral",), rules_for=rules_for))
