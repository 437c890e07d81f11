"""Declarative HF <-> Megatron-Core name maps: the ``Rule`` type, pattern matching, the registry.

Legend: ``{layer}`` = decoder layer index, ``{expert}`` = routed-expert index. In Megatron names
both are LOCAL (this rank's pipeline stage / expert-parallel slice); in HF names both are GLOBAL.
An HF source written ``name[{expert}]`` is one row (dim 0) of a stacked tensor (transformers' fused
in-memory expert layout). The loader (``hf_loader``) turns local indices into global ones.

A family adapter (``qwen3_moe.py``, ``mixtral.py``, ...) is a list of ``Rule``s per on-disk expert
layout, built from the Llama-style pieces below (``decoder_rules``, ``dense_mlp_rules``,
``expert_rules``, ``fused_expert_rules``); ``layout_rules_for`` makes its ``rules_for(hf_keys,
hf_config)``, which picks the variant that matches what the checkpoint holds (per-expert vs
fused experts) and applies tied embeddings. TE spec names (``linear_qkv.layer_norm_weight``,
grouped-GEMM ``linear_fc1.weight{j}``) are read as local-spec names before matching
(``checkpoint.te_names``), so the rules name the local spec only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

SHARDS = (None, "column", "row", "glu_column", "vocab")


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter and the HF tensors it is made of.

    Attributes:
        megatron: Megatron parameter name pattern (local ``{layer}``/``{expert}``).
        hf: HF tensor name patterns (global indices), in the order ``fuse`` takes them.
        fuse: name of a transform in ``transforms.FUSES`` ("qkv", "glu") or None (one source,
            copied as is).
        shard: how the full (fused) tensor is split over tensor parallel ranks: None
            (replicated), "column" (dim 0), "row" (dim 1), "glu_column" (each half of dim 0,
            for [gate; up]) or "vocab" (pad rows to the padded vocab, then dim 0).
        layers: which decoder layers have this parameter: "all", "moe" or "dense"
            (ignored for patterns without ``{layer}``).
    The group is ETP for patterns with ``{expert}``, TP otherwise.
    """

    megatron: str
    hf: tuple[str, ...]
    fuse: str | None = None
    shard: str | None = None
    layers: str = "all"
    _regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.shard not in SHARDS:
            raise ValueError(f"{self.megatron}: shard {self.shard!r} not in {SHARDS}")
        if self.fuse is None and len(self.hf) != 1:
            raise ValueError(f"{self.megatron}: {len(self.hf)} HF sources need a fuse transform")
        object.__setattr__(self, "_regex", _compile(self.megatron))

    @property
    def is_expert(self) -> bool:
        return "{expert}" in self.megatron

    def match(self, name: str) -> dict[str, int] | None:
        """``{"layer": i, "expert": j}`` (local indices present in the pattern) or None."""
        m = self._regex.fullmatch(name)
        return None if m is None else {k: int(v) for k, v in m.groupdict().items()}

    def hf_names(self, layer: int | None = None, expert: int | None = None) -> list[str]:
        """HF source names for GLOBAL indices (``[{expert}]`` row selectors kept, filled in)."""
        return [s.format(layer=layer, expert=expert) for s in self.hf]


def _compile(pattern: str) -> re.Pattern:
    out = re.escape(pattern)
    for key in ("layer", "expert"):
        out = out.replace(re.escape("{" + key + "}"), rf"(?P<{key}>\d+)")
    return re.compile(out)


def split_row_selector(source: str) -> tuple[str, int | None]:
    """``"a.b[3]"`` -> ``("a.b", 3)``; ``"a.b"`` -> ``("a.b", None)``."""
    m = re.fullmatch(r"(.*)\[(\d+)\]", source)
    return (source, None) if m is None else (m.group(1), int(m.group(2)))


@dataclass(frozen=True)
class Adapter:
    """A model family's conversion.

    ``rules_for(hf_keys, hf_config, *, fused_experts=None) -> (rules, ignored_hf_keys)``: the
    rules for a checkpoint holding ``hf_keys``; ``fused_experts`` forces the expert layout
    (export), None detects it from ``hf_keys``."""

    name: str
    model_types: tuple[str, ...]
    rules_for: Callable[..., tuple[list[Rule], set[str]]]


ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    for mt in adapter.model_types:
        ADAPTERS[mt] = adapter
    return adapter


def get_adapter(hf_config: dict) -> Adapter:
    """Adapter for an HF config dict. Raises ValueError listing the supported model types."""
    mt = hf_config.get("model_type")
    if mt not in ADAPTERS:
        raise ValueError(f"no checkpoint adapter for model_type={mt!r}; "
                         f"supported: {sorted(ADAPTERS)}")
    return ADAPTERS[mt]


def find_rule(rules: list[Rule], name: str) -> tuple[Rule, dict[str, int]] | None:
    """The one rule matching a Megatron name, with its local indices; None if none does.

    Raises ValueError if two rules match (the table must be unambiguous)."""
    hits = [(r, m) for r in rules if (m := r.match(name)) is not None]
    if len(hits) > 1:
        raise ValueError(f"{name} matches several rules: {[r.megatron for r, _ in hits]}")
    return hits[0] if hits else None


