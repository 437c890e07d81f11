"""Weight payloads for `/update_weights_from_tensor` on the embedded engine, and HF name handling.

Payload (embedded engine only): `serialized_named_tensors` is a base64 string (or a list of them, one
per "TP rank" in SGLang's schema -- all are applied in order) of `safetensors.torch.save(dict)`.
Real SGLang expects its `MultiprocessingSerializer` (pickled CUDA IPC handles) instead; the rollout
client picks the encoding by engine type.

Names are HF names. Accepted: the in-memory state_dict names (transformers 5 stacks Qwen3-MoE experts
as `mlp.experts.gate_up_proj` [E, 2I, H], gate rows first, and `mlp.experts.down_proj` [E, H, I]) and
the hub per-expert names, converted here:
    model.layers.{l}.mlp.experts.{e}.gate_proj.weight [I, H] -> gate_up_proj[e, :I]
    model.layers.{l}.mlp.experts.{e}.up_proj.weight   [I, H] -> gate_up_proj[e, I:]
    model.layers.{l}.mlp.experts.{e}.down_proj.weight [H, I] -> down_proj[e]
"""

from __future__ import annotations

import base64
import re

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

_HUB_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def encode_named_tensors(named: dict[str, torch.Tensor]) -> str:
    """dict name -> tensor  ->  base64 str of safetensors bytes (the embedded engine's payload)."""
    named = {k: v.detach().contiguous().cpu() for k, v in named.items()}
    return base64.b64encode(st_save(named)).decode("ascii")


def decode_named_tensors(payload: str | list[str]) -> dict[str, torch.Tensor]:
    """Inverse of `encode_named_tensors`; a list is merged in order. Raises ValueError on bad data."""
    out: dict[str, torch.Tensor] = {}
    for p in [payload] if isinstance(payload, str) else list(payload):
        try:
            out.update(st_load(base64.b64decode(p)))
        except Exception as e:  # binascii.Error, SafetensorError
            raise ValueError(f"serialized_named_tensors is not base64 safetensors: {e}") from e
    return out


def _target(params: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The live tensor (or view of it) that hub/in-memory `name` maps to; KeyError if none."""
    if name in params:
        return params[name]
    m = _HUB_EXPERT.match(name)
    if m:
        prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
        stacked = params.get(f"{prefix}.down_proj")
        if stacked is not None and not 0 <= e < stacked.shape[0]:
            raise KeyError(f"unknown weight name {name!r}: expert {e} of {stacked.shape[0]}")
        if proj == "down_proj" and stacked is not None:
            return params[f"{prefix}.down_proj"][e]
        fused = params.get(f"{prefix}.gate_up_proj")
        if fused is not None:
            half = fused.shape[1] // 2
            return fused[e, :half] if proj == "gate_proj" else fused[e, half:]
    raise KeyError(f"unknown weight name {name!r}")


def load_named_tensors(model: torch.nn.Module, named: dict[str, torch.Tensor]) -> int:
    """Copy every tensor into `model` in place (dtype cast to the parameter's). Returns the count.

    All names, shapes, dtypes and values are checked before anything is written (no half-applied
    update). Raises KeyError (unknown name) or ValueError (shape mismatch; a non-float tensor -- int,
    bool -- for a floating-point parameter; NaN/inf values).
    """
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    targets = []
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name!r} is not a tensor")
        dst = _target(params, name)
        if tuple(dst.shape) != tuple(t.shape):
            raise ValueError(f"shape mismatch for {name!r}: got {tuple(t.shape)}, model has {tuple(dst.shape)}")
        if dst.is_floating_point():
            if not t.is_floating_point():
                raise ValueError(f"dtype mismatch for {name!r}: got {t.dtype}, the parameter is {dst.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name!r} has non-finite values (NaN or inf)")
        targets.append((dst, t))
    with torch.no_grad():
        for dst, t in targets:
            dst.copy_(t.to(dst.dtype))
    return len(targets)
