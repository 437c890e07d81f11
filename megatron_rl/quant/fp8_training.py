"""FP8 training flags with Megatron's own names, resolved into TransformerConfig fields.

Flags (``config.FP8Args``, added by ``add_fp8_args``; spelled as in ``megatron.training.arguments``):
    --transformer-impl transformer_engine|local   (default: transformer_engine where TE imports and
                                                    the device is CUDA, else local: what we did before)
    --fp8-format e4m3|hybrid                      (TransformerConfig.fp8; default off)
    --fp8-recipe delayed|tensorwise|blockwise|mxfp8   (TransformerConfig.fp8_recipe)
    --moe-grouped-gemm                            (TEGroupedMLP experts: one GEMM per expert group)
    --first-last-layers-bf16, --num-layers-at-start-in-bf16 N, --num-layers-at-end-in-bf16 N
FP8 needs Transformer Engine on CUDA. Megatron-Core, asked for FP8 with the local spec, trains in
bf16 without a word (its local Linear layers ignore ``config.fp8``); here that combination is an
error naming the flag (``resolve_fp8``), as is TE asked for where it cannot be imported.
With FP8 on MoE models ``moe_router_padding_for_quantization`` is set (tokens per expert padded
to the recipe's multiple, ``fp8_pad_multiple``), and packed sequences must be padded to the same
multiple (128 blockwise, 32 MXFP8, 16 delayed/tensorwise: TE's GEMM alignment).
Source: Megatron-LM ``megatron/training/arguments.py`` (_add_transformer_engine_args) and
``megatron/core/fp8_utils.py``; NeMo-RL docs/fp8.md.
Left out: fp8 param gather (``--fp8-param-gather``), the 'custom' recipe, FP4.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron_rl.config import FP8_FORMATS, FP8_RECIPES, TRANSFORMER_IMPLS  # noqa: F401 - re-exported
_PAD = {"blockwise": 128, "mxfp8": 32, "delayed": 16, "tensorwise": 16}


def add_fp8_args(p: argparse.ArgumentParser) -> None:
    """Add the FP8 / Transformer Engine flags (Megatron's spellings) to ``p``: the ``fp8`` section
    of the run config tree (``megatron_rl.config.FP8Args``, where they are declared)."""
    from megatron_rl.config import FP8Args
    from megatron_rl.train.run_config import add_section_args

    add_section_args(p, FP8Args)


@dataclass(frozen=True, kw_only=True)
class FP8Plan:
    """What ``resolve_fp8`` decided: the spec to build and the TransformerConfig overrides."""

    use_te: bool
    overrides: dict
    pad_multiple: int  # packed-sequence / per-expert token padding (1 = none)


def fp8_pad_multiple(recipe: str | None) -> int:
    """Token padding multiple of an FP8 recipe (1 without FP8). Raises ValueError for an unknown one."""
    if recipe is None:
        return 1
    if recipe not in _PAD:
        raise ValueError(f"--fp8-recipe {recipe!r} not in {FP8_RECIPES}")
    return _PAD[recipe]


def resolve_fp8(args: argparse.Namespace, *, device: str, te_available: bool, te_error: str = "",
                is_moe: bool = False) -> FP8Plan:
    """Flags -> FP8Plan. Pure (no import of TE here; the caller probes it).

    Args:
        args: namespace with the ``add_fp8_args`` flags (absent flags read as their defaults).
        device: "cuda" | "cpu"; te_available: ``_optional.has_te()``; te_error: why not (message).
        is_moe: the model has routed experts (router padding for quantisation).
    Raises:
        ValueError naming the flag: --transformer-impl transformer_engine without TE / CUDA;
        --fp8-format without TE (Megatron would silently train in bf16) or with --transformer-impl
        local; --moe-grouped-gemm without TE; bad --num-layers-at-*-in-bf16.
    """
    impl = getattr(args, "transformer_impl", None)
    fmt = getattr(args, "fp8_format", None)
    recipe = getattr(args, "fp8_recipe", "delayed")
    why = te_error or "transformer_engine.pytorch is not importable"
    te_ok = te_available and device == "cuda"
    if impl == "transformer_engine" and not te_ok:
        raise ValueError(f"--transformer-impl transformer_engine: Transformer Engine is not usable here "
                         f"({why if not te_available else 'device is ' + device}); use --transformer-impl local")
    if fmt is not None and impl == "local":
        raise ValueError(f"--fp8-format {fmt} needs --transformer-impl transformer_engine (the local spec "
                         f"ignores FP8 and would silently train in bf16)")
    if fmt is not None and not te_ok:
        raise ValueError(f"--fp8-format {fmt}: FP8 training needs Transformer Engine on CUDA "
                         f"({why if not te_available else 'device is ' + device}); Megatron would "
                         f"silently train in bf16")
    grouped = bool(getattr(args, "moe_grouped_gemm", False))
    if grouped and not te_ok:
        raise ValueError("--moe-grouped-gemm needs Transformer Engine on CUDA (TEGroupedMLP)")
    use_te = te_ok if impl is None else impl == "transformer_engine"
    over: dict = {}
    if grouped:
        over["moe_grouped_gemm"] = True
    if fmt is not None:
        over.update(fp8=fmt, fp8_recipe=recipe)
        if is_moe:
            over["moe_router_padding_for_quantization"] = True
        if getattr(args, "first_last_layers_bf16", False):
            start = getattr(args, "num_layers_at_start_in_bf16", 1)
            end = getattr(args, "num_layers_at_end_in_bf16", 1)
            if start < 0 or end < 0:
                raise ValueError(f"--num-layers-at-start-in-bf16 {start} / --num-layers-at-end-in-bf16 {end} "
                                 f"must be >= 0")
            over.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=start,
                        num_layers_at_end_in_bf16=end)
    elif getattr(args, "first_last_layers_bf16", False):
        raise ValueError("--first-last-layers-bf16 only makes sense with --fp8-format")
    return FP8Plan(use_te=use_te, overrides=over, pad_multiple=fp8_pad_multiple(recipe if fmt else None))
