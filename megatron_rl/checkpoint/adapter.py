"""Declarative HF <-> Megatron-Core name maps: the ``Rule`` type, pattern matching, the registry.

Legend: ``{layer}`` = decoder layer index, ``{expert}`` = routed-expert index. In Megatron names
both are LOCAL (this rank's pipeline stage / expert-parallel slice); in HF names both are GLOBAL.
An HF source written ``name[{expert}]`` is one row (dim 0) of a stacked tensor (transformers' fused
in-memory expert layout). The loader (``hf_loader``) turns local indices into global ones.

A family adapter (``qwen3_moe.py``) is a list of ``Rule``s; ``rules_for(hf_keys, hf_config)``
picks the variant that matches what the checkpoint holds (per-expert vs fused experts, tied
embeddings). Left out: TE spec names (``linear_qkv.layer_norm_weight``, grouped-GEMM
``linear_fc1.weight{j}``) -- only the local spec is mapped so far.
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
