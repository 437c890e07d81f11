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

Where the blocks are cut: ModelOpt cuts them on the Megatron tensor. For ``linear_proj``,
``linear_fc2`` and the experts' ``linear_fc1`` (when the FFN width is a multiple of 128) those are
exactly the HF tensors' blocks, so the trainer computes with the engine's weights. The fused
``linear_qkv`` interleaves q/k/v rows per query group, so ModelOpt's blocks would straddle HF's
q_proj/k_proj/v_proj; with ``align_qkv`` (default, TP = 1) its ModelOpt weight quantizer is
disabled and the layer computes with ``w + (fuse(qdq(q), qdq(k), qdq(v)) - w).detach()``
(``quant.fp8`` on the HF q/k/v blocks, straight-through): the engine's numerics there too. With
TP > 1 a 128-row HF block can span two ranks' shards, so ModelOpt's blocks are kept (differences
measured by ``tools/measure_fp8_mismatch.py``). At sync the engine receives the master weights
quantised by ``quant.fp8`` (the same rule, on the HF tensors): the same scales the trainer used.
Checkpoints: the per-block amax buffers are not persistent (recomputed every forward), since
ModelOpt's Megatron ``sharded_state_dict`` cannot shard 2-D block amax (IndexError).
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
        wq._calibrator.reset()  # MaxCalibrator keeps a running max across calls otherwise
        wq.enable_calib()
        wq(module.weight.detach())
        wq.load_calib_amax()
        wq.enable_quant()
        wq.disable_calib()
    wq._non_persistent_buffers_set.add("_amax")  # recomputed each forward; not checkpointed


def apply_fp8_qat(model, block=(128, 128), align_qkv: bool = True) -> list[str]:
    """Fake-quantise ``model``'s Linear / expert weights in place (FP8 e4m3, ``block`` blocks).

    Args:
        model: this rank's GPTModel chunk (or a DDP / Float16Module wrapper of it), local spec.
        align_qkv: fake-quantise ``linear_qkv`` on HF q/k/v blocks (TP = 1 only; see module doc).
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
    from megatron.core import parallel_state as ps

    align = align_qkv and ps.get_tensor_model_parallel_world_size() == 1
    names = []
    for name, mod in module.named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        if wq is not None and wq.is_enabled:
            if align and name.endswith("self_attention.linear_qkv"):
                _align_qkv(mod, module.config, block)
            else:
                mod.register_forward_pre_hook(_refresh)
                _refresh(mod, ())
            names.append(name)
        if not torch.cuda.is_available() and hasattr(mod, "modelopt_get_extra_state_callbacks"):
            mod.get_extra_state = _without_cuda_sync(mod.get_extra_state)
    return sorted(names)


def _without_cuda_sync(fn):
    """ModelOpt's Megatron ``get_extra_state`` (checkpoint save) calls ``torch.cuda.synchronize``,
    which raises without a driver: run it with that call a no-op (CPU only)."""
    def wrapped(*args, **kwargs):
        real, torch.cuda.synchronize = torch.cuda.synchronize, lambda *a, **k: None
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.synchronize = real
    return wrapped


def _ste_qkv(w: torch.Tensor, config, block) -> torch.Tensor:
    """Megatron linear_qkv [ng*(nh/ng+2)*hd, H] -> the same with q, k, v each blockwise-FP8
    fake-quantised in HF layout; straight-through (the gradient w.r.t. ``w`` is the identity)."""
    from megatron_rl.checkpoint.hf_loader import _geometry
    from megatron_rl.checkpoint.transforms import fuse_qkv, split_qkv
    from megatron_rl.quant.fp8 import dequantize_block_fp8, quantize_block_fp8

    geo = _geometry(config)
    with torch.no_grad():
        parts = [dequantize_block_fp8(*quantize_block_fp8(t, block), block, w.dtype)
                 for t in split_qkv(w.detach(), geo)]
        qdq = fuse_qkv(*parts, geo)
    return w + (qdq - w).detach()


def _align_qkv(module, config, block) -> None:
    """Disable ModelOpt's quantizer on this linear_qkv; run it with ``_ste_qkv(weight)``."""
    module.weight_quantizer.disable()
    forward = module.forward

    def aligned_forward(x, *args, **kwargs):
        kwargs["weight"] = _ste_qkv(module.weight, config, block)
        return forward(x, *args, **kwargs)

    module.forward = aligned_forward
    module.fp8_qkv_aligned = tuple(block)


def qdq_weight(module) -> torch.Tensor:
    """The fake-quantised weight a QAT module computes with (fresh scales), detached."""
    if getattr(module, "fp8_qkv_aligned", False):
        return _ste_qkv(module.weight, module.config, module.fp8_qkv_aligned).detach()
    _refresh(module, ())
    with torch.no_grad():
        return module.weight_quantizer(module.weight.detach())
