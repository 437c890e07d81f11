"""Supervised fine-tuning of a Megatron-Core MoE model from an HF checkpoint.

    python -m megatron_rl.train.sft --hf MODEL_DIR --train-data train.jsonl \
        --eval-data id=eval_id.jsonl --out RUN_DIR [--tp N --pp N --ep N ...]

(one process per rank: ``torchrun`` / ``srun``; a single plain process is world size 1).
Pipeline: chat template -> loss on assistant tokens only -> packed rows (no cross-document
attention) -> Megatron pipeline schedule + DistributedOptimizer -> LR warmup/decay, grad clip ->
metrics.jsonl + TensorBoard -> dist_checkpointing save / resume from the latest checkpoint ->
greedy-generation exact-match eval on held-out problems.
Left out: virtual pipeline stages, context parallelism for long sequences, FP8 (GPU issue).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from megatron_rl.train import checkpointing as ckpt
from megatron_rl.train.engine import train_step
from megatron_rl.train.logging import MetricsLogger
from megatron_rl.train.setup import setup
from megatron_rl.train.sft_data import PackedRowStream, dp_microbatches, load_sft_samples


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by the SFT and RL entry points (Megatron's spellings)."""
    g = p.add_argument_group("model / parallelism")
    g.add_argument("--hf", required=True, help="HF checkpoint dir (config, tokenizer, weights)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    for name in ("tp", "pp", "ep", "cp"):
        g.add_argument(f"--{name}", type=int, default=1)
    g.add_argument("--etp", type=int, default=None, help="expert TP (default: = --tp)")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--moe-token-dispatcher-type", default="alltoall",
                   choices=["alltoall", "allgather"])
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    g.add_argument("--moe-z-loss-coeff", type=float, default=None)
    g.add_argument("--bf16", action="store_true", help="bf16 params (GPU); CPU default fp32")
    g.add_argument("--recompute", default="none", choices=["none", "full"])
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--min-lr", type=float, default=None,
                   help="floor of the decay (default: 0.1 x --lr); must be <= --lr")
    o.add_argument("--lr-warmup-steps", type=int, default=10)
    o.add_argument("--lr-decay-style", default="cosine")
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--clip-grad", type=float, default=1.0)
    o.add_argument("--no-distributed-optimizer", action="store_true")
    o.add_argument("--seed", type=int, default=1234)
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, help="run directory")
    r.add_argument("--save-interval", type=int, default=0, help="0: only at the end")
    r.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out")
    r.add_argument("--resume-fallback", action="store_true",
                   help="if the latest checkpoint fails its manifest check, resume from the newest intact one")
    from megatron_rl.quant.fp8_training import add_fp8_args

    add_fp8_args(p)  # --transformer-impl, --fp8-format, --fp8-recipe, ... (Megatron's names)


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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--train-data", required=True)
    d.add_argument("--eval-data", action="append", default=[],
                   help="NAME=PATH, repeatable; evaluated by greedy generation + verifier")
    d.add_argument("--no-require-label", action="store_true",
                   help="accept training rows without a 'label' (plain chat SFT data)")
    d.add_argument("--seq-length", type=int, default=256)
    d.add_argument("--micro-batch-size", type=int, default=4)
    d.add_argument("--global-batch-size", type=int, default=16, help="packed rows per step")
    d.add_argument("--train-steps", type=int, default=100)
    d.add_argument("--eval-interval", type=int, default=0, help="0: only before and after")
    d.add_argument("--eval-samples", type=int, default=100, help="per eval split")
    d.add_argument("--eval-max-new-tokens", type=int, default=96)
    d.add_argument("--save-hf", default=None,
                   help="write the final weights as an HF checkpoint to this dir")
    d.add_argument("--stop-after-steps", type=int, default=0,
                   help="exit after this many steps in this process (to test resume)")
    args = p.parse_args(argv)
    check_optim_args(p, args)
    for spec in args.eval_data:
        if "=" not in spec:
            p.error(f"--eval-data expects NAME=PATH, got {spec!r}")
    return args


def _is_logger() -> bool:
    return torch.distributed.get_rank() == 0


def main(argv=None) -> None:
    args = parse_args(argv)
    tr, tokenizer, hf_config, _ = setup(args, train_steps=args.train_steps, seq_length=args.seq_length)
    from megatron.core import parallel_state as ps

    from megatron_rl.train.evaluate import evaluate_splits

    samples = load_sft_samples(args.train_data, tokenizer, args.seq_length,
                               require_label=not args.no_require_label)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stream = PackedRowStream(samples, args.seq_length, args.seed, pad_id)
    ckpt_root = os.path.join(args.out, "checkpoints")
    state = None if args.no_resume else ckpt.load_checkpoint(ckpt_root, tr, fallback=args.resume_fallback)
    step = 0
    if state is not None:
        step = state["step"]
        stream.load_state_dict(state["data"])
    log = MetricsLogger(args.out, enabled=_is_logger(), resume_step=step)
    eval_splits = dict(spec.split("=", 1) for spec in args.eval_data)

    def run_eval():
        if eval_splits:
            log.log(step, evaluate_splits(tr, tokenizer, args.hf, hf_config, eval_splits,
                                          n=args.eval_samples,
                                          max_new_tokens=args.eval_max_new_tokens))

    if step == 0:
        run_eval()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    bar = _progress(args.train_steps, step)
    steps_here = 0
    while step < args.train_steps:
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
        last = step == args.train_steps
        if (args.save_interval and step % args.save_interval == 0) or last:
            ckpt.save_checkpoint(ckpt_root, step, tr, {"data": stream.state_dict()})
        if (args.eval_interval and step % args.eval_interval == 0) or last:
            run_eval()
        if args.stop_after_steps and steps_here >= args.stop_after_steps:
            break
    if bar is not None:
        bar.close()
    if step == args.train_steps and args.save_hf:
        from megatron_rl.train.evaluate import save_hf_checkpoint

        save_hf_checkpoint(tr, args.hf, hf_config, args.save_hf)
    log.close()
    from megatron_rl.parallel import destroy_parallel

    destroy_parallel()


def _progress(total: int, start: int):
    if not _is_logger():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="sft", dynamic_ncols=True)


if __name__ == "__main__":
    main()
