"""Shared pieces of the HF-vs-Megatron parity tests (imported by spawned ranks too)."""

import torch


def forward_per_sample(model, ids: torch.Tensor) -> torch.Tensor | None:
    """Logits [B, S, Vp] (TP-gathered) through Megatron's schedule, one sample per micro-batch
    (``train.engine.forward_logits``); None on stages other than the last."""
    from megatron_rl.train.engine import forward_logits

    pos = torch.arange(ids.shape[1]).expand_as(ids)
    outs = forward_logits(model, [{"tokens": ids[i:i + 1], "position_ids": pos[i:i + 1]}
                                  for i in range(ids.shape[0])])
    return None if outs is None else torch.cat(outs, dim=0)


def stream_hf(model, hf_dir: str) -> dict:
    """Run the multi-rank streaming export (``checkpoint.export.iter_hf_tensors``, 64 KiB
    buckets; collective). Returns ``{hf_name: tensor}`` on global rank 0, ``{}`` elsewhere."""
    from megatron_rl.checkpoint.export import iter_hf_tensors
    from megatron_rl.models import load_hf_config

    out = {}
    for bucket in iter_hf_tensors(model, load_hf_config(hf_dir), bucket_bytes=1 << 16):
        out.update(bucket)
    return out
