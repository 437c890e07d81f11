"""Supervised fine-tuning of a Megatron-Core MoE model from an HF checkpoint.

    python -m megatron_rl.train.sft --hf MODEL_DIR --train-data train.jsonl \
        --eval-data id=eval_id.jsonl --out RUN_DIR [--tensor-model-parallel-size N ...]
    python -m megatron_rl.train.sft --config run.yaml [flags overriding it] [--print-config]

(flags: the ``config.SFT_TREE`` sections, README "Run configuration"; one process per rank:
``torchrun`` / ``srun``; a single plain process is world size 1).
Pipeline: chat template -> loss on assistant tokens only -> packed rows (no cross-document
attention) -> Megatron pipeline schedule + DistributedOptimizer -> LR warmup/decay, grad clip ->
metrics.jsonl + TensorBoard -> dist_checkpointing save / resume from the latest checkpoint ->
greedy-generation exact-match eval on held-out problems.
Left out: virtual pipeline stages, context parallelism for long sequences, FP8 (GPU issue).
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_rl.train import checkpointing as ckpt
from megatron_rl.train.engine import train_step
from megatron_rl.train.logging import MetricsLogger, WandbOptions, progress_bar
from megatron_rl.train.run_config import record_run_config
from megatron_rl.train.setup import setup
from megatron_rl.train.sft_data import PackedRowStream, dp_microbatches, load_sft_samples


def check_common_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks shared by the SFT and RL entry points: ``check_optim_args`` and the recompute flags
    (only Megatron's full / uniform / 1-layer recompute is implemented, ``models.base``)."""
    check_optim_args(p, args)
    if args.recompute_method not in (None, "uniform") or args.recompute_num_layers not in (None, 1):
        p.error(f"--recompute-method {args.recompute_method} --recompute-num-layers {args.recompute_num_layers}: "
                "only uniform with 1 layer per chunk is implemented")
    if args.recompute_granularity is None and (args.recompute_method or args.recompute_num_layers):
        p.error("--recompute-method / --recompute-num-layers need --recompute-granularity full")


def check_optim_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill ``args.min_lr`` (default 0.1 x lr) and refuse schedules Megatron would assert on.

    Megatron's ``OptimizerParamScheduler`` asserts ``max_lr >= min_lr`` with no message; here
    ``p.error`` names both flags instead (exit code 2).
    """
    if args.lr <= 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.min_lr is None:
        args.min_lr = 0.1 * args.lr
    if not 0 <= args.min_lr <= args.lr:
        p.error(f"--min-lr {args.min_lr} must be in [0, --lr {args.lr}]")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        p.error("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other")


def build_parser():
    """The ``python -m megatron_rl.train.sft`` parser: the sections of ``config.SFT_TREE`` plus
    ``--config`` / ``--print-config`` (``train.run_config``)."""
    from megatron_rl.config import SFT_TREE
    from megatron_rl.train.run_config import ConfigParser

    return ConfigParser(SFT_TREE, description=__doc__.split("\n")[0])


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the SFT command line (flags / ``--config`` YAML). Returns the flat namespace
    of every field of ``config.SFT_TREE`` plus ``args.run_config`` (the resolved config) and
    ``args.save`` / ``args.load`` filled in. Exits with status 2 naming the flag / key on bad
    input; ``--print-config`` prints the resolved YAML and exits 0."""
    from megatron_rl.train.run_config import finish_config, parse_config

    p = build_parser()
    args = parse_config(p, argv)
    check_common_args(p, args)
    for spec in args.eval_data:
        if "=" not in spec:
            p.error(f"--eval-data expects NAME=PATH, got {spec!r}")
    finish_config(p, args)
    return args


def _is_logger() -> bool:
    return torch.distributed.get_rank() == 0


def main(argv=None) -> None:
    from megatron_rl.data.loader import RowKeys
    from megatron_rl.rollout.rewards import resolve_verifier

    args = parse_args(argv)
    keys, verifier = RowKeys.from_args(args), resolve_verifier(args.verifier)  # a bad --verifier fails first
    tr, tokenizer, hf_config, _ = setup(args, train_steps=args.train_iters, seq_length=args.seq_length)
    from megatron.core import parallel_state as ps

    from megatron_rl.train.evaluate import evaluate_splits

    samples = load_sft_samples(args.train_data, tokenizer, args.seq_length,
                               require_label=not args.no_require_label, keys=keys)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stream = PackedRowStream(samples, args.seq_length, args.seed, pad_id)
    ckpt_root = args.save
    record_run_config(args, is_rank0=_is_logger())  # <out>/config.yaml; warns on fields changed since --load's
    state = None if args.no_resume else ckpt.load_checkpoint(args.load, tr, fallback=args.resume_fallback)
    step = 0
    if state is not None:
        step = state["step"]
        stream.load_state_dict(state["data"])
    log = MetricsLogger(args.out, enabled=_is_logger(), resume_step=step, wandb=WandbOptions.from_args(args),
                        config=vars(args))
    eval_splits = dict(spec.split("=", 1) for spec in args.eval_data)

    def run_eval():
        if eval_splits:
            log.log(step, evaluate_splits(tr, tokenizer, args.hf, hf_config, eval_splits,
                                          n=args.eval_samples, verifier=verifier, keys=keys,
                                          max_new_tokens=args.eval_max_new_tokens))

    if step == 0:
        run_eval()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    bar = _progress(args.train_iters, step)
    steps_here = 0
    while step < args.train_iters:
        t0 = time.perf_counter()
        rows = [stream.next_row() for _ in range(args.global_batch_size)]
        metrics = train_step(tr, dp_microbatches(rows, dp_rank, dp, args.micro_batch_size))
        step += 1
        steps_here += 1
        dt = time.perf_counter() - t0
        metrics.update({"perf/step_time_s": dt,
                        "perf/tokens_per_s": args.global_batch_size * args.seq_length / dt,
                        "data/epoch": stream.epoch})
        log.log(step, metrics)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}")
        last = step == args.train_iters
        if (args.save_interval and step % args.save_interval == 0) or last:
            ckpt.save_checkpoint(ckpt_root, step, tr, {"data": stream.state_dict()}, config=args.run_config)
        if (args.eval_interval and step % args.eval_interval == 0) or last:
            run_eval()
        if args.stop_after_steps and steps_here >= args.stop_after_steps:
            break
    if bar is not None:
        bar.close()
    if step == args.train_iters and args.save_hf:
        from megatron_rl.train.evaluate import save_hf_checkpoint

        save_hf_checkpoint(tr, args.hf, hf_config, args.save_hf)
    log.close()
    from megatron_rl.parallel import destroy_parallel

    destroy_parallel()


def _progress(total: int, start: int):
    return progress_bar(total, "sft", initial=start, unit="step")  # rank 0, on a terminal


if __name__ == "__main__":
    main()
