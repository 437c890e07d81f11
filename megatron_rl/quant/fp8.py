"""Blockwise FP8 weights in the DeepSeek-V3 / SGLang ``fp8`` format: quantise, dequantise, and
which HF tensors are quantised.

Legend: N, K = a weight's output / input dims ([N, K], HF Linear layout); bn, bk = block size
(128, 128); nb = ceil(N / bn), kb = ceil(K / bk); leading dims (stacked experts [E, N, K]) are
batched.

Format (DeepSeek-V3's hub checkpoint, read by SGLang ``Fp8Config`` / ``Fp8LinearMethod`` with
``weight_block_size`` and by transformers' FineGrainedFP8 ``FP8Linear``):
    <module>.weight            float8_e4m3fn [N, K]
    <module>.weight_scale_inv  float32 [nb, kb];  w ~= weight.float() * weight_scale_inv (per block)
    config.json quantization_config = QUANT_CONFIG (+ ``modules_to_not_convert``: the Linear
    modules kept in bf16, e.g. lm_head and MoE routers; SGLang reads it as ``ignored_layers``).
``weight_scale_inv`` = amax(|block|) / 448 (448 = the largest finite e4m3 value), so the block's
largest element maps to +-448. Edge blocks are ragged (N or K not a multiple of 128: the last
block row/column is smaller, it has its own scale). An all-zero block gets scale 1.0 (any value
dequantises its zeros to 0; no division by zero). Values are cast with round-to-nearest-even after
clamping to [-448, 448] (torch's float8 cast does not saturate).

Which tensors: ``FP8_RULES``, first match wins, on the HF name: attention projections, dense /
shared-expert / routed-expert MLP projections are quantised; embeddings, lm_head, norms, the
router (``mlp.gate``), the shared-expert gate, biases and ``e_score_correction_bias`` are kept.
Names no rule matches are kept (safe default).

Left out: per-tensor / per-channel FP8, e5m2 weights, MXFP8 (32-element e8m0 scales).
"""

from __future__ import annotations

import math
import re

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"
QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [128, 128]}

# (action, regex on the HF name); first match wins; no match -> "keep".
FP8_RULES: tuple[tuple[str, str], ...] = (
    ("keep", r"(^|\.)(embed_tokens|lm_head)\.weight$"),
    ("keep", r"norm\.weight$"),                       # RMSNorms, q/k/kv layernorms
    ("keep", r"\.mlp\.gate\.(weight|e_score_correction_bias)$"),  # MoE router (+ expert bias)
    ("keep", r"\.block_sparse_moe\.gate\.weight$"),   # Mixtral router
    ("keep", r"\.shared_expert_gate\.weight$"),       # Qwen2-MoE shared-expert gate
    ("keep", r"\.bias$"),
    ("quant", r"\.self_attn\.(q|k|v|o|q_a|q_b|kv_b)_proj\.weight$"),
    ("quant", r"\.self_attn\.kv_a_proj_with_mqa\.weight$"),
    ("quant", r"\.mlp\.(shared_experts?\.)?(gate|up|down)_proj\.weight$"),
    ("quant", r"\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$"),
    ("quant", r"\.experts\.(gate_up_proj|down_proj)$"),  # transformers 5 stacked experts [E, N, K]
)
_COMPILED = tuple((a, re.compile(p)) for a, p in FP8_RULES)


def is_quantized_name(hf_name: str) -> bool:
    """True if ``FP8_RULES`` quantises the HF tensor ``hf_name`` (first matching rule wins)."""
    for action, rx in _COMPILED:
        if rx.search(hf_name):
            return action == "quant"
    return False


def scale_name(hf_name: str) -> str:
    """``a.weight`` -> ``a.weight_scale_inv``; stacked ``a.gate_up_proj`` -> ``a.gate_up_proj_scale_inv``."""
    return hf_name + SCALE_SUFFIX


def module_name(hf_name: str) -> str:
    """``model.layers.0.mlp.gate.weight`` -> ``model.layers.0.mlp.gate``."""
    return hf_name[: -len(".weight")] if hf_name.endswith(".weight") else hf_name


