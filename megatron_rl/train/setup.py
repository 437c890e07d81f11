"""The trainer set-up both loops share (SFT: ``train.sft``, RL: ``train.grpo``): parallel init,
the Megatron-Core model from an HF config (+ FP8 plan), DDP, optimizer and LR schedule, the HF
weights, the tokenizer. What the schedule needs (``train_steps``, ``seq_length``) is passed in,
never read from a loop's own flags.
Left out: virtual pipeline stages, building from a Megatron checkpoint (resume loads over it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from megatron_rl.train.engine import OptimConfig, Trainer, build_trainer


class Setup(NamedTuple):
    """What ``setup`` returns."""

    trainer: Trainer
    tokenizer: object  # transformers.PreTrainedTokenizerBase of the HF dir
    hf_config: dict
    token_multiple: int  # every row length must be a multiple of it (FP8 GEMM alignment; 1 without FP8)


def setup(args, *, train_steps: int, seq_length: int | None = None, tconfig_hook=None) -> Setup:
    """Parallel init, model + optimizer, HF weights, tokenizer.

    Args:
        args: the run's model / parallel / optimizer / FP8 flags (``hf``, ``device``, ``tp``..``cp``,
            ``sequence_parallel``, ``moe_*``, ``bf16``, ``recompute``, ``lr``, ``min_lr``,
            ``lr_warmup_steps``, ``lr_decay_style``, ``weight_decay``, ``clip_grad``,
            ``no_distributed_optimizer``, ``seed``, the FP8 flags of ``quant.fp8_training``).
        train_steps: optimizer steps of the LR / WD schedule (SFT: its steps; RL: RL steps x
            mini-batches per rollout).
        seq_length: the packed row length (SFT), checked against the FP8 token alignment; None
            when rows are sized per batch (RL pads them to ``Setup.token_multiple``).
        tconfig_hook: ``TransformerConfig -> TransformerConfig``, edits the config before the
            model is built (e.g. ``moe.routing_replay.enable_routing_replay``).
    Returns: ``Setup(trainer, tokenizer, hf_config, token_multiple)``.
    Raises: ValueError: FP8 asked where it cannot run (``quant.fp8_training.resolve_fp8``), or a
        ``seq_length`` that is not a multiple of the FP8 recipe's token alignment.
    """
    from transformers import AutoTokenizer

    from megatron_rl.checkpoint.hf_loader import load_hf_weights
    from megatron_rl.models import ModelOptions, load_hf_config, transformer_config_from_hf
    from megatron_rl.parallel import ParallelConfig, init_parallel

    from megatron_rl.quant.fp8_training import resolve_fp8

    hf_config = load_hf_config(args.hf)
    fp8 = resolve_fp8(args, device=args.device if args.device != "auto" else
                      ("cuda" if torch.cuda.is_available() else "cpu"), te_available=_has_te(),
                      is_moe=bool(hf_config.get("num_experts") or hf_config.get("n_routed_experts")
                                  or hf_config.get("num_local_experts")))  # FP8 without TE: refused
    # row lengths are padded to fp8.pad_multiple (RL) / it must divide --seq-length (SFT)
    if seq_length and seq_length % fp8.pad_multiple:
        raise ValueError(f"--seq-length {seq_length} must be a multiple of {fp8.pad_multiple}, the token "
                         f"alignment of --fp8-recipe {args.fp8_recipe} (packed rows are GEMM operands)")
    pc = ParallelConfig(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                        ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size,
                        cp=args.context_parallel_size, sequence_parallel=args.sequence_parallel)
    device = init_parallel(pc, device=args.device, seed=args.seed)
    opts = ModelOptions(
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff, moe_z_loss_coeff=args.moe_z_loss_coeff,
        sequence_parallel=args.sequence_parallel, recompute=args.recompute_granularity or "none",
        use_te=device == "cuda" and fp8.use_te, overrides=fp8.overrides,
    )
    tconfig = transformer_config_from_hf(hf_config, opts, tp=pc.tp, pp=pc.pp, ep=pc.ep, etp=pc.etp, cp=pc.cp)
    if tconfig_hook is not None:
        tconfig = tconfig_hook(tconfig)
    optim = OptimConfig(lr=args.lr, min_lr=args.min_lr, warmup_steps=args.lr_warmup_iters,
                        train_steps=train_steps, decay_style=args.lr_decay_style,
                        weight_decay=args.weight_decay, clip_grad=args.clip_grad,
                        use_distributed_optimizer=args.use_distributed_optimizer,
                        override_opt_param_scheduler=args.override_opt_param_scheduler,
                        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler)
    tr = build_trainer(hf_config, tconfig, optim, use_te=opts.use_te)
    load_hf_weights(tr.model, args.hf, hf_config)
    tr.optimizer.reload_model_params()  # main (fp32) params follow the loaded weights
    tokenizer = AutoTokenizer.from_pretrained(args.hf)
    return Setup(tr, tokenizer, hf_config, fp8.pad_multiple)


def _has_te() -> bool:
    from megatron_rl._optional import has_te

    return has_te()
