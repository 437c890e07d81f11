"""Family registry and the shared GPTModel builder.

Why GPTModel and not HybridModel: megatron-core 0.19 marks GPTModel deprecated (critical fixes
only) in favour of HybridModel, but every MoE feature this project relies on -- the MoE layer
specs with first-k-dense / ``moe_layer_freq``, router replay, MTP, MLA, the TE grouped-GEMM spec and
the checkpoint key layout the HF adapters target -- is exercised upstream through GPTModel, and
HybridModel's transformer-only path builds the same TransformerLayer modules. The choice is
isolated in ``build_model``; switching is one function.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(kw_only=True)
class ModelOptions:
    """What we choose on top of the HF config (Megatron's own knobs stay Megatron's).

    Attributes:
        params_dtype: torch dtype of parameters (fp32 on CPU; bf16 on GPU runs).
        moe_token_dispatcher_type: "alltoall" | "allgather".
        moe_aux_loss_coeff: Megatron aux-loss coefficient (0 disables).
        moe_z_loss_coeff: router z-loss coefficient (None disables).
        sequence_parallel: shard activations over TP in norm/dropout regions (needs TP > 1).
        recompute: activation recompute ("none" | "full").
        use_te: build with the Transformer Engine spec (GPU only).
        overrides: extra TransformerConfig fields, applied last.
    """

    params_dtype: torch.dtype = torch.float32
    moe_token_dispatcher_type: str = "alltoall"
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float | None = None
    sequence_parallel: bool = False
    recompute: str = "none"
    use_te: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Family:
    """One model family: which HF configs it takes and how they become a Megatron GPTModel.

    Attributes:
        name / model_types: registry name and the HF ``model_type`` values it serves.
        config_kwargs: HF config dict -> TransformerConfig kwargs (raises ValueError for HF
            features the mapping cannot reproduce).
        gpt_kwargs: HF config dict -> GPTModel kwargs (``vocab_size``, rope, tying).
        layer_spec: optional ``(block_spec, config) -> block_spec`` edit of Megatron's
            ``TransformerBlockSubmodules`` (e.g. OLMoE's full-width QK norm); None keeps
            ``get_gpt_decoder_block_spec``'s.
        check_parallel: optional ``(hf_config, sizes) -> None`` raising ValueError for parallel
            layouts the family cannot run exactly; ``sizes`` has tp/pp/ep/etp/cp.
        config_cls: optional TransformerConfig subclass (or factory) to build (e.g.
            ``MLATransformerConfig`` for DeepSeek-V3); None = ``TransformerConfig``.
    """

    name: str
    model_types: tuple[str, ...]
    config_kwargs: Callable[[dict], dict]
    gpt_kwargs: Callable[[dict], dict]
    layer_spec: Callable[[Any, Any], Any] | None = None
    check_parallel: Callable[[dict, dict], None] | None = None
    config_cls: Callable[..., Any] | None = None


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    for mt in family.model_types:
        FAMILIES[mt] = family
    return family


def load_hf_config(path_or_dict: str | os.PathLike | dict) -> dict:
    """Read an HF ``config.json`` (a directory, the file itself, or an already-loaded dict).

    Raises:
        FileNotFoundError: no config.json at the path.
        ValueError: the file is not valid JSON (message names the file).
    """
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict)
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no HF config.json at {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def get_family(hf_config: dict) -> Family:
    """Family for an HF config dict. Raises ValueError listing the supported model types."""
    mt = hf_config.get("model_type")
    if mt in FAMILIES:
        return FAMILIES[mt]
    raise ValueError(
        f"unsupported architecture model_type={mt!r} (architectures="
        f"{hf_config.get('architectures')}); supported: {sorted(FAMILIES)}"
    )


def transformer_config_from_hf(hf_config: dict, opts: ModelOptions, *, tp: int = 1, pp: int = 1,
                               ep: int = 1, etp: int | None = None, cp: int = 1):
    """Build a Megatron-Core ``TransformerConfig`` from an HF config dict.

    Architecture fields come from the family's mapping of the HF config; parallel sizes and
    our options are applied on top. CPU-only settings (no fused kernels, CPU init) are set when
    CUDA is not in use.

    Raises:
        ValueError: unsupported architecture (lists the supported ``model_type``s), an HF feature
            the family cannot reproduce, or a parallel layout the family refuses.
    """
    from megatron.core.transformer import TransformerConfig

    family = get_family(hf_config)
    kw = family.config_kwargs(hf_config)
    if family.check_parallel is not None:
        family.check_parallel(hf_config, dict(tp=tp, pp=pp, ep=ep,
                                              etp=etp if etp is not None else tp, cp=cp))
    on_gpu = opts.use_te or torch.cuda.is_available()
    kw.update(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp if etp is not None else tp,
        context_parallel_size=cp,
        sequence_parallel=opts.sequence_parallel and tp > 1,
        params_dtype=opts.params_dtype,
        bf16=opts.params_dtype == torch.bfloat16,
        fp16=opts.params_dtype == torch.float16,
        pipeline_dtype=opts.params_dtype,
        moe_token_dispatcher_type=opts.moe_token_dispatcher_type,
        moe_aux_loss_coeff=opts.moe_aux_loss_coeff,
        moe_z_loss_coeff=opts.moe_z_loss_coeff,
        moe_router_load_balancing_type="aux_loss" if opts.moe_aux_loss_coeff > 0 else "none",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
    )
    if opts.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if not on_gpu:
        kw.update(
            use_cpu_initialization=True,
            gradient_accumulation_fusion=False,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            apply_rope_fusion=False,
            persist_layer_norm=False,
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
        )
    kw.update(opts.overrides)
    return (family.config_cls or TransformerConfig)(**kw)


def build_model(hf_config: dict, config, *, pre_process: bool = True, post_process: bool = True,
                vp_stage: int | None = None, use_te: bool = False):
    """Build one GPTModel chunk for this rank's pipeline stage.

    Args:
        hf_config: HF config dict (family, vocab, rope, tying).
        config: the ``TransformerConfig`` from ``transformer_config_from_hf``.
        pre_process / post_process: whether this stage holds the embedding / output layer.
        use_te: Transformer Engine layer spec (GPU) instead of the local spec (CPU).
    Returns:
        ``megatron.core.models.gpt.GPTModel`` with vocab padded per ``padded_vocab_size``.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    family = get_family(hf_config)
    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization=config.normalization,
        vp_stage=vp_stage,
    )
    if family.layer_spec is not None:
        spec = family.layer_spec(spec, config)
    gkw = family.gpt_kwargs(hf_config)
    vocab_size = gkw.pop("vocab_size")
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(vocab_size, config.tensor_model_parallel_size),
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        **gkw,
    )
    if post_process:
        mask_padded_vocab(model.output_layer, vocab_size)
    return model


def mask_padded_vocab(output_layer, vocab_size: int) -> None:
    """Make the padded vocab rows invisible: logits of columns >= ``vocab_size`` are set to the
    dtype's lowest value, so softmax / cross entropy / logprobs are those of the real (HF)
    vocabulary in every TP layout (Megatron pads to a multiple of 128 * tp, and otherwise the
    padded rows take probability mass and the loss depends on tp). Gradient to those rows is 0.
    """
    from megatron.core import parallel_state as ps

    def hook(module, args, output):
        logits, bias = output  # logits [S, B, V_padded / tp]
        local = logits.shape[-1]
        start = ps.get_tensor_model_parallel_rank() * local
        if start + local <= vocab_size:
            return output
        cols = torch.arange(start, start + local, device=logits.device) >= vocab_size
        return logits.masked_fill(cols, torch.finfo(logits.dtype).min), bias

    output_layer.register_forward_hook(hook)


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's vocab padding: round up to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def config_summary(config) -> dict:
    """Plain-dict view of a TransformerConfig's scalar fields (for logs / run dirs)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if isinstance(v, (int, float, str, bool, type(None))):
            out[f.name] = v
    return out
