"""Router load metrics from global routed-token counts (e.g. ``GlobalLBL.collect_counts``).

Legend: L = MoE layers, E = experts, K = top-k, N = valid tokens. With f_i = C_i / (K N) the
balanced load is E f_i = 1 for every expert. Left out: per-expert histograms.
"""

from __future__ import annotations

import torch


def router_load_metrics(counts: torch.Tensor, n_tokens: float, topk: int, *,
                        layer_ids: list[int] | None = None) -> dict[str, float]:
    """Per-layer load statistics.

    Args:
        counts: [L, E] routed valid-token counts C_i per MoE layer.
        n_tokens: N (> 0). topk: K.
        layer_ids: decoder layer index of each row (default 0..L-1), used in the keys.
    Returns:
        ``moe/layer{i}/max_violation`` = max_i E f_i (1 = balanced, E = all on one expert),
        ``moe/layer{i}/min_load`` = min_i E f_i, ``moe/layer{i}/load_entropy`` = entropy in nats
        of C / sum(C) (log E = balanced), ``moe/layer{i}/dropped_frac`` = 1 - sum_i C_i / (K N)
        (routes dropped by a capacity factor; 0 without one), and ``moe/max_violation`` = max
        over layers, ``moe/dropped_frac`` = mean over layers.
    Raises:
        ValueError: ``n_tokens <= 0``, ``topk < 1`` or a layer_ids length mismatch.
    """
    if n_tokens <= 0 or topk < 1:
        raise ValueError(f"need n_tokens > 0 and topk >= 1, got {n_tokens}, {topk}")
    counts = counts.double()
    layer_ids = list(range(counts.shape[0])) if layer_ids is None else list(layer_ids)
    if len(layer_ids) != counts.shape[0]:
        raise ValueError(f"{len(layer_ids)} layer ids for {counts.shape[0]} count rows")
    e = counts.shape[-1]
    load = e * counts / (topk * float(n_tokens))  # [L, E]  E f_i
    share = counts / counts.sum(-1, keepdim=True).clamp_min(1e-30)
    entropy = -(share * share.clamp_min(1e-30).log()).sum(-1)  # [L] nats
    dropped = (1.0 - counts.sum(-1) / (topk * float(n_tokens))).clamp_min(0.0)  # [L]
    out: dict[str, float] = {}
    for row, i in enumerate(layer_ids):
        out[f"moe/layer{i}/max_violation"] = float(load[row].max())
        out[f"moe/layer{i}/min_load"] = float(load[row].min())
        out[f"moe/layer{i}/load_entropy"] = float(entropy[row])
        out[f"moe/layer{i}/dropped_frac"] = float(dropped[row])
    out["moe/max_violation"] = float(load.max()) if counts.numel() else 0.0
    out["moe/dropped_frac"] = float(dropped.mean()) if counts.numel() else 0.0
    return out
