"""HF config.json -> Megatron-Core MoE model providers, one file per model family.

``build_model(hf_dir_or_config, parallel, ...)`` dispatches on ``config.json``'s ``model_type``
(or ``architectures``) through ``FAMILIES``; unsupported architectures fail listing the supported
ones. Adding a family (e.g. DeepSeek-V3: MLA via ``multi_latent_attention``, sigmoid router with
expert bias, first-k-dense via ``moe_layer_freq``, shared experts) = one module that registers a
``Family`` (shared HF-field readers in ``common``; spec edits through ``Family.layer_spec``).
Registered: qwen3_moe, qwen2_moe, mixtral, olmoe, deepseek_v3.
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
from megatron_rl.models import mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: F401  (register)
from megatron_rl.models import deepseek_v3  # noqa: F401  (register)

__all__ = [
    "FAMILIES",
    "Family",
    "ModelOptions",
    "build_model",
    "get_family",
    "load_hf_config",
    "transformer_config_from_hf",
]
