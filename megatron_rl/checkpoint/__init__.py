"""HF <-> Megatron-Core checkpoint adapters: declarative name maps + small named transforms.

``load_hf_weights(model, hf_dir)`` loads this rank's chunk from an HF safetensors checkpoint;
``export_hf_state_dict(model, hf_config)`` is the single-rank inverse. One module per family
(``qwen3_moe``, ``qwen2_moe``, ``mixtral``, ``olmoe``, ``deepseek_v3``) registers its
``Adapter``; ``transforms`` holds the layout conversions, ``adapter`` the ``Rule`` type and the
shared Llama-style rule builders, ``safetensors_io`` the lazy reader.
"""

from megatron_rl.checkpoint.adapter import ADAPTERS, Adapter, Rule, get_adapter
from megatron_rl.checkpoint.hf_loader import CheckpointError, export_hf_state_dict, load_hf_weights
from megatron_rl.checkpoint.safetensors_io import SafetensorsCheckpoint
from megatron_rl.checkpoint import mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: F401  (register)
from megatron_rl.checkpoint import deepseek_v3  # noqa: F401  (register)

__all__ = [
    "ADAPTERS",
    "Adapter",
    "CheckpointError",
    "Rule",
    "SafetensorsCheckpoint",
    "export_hf_state_dict",
    "get_adapter",
    "load_hf_weights",
]
