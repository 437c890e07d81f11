"""The float64 reference of blockwise e4m3 quantisation shared by the FP8 tests (explicit loops,
independent of ``megatron_rl.quant.fp8``)."""

from __future__ import annotations

import math

import torch


def ref_qdq(w: torch.Tensor, bn: int = 128, bk: int = 128) -> torch.Tensor:
    """float64 blockwise e4m3 quantise-dequantise: scale = amax/448 per block (explicit loops)."""
    w = w.double()
    out = torch.empty_like(w)
    for i in range(math.ceil(w.shape[0] / bn)):
        for j in range(math.ceil(w.shape[1] / bk)):
            blk = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            s = blk.abs().max().item() / 448.0 or 1.0
            out[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (
                (blk / s).clamp(-448, 448).to(torch.float8_e4m3fn).double() * s)
    return out
