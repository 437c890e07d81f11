"""HF config.json -> Megatron-Core MoE model providers, one file per model family.

``build_model(hf_dir_or_config, parallel, ...)`` dispatches on ``config.json``'s ``model_type``
(or ``architectures``) through ``FAMILIES``; unsupported architectures fail listing the supported
ones. Adding a family (DeepSeek-V3, Mixtral, OLMoE) = one module that registers a ``Family``.
"""

from megatron_rl.models.base import (
    FAMILIES,
    Family,
    ModelOptions,
    build_model,
    get_family,
    load_hf_config,
    transformer_config_from_hf,
)
from megatron_rl.models import qwen3_moe  # noqa: F401  (registers the family)

__all__ = [
    "FAMILIES",
    "Family",
    "ModelOptions",
    "build_model",
    "get_family",
    "load_hf_config",
    "transformer_config_from_hf",
]
