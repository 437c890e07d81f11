"""Per-token log-probabilities of a token sequence under the live Megatron model (no grad).

Legend: B = rows, S = tokens per row, V = vocab (TP-sharded inside the model).

``compute_logprobs`` is the trainer side of the rollout/trainer consistency check and of the
"old logprobs" of an RL step: logp[b, t] = log softmax(logits[b, t])[tokens[b, t + 1]].
It runs the model with ``labels`` so Megatron's ``vocab_parallel_cross_entropy`` computes
-logp without ever gathering the full [B, S, V] logits over TP, through
``get_forward_backward_func(forward_only=True)`` so pipeline stages pass activations as in
training; the last PP stage broadcasts the result to every rank of its pipeline group.

Packed rows: pass ``attention_mask`` and ``position_ids`` of the packed batch.
Left out: micro-batching (one micro-batch of B rows), context parallelism.
"""

from __future__ import annotations

import torch


def causal_mask(b: int, s: int) -> torch.Tensor:
    """Megatron attention mask [B, 1, S, S] bool, True = masked (strictly upper triangle)."""
    return torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).expand(b, 1, s, s).contiguous()


def compute_logprobs(tr_or_model, tokens: torch.Tensor, *,
                     attention_mask: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None, extra: dict | None = None,
                     wrap_step=None) -> torch.Tensor:
    """Log-probabilities of ``tokens[:, 1:]`` given their prefixes, on every rank.

    Collective over the model-parallel group (TP / PP / EP): every rank of a DP replica calls it
    with the same ``tokens``.

    Args:
        tr_or_model: a ``Trainer`` (``.model``) or this rank's GPTModel chunk (DDP-wrapped or not).
        tokens: [B, S] int64 token ids, S >= 2, ids < the HF vocab size.
        attention_mask: [B, 1, S, S] bool, True = masked (Megatron convention); default causal.
        position_ids: [B, S] int64; default ``arange(S)`` per row. For packed rows pass the
            batch's block-diagonal ``attention_mask`` and restarting ``position_ids`` (see
            ``rl_batch.pack_microbatches``): the logprobs then equal the unpacked ones.
        extra: more batch keys handed to the forward step (e.g. ``"replay_routes"``).
        wrap_step: ``forward_step -> forward_step`` applied to the pass's Megatron forward step
            (e.g. ``moe.routing_replay.RoutingReplay.wrap_forward_step`` for R3 / R2 / RECORD).
    Returns:
        [B, S - 1] float32 natural-log probabilities (<= 0), on CPU, identical on every rank of
        the pipeline group: ``out[b, t] = log p(tokens[b, t + 1] | tokens[b, :t + 1])``.
    Raises:
        ValueError: ``tokens`` is not 2-D int64 with S >= 2.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if tokens.dim() != 2 or tokens.dtype != torch.int64 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [B, S>=2] int64, got {tuple(tokens.shape)} {tokens.dtype}")
    model = getattr(tr_or_model, "model", tr_or_model)
    b, s = tokens.shape
    device = next(model.parameters()).device
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]  # the last position predicts nothing we keep
    batch = {
        "tokens": tokens.to(device), "labels": labels.to(device),
        "position_ids": (torch.arange(s).expand(b, s).contiguous() if position_ids is None
                         else position_ids).to(device),
        "attention_mask": (causal_mask(b, s) if attention_mask is None else attention_mask).to(device),
        **(extra or {}),
    }

    def step(data_iterator, m):
        mb = next(data_iterator)
        ce = m(mb["tokens"], mb["position_ids"], mb["attention_mask"], labels=mb["labels"])  # [B, S]

        def collect(output, non_loss_data=True):
            return output.detach()

        return ce, collect

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = get_forward_backward_func()(
                forward_step_func=step if wrap_step is None else wrap_step(step),
                data_iterator=iter([batch]), model=[model],
                num_microbatches=1, seq_length=s, micro_batch_size=b,
                forward_only=True, collect_non_loss_data=True,
            )
    finally:
        model.train(was_training)
    if ps.is_pipeline_last_stage():
        logp = (-out[0][:, :-1].float()).cpu().contiguous()  # [B, S-1]
    else:
        logp = torch.empty(b, s - 1, dtype=torch.float32)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        logp = logp.to(device)
        torch.distributed.broadcast(logp, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
        logp = logp.cpu()
    return logp
