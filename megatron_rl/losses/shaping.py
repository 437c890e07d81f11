"""Reward shaping applied before the advantages: DAPO's soft overlong punishment.

Legend: N samples; lengths are response tokens.
"""

from __future__ import annotations

import torch


def overlong_penalty(response_lengths: torch.Tensor, max_len: int, buffer_len: int,
                     factor: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Soft overlong punishment, DAPO (Yu et al. 2025, arXiv 2503.14476) eq. 13.

    With L_max = ``max_len`` and L_cache = ``buffer_len``, a response of |y| tokens gets
    ``0`` if |y| <= L_max - L_cache, ``((L_max - L_cache) - |y|) / L_cache`` inside the buffer
    (linear from 0 to -1), and ``-1`` beyond L_max; the result is scaled by ``factor`` and added to
    the verifier's reward by the caller.

    Args:
        response_lengths: [N] int/float, generated tokens per sample.
        max_len: L_max (the generation limit, ``--max-new-tokens``), > 0.
        buffer_len: L_cache, 0 < L_cache < L_max.
        factor: penalty scale (>= 0).
    Returns:
        ``(penalty [N] float64 in [-factor, 0], {"rollout/overlong_penalty_mean",
        "rollout/overlong_penalized_frac"})``.
    Raises:
        ValueError: ``max_len <= 0``, ``buffer_len`` outside (0, max_len), or ``factor < 0``.
    """
    if max_len <= 0 or not 0 < buffer_len < max_len:
        raise ValueError(f"need max_len > 0 and 0 < buffer_len < max_len, got {max_len}, {buffer_len}")
    if factor < 0:
        raise ValueError(f"factor must be >= 0, got {factor}")
    y = response_lengths.double()
    expected = float(max_len - buffer_len)
    pen = ((expected - y) / buffer_len).clamp(min=-1.0, max=0.0) * factor
    metrics = {"rollout/overlong_penalty_mean": float(pen.mean()) if pen.numel() else 0.0,
               "rollout/overlong_penalized_frac": float((pen < 0).double().mean()) if pen.numel() else 0.0}
    return pen, metrics
