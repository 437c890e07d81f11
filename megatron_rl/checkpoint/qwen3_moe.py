"""Qwen3-MoE: HF transformers names <-> Megatron-Core GPTModel (local spec) names.

Source of the HF side: transformers ``models/qwen3_moe/modeling_qwen3_moe.py`` and the hub layout
of Qwen/Qwen3-30B-A3B; Megatron side: ``get_gpt_decoder_block_spec(use_transformer_engine=False)``
with SequentialMLP experts. Two on-disk expert layouts are read:
- per expert (hub, and what transformers 5 ``save_pretrained`` writes):
  ``mlp.experts.{e}.{gate,up,down}_proj.weight``  [I, H] / [I, H] / [H, I]
- fused (transformers 5 in-memory ``state_dict()``): ``mlp.experts.gate_up_proj`` [E, 2I, H]
  (rows [gate; up]) and ``mlp.experts.down_proj`` [E, H, I].
Tied embeddings: ``output_layer.weight`` (last PP stage when pp > 1) comes from
``model.embed_tokens.weight``; a ``lm_head.weight`` in the checkpoint is then ignored.
Left out: Qwen2-MoE's shared expert, attention biases (Qwen3 has none), TE spec names.
"""

from __future__ import annotations

from megatron_rl.checkpoint.adapter import Adapter, Rule, register

L = "decoder.layers.{layer}."
HL = "model.layers.{layer}."

BASE_RULES = [
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), shard="vocab"),
    Rule("output_layer.weight", ("lm_head.weight",), shard="vocab"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule(L + "input_layernorm.weight", (HL + "input_layernorm.weight",)),
    Rule(L + "self_attention.linear_qkv.weight",
         (HL + "self_attn.q_proj.weight", HL + "self_attn.k_proj.weight",
          HL + "self_attn.v_proj.weight"), fuse="qkv", shard="column"),
    Rule(L + "self_attention.linear_proj.weight", (HL + "self_attn.o_proj.weight",), shard="row"),
    Rule(L + "self_attention.q_layernorm.weight", (HL + "self_attn.q_norm.weight",)),
    Rule(L + "self_attention.k_layernorm.weight", (HL + "self_attn.k_norm.weight",)),
    Rule(L + "pre_mlp_layernorm.weight", (HL + "post_attention_layernorm.weight",)),
    # MoE layers
    Rule(L + "mlp.router.weight", (HL + "mlp.gate.weight",), layers="moe"),
    # dense layers (mlp_only_layers / decoder_sparse_step > 1)
    Rule(L + "mlp.linear_fc1.weight", (HL + "mlp.gate_proj.weight", HL + "mlp.up_proj.weight"),
         fuse="glu", shard="glu_column", layers="dense"),
    Rule(L + "mlp.linear_fc2.weight", (HL + "mlp.down_proj.weight",), shard="row", layers="dense"),
]

E = L + "mlp.experts.local_experts.{expert}."
PER_EXPERT_RULES = [
    Rule(E + "linear_fc1.weight", (HL + "mlp.experts.{expert}.gate_proj.weight",
                                   HL + "mlp.experts.{expert}.up_proj.weight"),
         fuse="glu", shard="glu_column", layers="moe"),
    Rule(E + "linear_fc2.weight", (HL + "mlp.experts.{expert}.down_proj.weight",), shard="row",
         layers="moe"),
]
FUSED_EXPERT_RULES = [
    Rule(E + "linear_fc1.weight", (HL + "mlp.experts.gate_up_proj[{expert}]",),
         shard="glu_column", layers="moe"),
    Rule(E + "linear_fc2.weight", (HL + "mlp.experts.down_proj[{expert}]",), shard="row",
         layers="moe"),
]


def has_fused_experts(hf_keys: set[str]) -> bool:
    """True if the checkpoint stores experts stacked (``mlp.experts.gate_up_proj``)."""
    return any(k.endswith(".mlp.experts.gate_up_proj") for k in hf_keys)


def rules_for(hf_keys: set[str], hf_config: dict, *, fused_experts: bool | None = None
              ) -> tuple[list[Rule], set[str]]:
    """The rules for a checkpoint holding ``hf_keys`` and the HF keys to ignore.

    Args:
        hf_keys: tensor names in the checkpoint (used to detect the expert layout).
        hf_config: HF config dict (``tie_word_embeddings``).
        fused_experts: force the expert layout (export); None = detect from ``hf_keys``.
    """
    fused = has_fused_experts(hf_keys) if fused_experts is None else fused_experts
    rules = BASE_RULES + (FUSED_EXPERT_RULES if fused else PER_EXPERT_RULES)
    ignored: set[str] = set()
    if hf_config.get("tie_word_embeddings", False):
        rules = [Rule("output_layer.weight", ("model.embed_tokens.weight",), shard="vocab")
                 if r.megatron == "output_layer.weight" else r for r in rules]
        ignored.add("lm_head.weight")
    return rules, ignored


ADAPTER = register(Adapter(name="qwen3_moe", model_types=("qwen3_moe",), rules_for=rules_for))
