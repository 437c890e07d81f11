"""Megatron-Core training machinery shared by the SFT and RL loops.

Legend: B = micro-batch size (rows), S = sequence length (tokens per packed row), V = vocab.

``build_trainer`` builds this rank's model chunk wrapped in Megatron DDP, the Megatron optimizer
(DistributedOptimizer by default) and the LR/WD scheduler. ``train_step`` runs one optimizer
step over a list of micro-batches with the real pipeline schedule from
``get_forward_backward_func`` and returns globally reduced metrics. Loss normalisation is the
exact token mean over the whole global batch (all micro-batches, all DP ranks): Megatron's
``calculate_per_token_loss`` path, where DDP sums gradients and ``finalize_model_grads``
divides by the all-reduced token count.

Left out: virtual pipeline stages (interleaved 1F1B), FSDP, CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from megatron_rl.models.base import build_model


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer + schedule. Units: steps are optimizer steps; lr in absolute units."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    train_steps: int = 100
    decay_style: str = "cosine"  # Megatron's: constant | linear | cosine | inverse-square-root
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True
    # on resume (Megatron's flags): neither -> a changed schedule is refused
    # (checkpointing.check_schedule); override -> this run's; use_checkpoint -> the checkpoint's
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False


@dataclass
class Trainer:
    """This rank's model chunk (DDP-wrapped), optimizer, scheduler and config."""

    model: torch.nn.Module
    optimizer: object
    scheduler: object
    config: object
    hf_config: dict


def build_trainer(hf_config: dict, tconfig, optim: OptimConfig, *, use_te: bool = False) -> Trainer:
    """Build model (this PP stage), DDP wrapper, Megatron optimizer and scheduler.

    Requires ``init_parallel`` first. Sets the config hooks Megatron's schedules expect
    (``finalize_model_grads_func``, ``grad_scale_func``, ``no_sync_func``).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    tconfig.calculate_per_token_loss = True
    module = build_model(hf_config, tconfig, pre_process=ps.is_pipeline_first_stage(),
                         post_process=ps.is_pipeline_last_stage(), use_te=use_te)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=optim.use_distributed_optimizer, check_for_nan_in_grad=True,
    )
    model = DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=module)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=tconfig.bf16, fp16=tconfig.fp16,
        params_dtype=tconfig.params_dtype,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(optim.train_steps, optim.warmup_steps + 1),
        lr_decay_style=optim.decay_style, start_wd=optim.weight_decay,
        end_wd=optim.weight_decay, wd_incr_steps=max(optim.train_steps, 1),
        wd_incr_style="constant", override_opt_param_scheduler=optim.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=optim.use_checkpoint_opt_param_scheduler,
    )
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    tconfig.no_sync_func = model.no_sync
    return Trainer(model=model, optimizer=optimizer, scheduler=scheduler, config=tconfig,
                   hf_config=hf_config)


def masked_token_loss(loss_mask: torch.Tensor, output: torch.Tensor):
    """Megatron 3-tuple loss: (sum of masked per-token CE, token count, reporting dict).

    Args:
        loss_mask: [B, S] float, 1 where the token's loss counts.
        output: [B, S] float per-token cross entropy (nats) from ``GPTModel(..., labels=...)``.
    Returns:
        ``(loss_sum [], num_tokens [] int, {"lm_loss": [2] (loss_sum, num_tokens)})``; with
        ``calculate_per_token_loss`` Megatron divides gradients by the global token count.
    """
    loss_mask = loss_mask.float()
    loss_sum = (output.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), loss_mask.sum().detach()])
    return loss_sum, num_tokens, {"lm_loss": report}


def lm_forward_step(data_iterator, model):
    """Megatron forward_step_func for language modelling on packed rows.

    Batch keys: tokens/labels/position_ids [B, S] int64, loss_mask [B, S] float,
    attention_mask [B, 1, S, S] bool (True = masked; block-diagonal causal for packing).
    """
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                   labels=batch["labels"])
    return output, partial(masked_token_loss, batch["loss_mask"])


def _reduce_loss(loss_dicts: list[dict]) -> tuple[float, float]:
    """Sum (loss_sum, tokens) over micro-batches, DP ranks, and broadcast from the last PP stage."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64)
    for d in loss_dicts:
        total += d["lm_loss"].double()
    torch.distributed.all_reduce(total, group=ps.get_data_parallel_group())
    torch.distributed.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return float(total[0]), float(total[1])


def train_step(tr: Trainer, microbatches: list[dict], *,
               forward_step: Callable = lm_forward_step) -> dict:
    """One optimizer step over this DP rank's micro-batches.

    Args:
        tr: the Trainer.
        microbatches: list of batch dicts (see ``lm_forward_step``) or typed micro-batches
            (``rl_batch.MicroBatch``) that ``forward_step`` reads, all with the same [B, S].
    Returns:
        metrics: ``train/loss`` (global token-mean CE, nats), ``train/num_tokens``,
        ``train/grad_norm``, ``train/lr``, ``train/update_ok``.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    first = microbatches[0]
    b, s = (first["tokens"] if isinstance(first, dict) else first.tokens).shape
    tr.model.zero_grad_buffer()
    tr.optimizer.zero_grad()
    loss_dicts = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=[tr.model],
        num_microbatches=len(microbatches), seq_length=s, micro_batch_size=b,
        forward_only=False,
    )
    update_ok, grad_norm, _ = tr.optimizer.step()
    lr = tr.optimizer.param_groups[0]["lr"]
    if update_ok:
        tr.scheduler.step(increment=1)
    loss_sum, ntok = _reduce_loss(loss_dicts)
    return {
        "train/loss": loss_sum / max(ntok, 1.0),
        "train/num_tokens": ntok,
        "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "train/lr": lr,
        "train/update_ok": bool(update_ok),
    }


def forward_logits(tr_or_model, microbatches: list[dict]) -> list[torch.Tensor] | None:
    """Forward-only pass returning full-vocab logits per micro-batch on the last PP stage.

    Batch keys: tokens / position_ids [B, S]; attention_mask [B, 1, S, S] bool (optional: None
    = plain causal). Returns a list of [B, S, V_padded] float tensors (gathered over TP) on the
    last pipeline stage, None elsewhere. Used by eval/generation and the layout-equivalence tests.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model = getattr(tr_or_model, "model", tr_or_model)

    def step(data_iterator, m):
        batch = next(data_iterator)
        logits = m(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))

        def collect(output, non_loss_data=True):
            return gather_from_tensor_model_parallel_region(output).detach()  # [B, S, V]

        return logits, collect

    b, s = microbatches[0]["tokens"].shape
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(microbatches), model=[model],
            num_microbatches=len(microbatches), seq_length=s, micro_batch_size=b,
            forward_only=True, collect_non_loss_data=True,
        )
    return list(out) if ps.is_pipeline_last_stage() else None
