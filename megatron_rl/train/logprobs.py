"""Per-token log-probabilities of a token sequence under the live Megatron model (no grad).

Legend: B = rows, S = tokens per row, V = vocab (TP-sharded inside the model).

``compute_logprobs`` is the trainer side of the rollout/trainer consistency check and of the
"old logprobs" of an RL step: logp[b, t] = log softmax(logits[b, t])[tokens[b, t + 1]] (logits
divided by the rollout temperature when ``apply_logits_temperature`` hooked the model).
It runs the model with ``labels`` so Megatron's ``vocab_parallel_cross_entropy`` computes
-logp without ever gathering the full [B, S, V] logits over TP (``loss_impl="torch"``), or takes
the vocab-parallel logits and runs the fused one-pass op ``ops.vocab_parallel_logprobs_entropy``
(``"fused"``, the default where the compiled op exists), through
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


def apply_logits_temperature(model, temperature: float) -> list:
    """Divide the policy's logits by the rollout ``temperature`` in every forward (train and no-grad).

    The engines sample from softmax(logits / T) and report its logprobs (SGLang's default), so the
    old / new / reference logprobs, the PPO ratio and the entropy must use the same tempered
    distribution (verl's and slime's rollout-temperature scaling of the trainer logits). Implemented
    as a forward hook on every ``output_layer`` (GPTModel's vocab-parallel projection; only the last
    PP stage has one) that returns ``(logits / T, bias)``; autograd sees the division.

    Args:
        model: a GPTModel chunk (DDP-wrapped or not) or a ``Trainer`` (``.model``).
        temperature: T > 0; T == 1 registers nothing.
    Returns:
        the hook handles (``handle.remove()`` undoes it).
    Raises:
        ValueError: T <= 0, or T != 1 and this rank's model has no ``output_layer`` on a last
            pipeline stage.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if temperature == 1.0:
        return []
    model = getattr(model, "model", model)

    def hook(module, inputs, output):
        logits, bias = output
        return logits / temperature, bias

    handles = [m.register_forward_hook(hook) for name, m in model.named_modules()
               if name.split(".")[-1] == "output_layer"]
    from megatron.core import parallel_state as ps

    if not handles and ps.is_pipeline_last_stage():
        raise ValueError("apply_logits_temperature: no output_layer found in the model")
    return handles


def _nll_step(fused: bool):
    """Forward-only Megatron step collecting -logp [B, S] of ``labels``: Megatron's vocab-parallel
    CE (model called with labels), or (``fused``) the logits [B, S, V / tp] through the one-pass
    ``ops.vocab_parallel_logprobs_entropy``."""
    from megatron.core import parallel_state as ps

    from megatron_rl.ops import vocab_parallel_logprobs_entropy

    def step(data_iterator, m):
        mb = next(data_iterator)
        if fused:  # logits [B, S, V / tp] -> -logp [B, S], like the CE of the labels path
            logits = m(mb["tokens"], mb["position_ids"], mb["attention_mask"])

            def collect_fused(output, non_loss_data=True):
                lp, _ = vocab_parallel_logprobs_entropy(output.detach(), mb["labels"],
                                                        group=ps.get_tensor_model_parallel_group())
                return -lp

            return logits, collect_fused
        ce = m(mb["tokens"], mb["position_ids"], mb["attention_mask"], labels=mb["labels"])  # [B, S]

        def collect(output, non_loss_data=True):
            return output.detach()

        return ce, collect

    return step


def compute_logprobs(tr_or_model, tokens: torch.Tensor, *,
                     attention_mask: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None, extra: dict | None = None,
                     wrap_step=None, loss_impl: str = "auto") -> torch.Tensor:
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
        extra: more batch keys handed to the forward step (e.g. ``"routes"`` for routing replay).
        wrap_step: ``forward_step -> forward_step`` applied to the pass's Megatron forward step
            (e.g. ``moe.routing_replay.RoutingReplay.wrap_forward_step`` for R3 / R2 / RECORD).
        loss_impl: "fused" / "torch" / "auto" (``ops.resolve_loss_impl`` on the model's device).
    Returns:
        [B, S - 1] float32 natural-log probabilities (<= 0), on CPU, identical on every rank of
        the pipeline group: ``out[b, t] = log p(tokens[b, t + 1] | tokens[b, :t + 1])``.
    Raises:
        ValueError: ``tokens`` is not 2-D int64 with S >= 2, or an unknown ``loss_impl``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rl.ops import resolve_loss_impl

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

    step = _nll_step(resolve_loss_impl(loss_impl, device) == "fused")
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


def logprobs_of(model: torch.nn.Module, mb, route: dict, loss_impl: str) -> torch.Tensor:
    """[B, S] float32 logprobs of ``mb.labels`` under ``model`` (a Trainer or a model chunk) in the
    label frame (position S - 1 is 0): ``compute_logprobs`` (no grad, collective as it is) with
    the layout of ``mb`` (an ``rl_batch.MicroBatch``: tokens, attention_mask, position_ids,
    loss_mask) and ``route``'s routing keywords (``moe.step_routing.MoERouting`` passes)."""
    logp = compute_logprobs(model, mb.tokens, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                            loss_impl=loss_impl, **route)  # [B, S - 1]
    out = torch.zeros_like(mb.loss_mask, dtype=torch.float32)
    out[:, :-1] = logp
    return out