def check_block(block) -> tuple[int, int]:
    """Validate a block size: two positive ints. Raises ValueError naming ``weight_block_size``."""
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"weight_block_size must be two positive ints, got {block!r}")
    return int(block[0]), int(block[1])


def scale_shape(shape, block=BLOCK) -> tuple[int, ...]:
    """Shape of ``weight_scale_inv`` for a weight of ``shape`` [..., N, K]: [..., ceil(N/bn), ceil(K/bk)]."""
    bn, bk = check_block(block)
    *lead, n, k = shape
    return (*lead, math.ceil(n / bn), math.ceil(k / bk))


def _blocks(x: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """[..., N, K] -> zero-padded [..., nb, bn, kb, bk] view."""
    *lead, n, k = x.shape
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    x = torch.nn.functional.pad(x, (0, kb * bk - k, 0, nb * bn - n))
    return x.reshape(*lead, nb, bn, kb, bk)


def _expand(scale: torch.Tensor, n: int, k: int, bn: int, bk: int) -> torch.Tensor:
    """[..., nb, kb] -> [..., N, K] (each block's scale repeated over its elements)."""
    return scale.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]


@torch.no_grad()
def quantize_block_fp8(weight: torch.Tensor, block=BLOCK, name: str = "weight"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise e4m3 quantisation of one weight (DeepSeek-V3 / SGLang ``fp8`` block format).

    Args:
        weight: [..., N, K], any float dtype and device (computed in float32).
        block: (bn, bk) block size; N, K need not be multiples (ragged edge blocks).
        name: the tensor's name, for error messages.
    Returns:
        (q float8_e4m3fn [..., N, K], weight_scale_inv float32 [..., ceil(N/bn), ceil(K/bk)]) with
        weight ~= q.float() * scale per block; scale = amax(|block|) / 448, 1.0 for all-zero blocks.
    Raises:
        ValueError: ``weight`` has fewer than 2 dims, is not floating point, or holds NaN / inf
            (the message names ``name``); a bad block size.
    Source: DeepSeek-V3 ``inference/kernel.py`` (weight_dequant: w = q * s per 128x128 block);
    SGLang ``fp8_utils`` block quant (scale = amax / fp8_max).
    """
    bn, bk = check_block(block)
    if weight.dim() < 2 or not weight.is_floating_point():
        raise ValueError(f"{name}: FP8 block quantisation needs a float tensor with >= 2 dims, "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}: weight has NaN/inf values; refusing to FP8-quantise it")
    *lead, n, k = w.shape
    amax = _blocks(w.abs(), bn, bk).amax(dim=(-3, -1))  # [..., nb, kb]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / _expand(scale, n, k, bn, bk)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.contiguous()


@torch.no_grad()
def dequantize_block_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block=BLOCK,
                         dtype: torch.dtype = torch.float32, name: str = "weight") -> torch.Tensor:
    """Inverse of ``quantize_block_fp8``: ``q.float() * scale_inv`` per block, cast to ``dtype``.

    Args:
        q: float8_e4m3fn [..., N, K]; scale_inv: float [..., ceil(N/bn), ceil(K/bk)].
    Raises:
        ValueError naming ``name``: q not e4m3, or scale_inv of the wrong shape / not finite.
    """
    bn, bk = check_block(block)
    if q.dtype != FP8_DTYPE:
        raise ValueError(f"{name}: expected float8_e4m3fn, got {q.dtype}")
    want = scale_shape(q.shape, (bn, bk))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"{name}: {scale_name(name)} has shape {tuple(scale_inv.shape)}, expected {want} for weight {tuple(q.shape)} "
                         f"and block {(bn, bk)}")
    s = scale_inv.to(torch.float32)
    if not torch.isfinite(s).all():
        raise ValueError(f"{name}: weight_scale_inv has NaN/inf values")
    n, k = q.shape[-2:]
    return (q.to(torch.float32) * _expand(s, n, k, bn, bk)).to(dtype)


def quantize_named(named: dict[str, torch.Tensor], block=BLOCK) -> dict[str, torch.Tensor]:
    """Quantise the tensors ``is_quantized_name`` selects; others pass through unchanged.

    Returns a new dict where each quantised ``name`` maps to float8_e4m3fn and is followed by
    ``scale_name(name)`` (float32 scales), so a weight and its scale always travel together.
    Raises ValueError naming a tensor with NaN/inf values.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in named.items():
        if is_quantized_name(name):
            out[name], out[scale_name(name)] = quantize_block_fp8(t, block, name=name)
        else:
            out[name] = t
    return out


def dequantize_named(named: dict[str, torch.Tensor], block=BLOCK, dtype: torch.dtype = torch.float32
                     ) -> dict[str, torch.Tensor]:
    """Replace every float8_e4m3fn tensor and its ``*_scale_inv`` by the dequantised tensor.

    Non-FP8 tensors pass through. Raises KeyError naming an FP8 tensor whose scale is absent, or a
    scale whose weight is absent; ValueError for a scale of the wrong shape.
    """
    scales = {k for k in named if k.endswith(SCALE_SUFFIX)}
    out: dict[str, torch.Tensor] = {}
    for name, t in named.items():
        if name in scales:
            if name[: -len(SCALE_SUFFIX)] not in named:
                raise KeyError(f"{name}: FP8 scale without its weight {name[: -len(SCALE_SUFFIX)]!r}")
            continue
        if t.dtype == FP8_DTYPE:
            if scale_name(name) not in named:
                raise KeyError(f"{name}: float8_e4m3fn weight without {scale_name(name)!r}")
            out[name] = dequantize_block_fp8(t, named[scale_name(name)], block, dtype, name=name)
        else:
            out[name] = t
    return out


def fp8_block_of(hf_config: dict) -> tuple[int, int] | None:
    """The weight block size if ``hf_config`` declares blockwise FP8 weights, else None.

    Accepts ``quantization_config`` with quant_method "fp8", fmt "e4m3" (or absent),
    activation_scheme "dynamic" and a 2-int ``weight_block_size``. Raises ValueError naming the
    field for any other FP8 variant (per-tensor scales, static activations, e5m2)."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") != "fp8":
        raise ValueError(f"quantization_config.quant_method={qc.get('quant_method')!r}: only 'fp8' "
                         f"block checkpoints are supported")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"quantization_config.fmt={qc.get('fmt')!r}: only 'e4m3' is supported")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"quantization_config.activation_scheme={qc.get('activation_scheme')!r}: "
                         f"only 'dynamic' is supported")
    if qc.get("weight_block_size") is None:
        raise ValueError("quantization_config.weight_block_size is missing (per-tensor FP8 is not supported)")
    return check_block(list(qc["weight_block_size"]))


def quantization_config(hf_names, block=BLOCK) -> dict:
    """``quantization_config`` for config.json: QUANT_CONFIG with ``weight_block_size`` = block and
    ``modules_to_not_convert`` = the ``.weight`` matrices (2-D, per ``hf_names``: {name: ndim})
    that stay unquantised (lm_head, routers), so SGLang / transformers keep those Linears in bf16."""
    bn, bk = check_block(block)
    keep = sorted(module_name(n) for n, ndim in dict(hf_names).items()
                  if ndim == 2 and n.endswith(".weight") and not is_quantized_name(n)
                  and not re.search(r"(embed_tokens|norm)\.weight$", n))
    return {**QUANT_CONFIG, "weight_block_size": [bn, bk], "modules_to_not_convert": keep}


@torch.no_grad()
def fake_quant_activations(x: torch.Tensor, group: int = 128) -> torch.Tensor:
    """Per-token 1 x ``group`` dynamic e4m3 fake quantisation (SGLang W8A8 block-FP8 activations).

    Args:
        x: [..., K] activations (any float dtype); the last group may be ragged.
    Returns:
        same shape/dtype: each group quantised with scale amax/448 (1.0 if all-zero) and
        dequantised. Source: SGLang ``per_token_group_quant_fp8`` (group_size = block_k).
    """
    k = x.shape[-1]
    g = math.ceil(k / group)
    xf = torch.nn.functional.pad(x.to(torch.float32), (0, g * group - k))
    xf = xf.reshape(*x.shape[:-1], g, group)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    y = (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(torch.float32) * s
    return y.reshape(*x.shape[:-1], g * group)[..., :k].to(x.dtype)
