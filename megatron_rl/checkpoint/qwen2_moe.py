"""Qwen2-MoE: HF names <-> Megatron-Core GPTModel (local spec) names.

Source: transformers ``models/qwen2_moe/modeling_qwen2_moe.py`` and the hub layout of
Qwen/Qwen1.5-MoE-A2.7B. As Qwen3-MoE (per-expert or stacked experts, router ``mlp.gate``, dense
``mlp_only_layers``), without QK norm, plus:
- q/k/v biases ``self_attn.{q,k,v}_proj.bias`` -> ``self_attention.linear_qkv.bias``, fused in
  the weight's per-group [q heads; k; v] layout (``transforms.fuse_qkv`` on 1-D tensors);
- the shared expert ``mlp.shared_expert.{gate,up,down}_proj.weight`` ->
  ``mlp.shared_experts.linear_fc1`` ([gate; up]) / ``linear_fc2`` (Megatron
  ``SharedExpertMLP``, TP-sharded like a dense MLP), and its sigmoid gate
  ``mlp.shared_expert_gate.weight`` [1, H] -> ``mlp.shared_experts.gate_weight`` (replicated).
"""

from __future__ import annotations

from megatron_rl.checkpoint.adapter import (HL, L, Adapter, Rule, decoder_rules, dense_mlp_rules,
                                            expert_rules, fused_expert_rules, layout_rules_for,
                                            register)

BASE_RULES = [
    *decoder_rules(qkv_bias=True),
    Rule(L + "mlp.router.weight", (HL + "mlp.gate.weight",), layers="moe"),
    *dense_mlp_rules(L + "mlp.", HL + "mlp.", layers="dense"),
    *dense_mlp_rules(L + "mlp.shared_experts.", HL + "mlp.shared_expert.", layers="moe"),
    Rule(L + "mlp.shared_experts.gate_weight", (HL + "mlp.shared_expert_gate.weight",),
         layers="moe"),
]
_HE = HL + "mlp.experts.{expert}."
_by_layout = layout_rules_for(
    BASE_RULES + expert_rules(_HE + "gate_proj.weight", _HE + "up_proj.weight",
                              _HE + "down_proj.weight"),
    BASE_RULES + fused_expert_rules())


def rules_for(hf_keys: set[str], hf_config: dict, *, fused_experts: bool | None = None
              ) -> tuple[list[Rule], set[str]]:
    """``layout_rules_for``'s rules without the q/k/v bias (``qkv_bias`` false) or shared-expert
    rules (``shared_expert_intermediate_size`` 0) the config has no tensors for, so such keys in
    a checkpoint are reported as unexpected instead of silently skipped."""
    rules, ignored = _by_layout(hf_keys, hf_config, fused_experts=fused_experts)
    if not hf_config.get("qkv_bias", True):
        rules = [r for r in rules if not r.megatron.endswith("linear_qkv.bias")]
    if not hf_config.get("shared_expert_intermediate_size", 5632):
        rules = [r for r in rules if ".shared_experts." not in r.megatron]
    return rules, ignored

ADAPTER = register(Adapter(name="qwen2_moe", model_types=("qwen2_moe",), rules_for=rules_for))
