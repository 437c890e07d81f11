"""The GRPO command line: flags / ``--config`` YAML -> (``argparse.Namespace``, ``RLConfig``).

Split out of ``train/grpo.py`` (the loop); ``grpo.parse_args`` is this module's ``parse_args``.
The flags are the fields of ``megatron_rl.config`` (declared once there / in ``RLConfig``).
"""

from __future__ import annotations

import argparse
import os
import shlex

from megatron_rl.config import GRPO_TREE
from megatron_rl.train.rl_config import RLConfig
from megatron_rl.train.run_config import ConfigParser, finish_config, parse_config


def build_parser() -> ConfigParser:
    """The ``python -m megatron_rl.train.grpo`` parser: the sections of ``config.GRPO_TREE`` (model,
    moe, fp8, parallel, optimizer, training, checkpoint, data, logging, rl, rollout) plus
    ``--config`` / ``--print-config``; each rl flag is an ``RLConfig`` field of the same name."""
    return ConfigParser(GRPO_TREE, description="GRPO-family RL of a Megatron-Core MoE model with rollout engines")


def parse_args(argv=None) -> tuple[argparse.Namespace, RLConfig]:
    """Parse and check the GRPO command line.

    Returns ``(args, cfg)``: the flat namespace of every field of the tree (``args.engine_extra_args``
    split from ``--engine-args``; ``args.train_iters`` = optimizer steps for the LR schedule;
    ``args.run_config`` the resolved config, ``train.run_config``) and the validated ``RLConfig``.
    A bad flag, flag combination or ``--config`` file exits through ``argparse`` (status 2) with a
    message naming the flag / key; ``--print-config`` prints the resolved YAML and exits 0."""
    from megatron_rl.rollout.multiturn import check_multiturn_args
    from megatron_rl.train.sft import check_common_args

    p = build_parser()
    args = parse_config(p, argv)
    check_common_args(p, args)
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
    finish_config(p, args)  # args.run_config; --print-config exits here; args.save / args.load
    args.train_iters = cfg.num_steps * cfg.mini_batches_per_rollout  # LR schedule in optimizer steps
    return args, cfg


def engine_context_length(engine_args: tuple[str, ...]) -> int | None:
    """The ``--context-length`` passed to the engines through ``--engine-args``, else None."""
    for i, a in enumerate(engine_args):
        if a.startswith("--context-length"):
            return int(a.split("=", 1)[1] if "=" in a else engine_args[i + 1])
    return None