# ---------------------------------------------------------------- Llama-style building blocks

L = "decoder.layers.{layer}."
HL = "model.layers.{layer}."
E = L + "mlp.experts.local_experts.{expert}."
ATTN = L + "self_attention."
HATTN = HL + "self_attn."


def decoder_rules(*, qkv_bias: bool = False, qk_norm: str | None = None) -> list[Rule]:
    """Embedding, output, final / input / pre-MLP RMSNorms and attention of a Llama-style model.

    Args:
        qkv_bias: q/k/v biases fused into ``linear_qkv.bias`` (same per-group layout as the
            weight, column-sharded).
        qk_norm: None; "head" (Qwen3: ``q_norm``/``k_norm`` [hd], replicated over TP); or
            "full" (OLMoE: [nh*hd] / [ng*hd], column-sharded by heads).
    """
    qkv = tuple(HATTN + f"{p}_proj.weight" for p in "qkv")
    rules = [
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), shard="vocab"),
        Rule("output_layer.weight", ("lm_head.weight",), shard="vocab"),
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
        Rule(L + "input_layernorm.weight", (HL + "input_layernorm.weight",)),
        Rule(ATTN + "linear_qkv.weight", qkv, fuse="qkv", shard="column"),
        Rule(ATTN + "linear_proj.weight", (HATTN + "o_proj.weight",), shard="row"),
        Rule(L + "pre_mlp_layernorm.weight", (HL + "post_attention_layernorm.weight",)),
    ]
    if qkv_bias:
        rules.append(Rule(ATTN + "linear_qkv.bias", tuple(HATTN + f"{p}_proj.bias" for p in "qkv"),
                          fuse="qkv", shard="column"))
    if qk_norm is not None:
        if qk_norm not in ("head", "full"):
            raise ValueError(f"qk_norm {qk_norm!r} not in ('head', 'full')")
        shard_kind = "column" if qk_norm == "full" else None
        rules += [Rule(ATTN + "q_layernorm.weight", (HATTN + "q_norm.weight",), shard=shard_kind),
                  Rule(ATTN + "k_layernorm.weight", (HATTN + "k_norm.weight",), shard=shard_kind)]
    return rules


def dense_mlp_rules(megatron: str, hf: str, layers: str) -> list[Rule]:
    """A SwiGLU MLP: ``{megatron}linear_fc1`` = [gate; up] of ``{hf}{gate,up}_proj``,
    ``{megatron}linear_fc2`` = ``{hf}down_proj`` (TP-sharded; used for dense layers and for
    shared experts)."""
    return [Rule(megatron + "linear_fc1.weight", (hf + "gate_proj.weight", hf + "up_proj.weight"),
                 fuse="glu", shard="glu_column", layers=layers),
            Rule(megatron + "linear_fc2.weight", (hf + "down_proj.weight",), shard="row",
                 layers=layers)]


def expert_rules(gate: str, up: str, down: str) -> list[Rule]:
    """Per-expert HF tensors (patterns with ``{layer}``/``{expert}``) -> SequentialMLP experts."""
    return [Rule(E + "linear_fc1.weight", (gate, up), fuse="glu", shard="glu_column",
                 layers="moe"),
            Rule(E + "linear_fc2.weight", (down,), shard="row", layers="moe")]


def fused_expert_rules(prefix: str = HL + "mlp.experts.") -> list[Rule]:
    """transformers 5's stacked experts: ``gate_up_proj`` [E, 2I, H] (gate rows first) and
    ``down_proj`` [E, H, I]; expert e is row e."""
    return [Rule(E + "linear_fc1.weight", (prefix + "gate_up_proj[{expert}]",),
                 shard="glu_column", layers="moe"),
            Rule(E + "linear_fc2.weight", (prefix + "down_proj[{expert}]",), shard="row",
                 layers="moe")]


FUSED_MARKER = ".mlp.experts.gate_up_proj"


def tie_embeddings(rules: list[Rule], hf_config: dict) -> tuple[list[Rule], set[str]]:
    """With ``tie_word_embeddings`` the output layer reads ``model.embed_tokens.weight`` and a
    ``lm_head.weight`` in the checkpoint is ignored. Returns (rules, ignored HF keys)."""
    if not hf_config.get("tie_word_embeddings", False):
        return list(rules), set()
    tied = Rule("output_layer.weight", ("model.embed_tokens.weight",), shard="vocab")
    return [tied if r.megatron == "output_layer.weight" else r for r in rules], {"lm_head.weight"}


def layout_rules_for(per_expert: list[Rule], fused: list[Rule], marker: str = FUSED_MARKER):
    """``rules_for`` of an ``Adapter`` with two on-disk expert layouts: ``fused`` when a key ends
    with ``marker`` (or ``fused_experts=True``), else ``per_expert``; then ``tie_embeddings``."""

    def rules_for(hf_keys: set[str], hf_config: dict, *, fused_experts: bool | None = None
                  ) -> tuple[list[Rule], set[str]]:
        is_fused = (any(k.endswith(marker) for k in hf_keys) if fused_experts is None
                    else fused_experts)
        return tie_embeddings(fused if is_fused else per_expert, hf_config)

    return rules_for
