"""Data-mapping, verifier and W&B flags shared by ``grpo`` and ``sft`` (one argparse group).

Attributes set on ``args``: ``input_key``, ``label_key``, ``solution_key`` (``data.loader.RowKeys``),
``verifier`` (``rollout.rewards.resolve_verifier``), ``wandb_project``, ``wandb_exp_name``,
``wandb_entity``, ``wandb_save_dir`` (``train.logging.WandbOptions``).
"""

from __future__ import annotations

import argparse


def add_data_logging_args(p: argparse.ArgumentParser) -> None:
    """Add the dataset key mapping, ``--verifier`` and ``--wandb-*`` flags to ``p``."""
    d = p.add_argument_group("dataset columns / verifier")
    d.add_argument("--input-key", default="messages",
                   help="column with the chat messages (list of {role, content}) or a plain prompt string "
                        "(one user turn); dots address nested fields (e.g. extra.question)")
    d.add_argument("--label-key", default="label",
                   help="column with the verifiable answer (e.g. reward_model.ground_truth)")
    d.add_argument("--solution-key", default="solution", help="column with the SFT target of a prompt row")
    d.add_argument("--verifier", default="synthetic",
                   help="reward function: synthetic | math (math-verify) | module:callable | file.py:callable; "
                        "it returns a float or {'reward': float, <metric>: float, ...}")
    w = p.add_argument_group("Weights & Biases (optional: pip install 'megatron_rl[wandb]')")
    w.add_argument("--wandb-project", default=None, help="W&B project; W&B logging is off without it")
    w.add_argument("--wandb-exp-name", default=None, help="W&B run name (default: W&B's)")
    w.add_argument("--wandb-entity", default=None, help="W&B entity (team or user)")
    w.add_argument("--wandb-save-dir", default=None,
                   help="W&B writes under <dir>/wandb (default: $WANDB_DIR, else --out)")
