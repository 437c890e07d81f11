"""FP8 quantisation-aware RL through NVIDIA ModelOpt: the trainer's Linear and expert layers compute
with blockwise-e4m3 fake-quantised weights (128x128 blocks, scale = amax/448, as the engine), with
straight-through gradients.

How: ``modelopt.torch.quantization.quantize`` with its ``FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG``
(weight quantizers only; inputs stay unquantised) on this rank's GPTModel chunk -- the Megatron
plugin swaps ColumnParallelLinear / RowParallelLinear (attention, dense MLP, SequentialMLP
experts, shared experts) for quantised versions; the output layer is excluded (lm_head stays bf16
in the FP8 checkpoint too), routers and embeddings are not Linear layers. ModelOpt's weight amax is
static after calibration and its dynamic mode is last-axis only, so a forward pre-hook
recalibrates each weight quantizer from the current weights at every forward (the weights change
at every optimizer step): the fake-quantised weights are then exactly ``quant.fp8``'s blockwise
quantise/dequantise of the Megatron tensor. Backward: ModelOpt's straight-through estimator
(dL/dW = dL/dW_qdq; nothing is clipped since amax is the block max).

Where the engine's numerics differ: blocks are cut on the Megatron tensor. For ``linear_proj``,
``linear_fc2`` and the experts' ``linear_fc1`` (when the FFN width is a multiple of 128) the
Megatron blocks are exactly the HF tensors' blocks, so the trainer computes with the engine's
weights. The fused ``linear_qkv`` interleaves q/k/v rows per query group, so its blocks straddle
HF's q_proj/k_proj/v_proj: the scales differ (``tools/measure_fp8_mismatch.py`` measures it).
At sync the engine receives the master weights quantised by ``quant.fp8`` (the same rule, on the
HF tensors), i.e. the same scales wherever the blocks coincide.
Optional: the ``.[modelopt]`` extra (``_optional.has_modelopt``).
Left out: activation fake-quant in the trainer (ModelOpt's dynamic block mode needs MX-style
scale_bits), NVFP4 (needs CUDA), TE-spec models.
"""

from __future__ import annotations

import copy

import torch


def _mtq():
    from megatron_rl._optional import describe, has_modelopt

    if not has_modelopt():
        why = describe().get("modelopt_error", "nvidia-modelopt is not installed")
        raise ImportError(f"FP8 QAT needs NVIDIA ModelOpt: pip install -e .[modelopt] ({why})")
    import modelopt.torch.quantization as mtq

    return mtq


def fp8_qat_config(block=(128, 128)) -> dict:
    """ModelOpt config: e4m3 weight fake-quant with (bn, bk) blocks, inputs off, output layer off."""
    mtq = _mtq()
    cfg = copy.deepcopy(mtq.FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG)
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"]["block_sizes"] = {-1: int(block[1]), -2: int(block[0])}
    cfg["quant_cfg"].append({"quantizer_name": "*output_layer*", "enable": False})
    return cfg


def _refresh(module, _args) -> None:
    """Recalibrate ``module.weight_quantizer``'s per-block amax from the current weight."""
    wq = module.weight_quantizer
    with torch.no_grad():
        wq.disable_quant()
        wq.enable_calib()
        wq(module.weight.detach())
        wq.load_calib_amax()
        wq.enable_quant()
        wq.disable_calib()


def apply_fp8_qat(model, block=(128, 128)) -> list[str]:
    """Fake-quantise ``model``'s Linear / expert weights in place (FP8 e4m3, ``block`` blocks).

    Args:
        model: this rank's GPTModel chunk (or a DDP / Float16Module wrapper of it), local spec.
    Returns:
        the names of the quantised modules (sorted).
    Raises:
        ImportError naming the ``.[modelopt]`` extra when ModelOpt is absent.
    Source: ModelOpt ``torch/quantization`` (``quantize``, ``FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG``,
    ``plugins/megatron.py``); DeepSeek-V3 block scales (amax / 448).
    """
    mtq = _mtq()
    from megatron_rl.checkpoint.hf_loader import _unwrap

    module = _unwrap(model)
    mtq.quantize(module, fp8_qat_config(block), forward_loop=None)  # weight-only calibration
    names = []
    for name, mod in module.named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        if wq is not None and wq.is_enabled:
            mod.register_forward_pre_hook(_refresh)
            names.append(name)
    return sorted(names)


def qdq_weight(module) -> torch.Tensor:
    """The fake-quantised weight a QAT module computes with (fresh scales), detached."""
    _refresh(module, ())
    with torch.no_grad():
        return module.weight_quantizer(module.weight.detach())
