"""The GRPO command line: flags -> (Megatron/SFT ``argparse.Namespace``, ``RLConfig``).

Split out of ``train/grpo.py`` (the loop); ``grpo.parse_args`` is this module's ``parse_args``.
"""

from __future__ import annotations

import argparse
import os
import shlex

from megatron_rl.quant.fp8_engine import add_rollout_fp8_args
from megatron_rl.train.cli_extras import add_data_logging_args
from megatron_rl.train.rl_config import ADVANTAGES, KL_KINDS, LBL_MODES, REPLAY_MODES, RLConfig


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m megatron_rl.train.grpo`` parser: the SFT/Megatron flags (``sft.add_common_args``)
    plus the data / rollout / RL / eval groups; each RL flag is an ``RLConfig`` field of the same name."""
    from megatron_rl.train.sft import add_common_args

    p = argparse.ArgumentParser(description="GRPO-family RL of a Megatron-Core MoE model with rollout engines")
    add_common_args(p)
    add_data_logging_args(p)  # --input-key/--label-key/--solution-key, --verifier, --wandb-*
    d = p.add_argument_group("data / rollout")
    d.add_argument("--train-data", required=True, help="prompts with a label: jsonl, parquet or an HF dataset dir")
    d.add_argument("--eval-data", action="append", default=[], help="NAME=PATH, repeatable")
    d.add_argument("--num-engines", type=int, default=2)
    d.add_argument("--engine-kind", default="embedded", choices=["embedded", "sglang"])
    d.add_argument("--engine-args", default="",
                   help="extra engine flags, one shell-quoted string passed through to every engine "
                        "(e.g. \"--dtype bfloat16\"; SGLang: \"--mem-fraction-static 0.7 --tp 2\")")
    r = p.add_argument_group("rl")
    r.add_argument("--rollout-batch-size", type=int, default=8, help="prompts per step")
    r.add_argument("--n-samples-per-prompt", type=int, default=4)
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--num-steps", type=int, default=10)
    r.add_argument("--mini-batches-per-rollout", type=int, default=1, help="1 = fully on-policy")
    r.add_argument("--micro-batch-size", type=int, default=4)
    r.add_argument("--advantage", default="grpo", choices=ADVANTAGES)
    r.add_argument("--eps-low", type=float, default=0.2)
    r.add_argument("--eps-high", type=float, default=0.2)
    r.add_argument("--tis-cap", type=float, default=None)
    r.add_argument("--icepop-low", type=float, default=None)
    r.add_argument("--icepop-high", type=float, default=None)
    r.add_argument("--seq-mask-low", type=float, default=None)
    r.add_argument("--seq-mask-high", type=float, default=None)
    r.add_argument("--kl-coef", type=float, default=0.0)
    r.add_argument("--kl-kind", default="k3", choices=KL_KINDS)
    r.add_argument("--ref-hf", default=None, help="HF dir of the frozen reference policy (KL)")
    r.add_argument("--entropy-coef", type=float, default=0.0)
    r.add_argument("--dynamic-sampling", action="store_true")
    r.add_argument("--dynamic-sampling-max-rounds", type=int, default=4)
    r.add_argument("--overlong-filter", action="store_true")
    r.add_argument("--overlong-buffer", type=int, default=0)
    r.add_argument("--overlong-penalty", type=float, default=1.0)
    r.add_argument("--async-one-step-off", action="store_true")
    r.add_argument("--hpt-gamma", type=float, default=None)
    r.add_argument("--pack-rollouts", action="store_true")
    r.add_argument("--pack-max-tokens", type=int, default=0)
    r.add_argument("--lbl-mode", default="off", choices=LBL_MODES)
    r.add_argument("--lbl-alpha", type=float, default=0.0)
    r.add_argument("--expert-bias-rate", type=float, default=0.0)
    r.add_argument("--routing-replay", default="off", choices=REPLAY_MODES)
    r.add_argument("--routing-flip-rate", action="store_true",
                   help="ask the engines for their routes and log the top-k flip rate vs the trainer")
    r.add_argument("--partial-rollout", action="store_true",
                   help="abort generations still running once a step has enough groups; continue them next step")
    r.add_argument("--partial-rollout-extra-groups", type=int, default=1,
                   help="groups generated beyond --rollout-batch-size per step (with --partial-rollout)")
    from megatron_rl.rollout.multiturn import add_multiturn_args

    add_multiturn_args(p)
    add_rollout_fp8_args(r)  # --rollout-fp8, --fp8-qat (megatron_rl.quant)
    r.add_argument("--loss-impl", default="auto", choices=("auto", "fused", "torch"),
                   help="logprobs / entropy / PPO clipping: fused csrc ops or torch (auto: fused if built)")
    r.add_argument("--eval-interval", type=int, default=0, help="0: only at the end")
    r.add_argument("--eval-n-samples", type=int, default=4)
    r.add_argument("--eval-max-prompts", type=int, default=64)
    r.add_argument("--eval-temperature", type=float, default=None,
                   help="sampling temperature of the evals (default: --temperature)")
    r.add_argument("--stop-after-steps", type=int, default=0,
                   help="exit after this many steps in this process, without a final checkpoint "
                        "(simulates a kill; to test resume)")
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, RLConfig]:
    """Parse and check the GRPO command line.

    Returns ``(args, cfg)``: the Megatron/SFT namespace (``args.engine_extra_args`` split from
    ``--engine-args``; ``args.train_steps`` = optimizer steps for the LR schedule) and the
    validated ``RLConfig``. A bad flag or flag combination exits through ``argparse`` (status 2)
    with a message naming the flag."""
    from megatron_rl.rollout.multiturn import check_multiturn_args
    from megatron_rl.train.sft import check_optim_args

    p = build_parser()
    args = p.parse_args(argv)
    check_optim_args(p, args)
    if args.num_engines < 1:
        p.error(f"--num-engines must be >= 1, got {args.num_engines}")
    for spec in args.eval_data:
        if "=" not in spec:
            p.error(f"--eval-data expects NAME=PATH, got {spec!r}")
    try:
        args.engine_extra_args = tuple(shlex.split(args.engine_args))
    except ValueError as e:
        p.error(f"--engine-args: {e}")
    try:
        cfg = RLConfig(**{f: getattr(args, f) for f in RLConfig.__dataclass_fields__})
    except ValueError as e:
        p.error(str(e))
    if cfg.kl_coef > 0 and not os.path.isfile(os.path.join(cfg.ref_hf, "config.json")):
        p.error(f"--ref-hf {cfg.ref_hf}: no config.json there (an HF checkpoint dir is expected)")
    if args.moe_aux_loss_coeff > 0 and cfg.lbl_mode != "off":
        p.error("--lbl-mode and --moe-aux-loss-coeff are two load-balancing losses; use one")
    check_multiturn_args(p, args, cfg)
    args.train_steps = cfg.num_steps * cfg.mini_batches_per_rollout  # LR schedule in optimizer steps
    return args, cfg


def engine_context_length(engine_args: tuple[str, ...]) -> int | None:
    """The ``--context-length`` passed to the engines through ``--engine-args``, else None."""
    for i, a in enumerate(engine_args):
        if a.startswith("--context-length"):
            return int(a.split("=", 1)[1] if "=" in a else engine_args[i + 1])
    return None
