"""Run metrics: one JSON object per step in ``metrics.jsonl``, TensorBoard scalars, and
optionally Weights & Biases; plus the console: one line per GRPO step and tqdm progress bars.

Only the logging rank (global rank 0) writes. Keys are grouped like ``train/loss``,
``perf/tokens_per_s``, ``eval/id/accuracy``. Lines are flushed as they are written, so a killed
run keeps every completed step; on resume, lines for steps after the checkpoint are dropped
first so the file never holds two records for one step.
W&B (``WandbOptions``, ``pip install megatron_rl[wandb]``): one run per run directory (its id is
kept in ``<out>/wandb_run_id``, so a resumed job continues the same W&B run), the resolved config
as the run config, every metric plotted against our ``step`` (``define_metric``), so a resumed
run may log a step again; offline with ``WANDB_MODE=offline`` (``wandb sync`` uploads later).
Progress bars (``progress_bar``) show only on rank 0 and only when stderr is a terminal, or when
``MEGATRON_RL_PROGRESS=1`` (``0`` hides them), so CI logs stay clean.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class WandbOptions:
    """``--wandb-project`` (required: W&B is off without it), ``--wandb-exp-name`` (the run's display
    name), ``--wandb-entity``, ``--wandb-save-dir`` (W&B writes under ``<dir>/wandb``; default
    $WANDB_DIR, else the run directory)."""

    project: str
    name: str | None = None
    entity: str | None = None
    save_dir: str | None = None

    @classmethod
    def from_args(cls, args) -> WandbOptions | None:
        """From ``args.wandb_project`` / ``wandb_exp_name`` / ``wandb_entity`` / ``wandb_save_dir``;
        None when no project is given."""
        project = getattr(args, "wandb_project", None)
        if not project:
            return None
        return cls(project=project, name=getattr(args, "wandb_exp_name", None),
                   entity=getattr(args, "wandb_entity", None), save_dir=getattr(args, "wandb_save_dir", None))


class MetricsLogger:
    """Append-only metrics writer (jsonl + TensorBoard) for the logging rank.

    Args:
        run_dir: the run directory (created if absent).
        enabled: False on non-logging ranks (every call becomes a no-op).
        resume_step: drop existing records with ``step > resume_step`` (None: keep all).
        wandb: W&B options (None: no W&B); config: the resolved run config (JSON-able after
            ``str`` of odd values), the W&B run config.
    Raises ImportError naming the extra when ``wandb`` is asked for but not installed.
    """

    def __init__(self, run_dir: str, *, enabled: bool = True, resume_step: int | None = None,
                 wandb: WandbOptions | None = None, config: dict | None = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = self._wandb = None
        if not enabled:
            return
        if wandb is not None:
            self._wandb = _start_wandb(run_dir, wandb, config or {})
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            self._truncate_after(resume_step)
        self._f = open(self.path, "a")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: drop it
                    continue
                if rec.get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict) -> None:
        """Write ``{"step": step, **metrics}``; non-finite floats are written as null."""
        if not self.enabled:
            return
        clean = {}
        for k, v in metrics.items():
            if isinstance(v, bool):
                v = int(v)
            if isinstance(v, float) and not math.isfinite(v):
                v = None
            clean[k] = v
        self._f.write(json.dumps({"step": step, **clean}) + "\n")
        self._f.flush()
        for k, v in clean.items():
            if isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({"step": step, **{k: v for k, v in clean.items() if isinstance(v, (int, float))}})

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()
                self._wandb = None


def _start_wandb(run_dir: str, opts: WandbOptions, config: dict):
    """wandb.init for this run directory (resuming the W&B run whose id ``<run_dir>/wandb_run_id`` keeps)."""
    from megatron_rl._optional import has_wandb, why_missing

    if not has_wandb():
        raise ImportError(f"--wandb-project {opts.project!r} needs the wandb package "
                          f"(pip install 'megatron_rl[wandb]'): {why_missing('wandb')}")
    import wandb

    os.makedirs(run_dir, exist_ok=True)
    id_path = os.path.join(run_dir, "wandb_run_id")
    run_id = open(id_path).read().strip() if os.path.exists(id_path) else uuid.uuid4().hex[:8]
    if not os.path.exists(id_path):
        with open(id_path + ".tmp", "w") as f:
            f.write(run_id + "\n")
        os.replace(id_path + ".tmp", id_path)
    save_dir = opts.save_dir or os.environ.get("WANDB_DIR") or run_dir
    os.makedirs(save_dir, exist_ok=True)
    run = wandb.init(project=opts.project, name=opts.name, entity=opts.entity, dir=save_dir, id=run_id,
                     resume="allow", config=json.loads(json.dumps(config, default=str)))
    run.define_metric("step")
    run.define_metric("*", step_metric="step")  # x axis = our step, so a resumed run may repeat one
    return run


def progress_bar(total: int, desc: str, *, initial: int = 0, leave: bool = True, unit: str = "it"):
    """A tqdm bar on the logging rank, or None: on other ranks, and unless stderr is a terminal
    or ``MEGATRON_RL_PROGRESS=1`` (``MEGATRON_RL_PROGRESS=0`` always hides it)."""
    import torch

    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    env = os.environ.get("MEGATRON_RL_PROGRESS", "").strip()
    if env == "0" or (env != "1" and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=leave, unit=unit, dynamic_ncols=True)


def format_step_line(step: int, num_steps: int, metrics: dict, *, eta_s: float | None = None) -> str:
    """The console line of one RL step, from its metrics (fields absent from ``metrics`` are left out).

    ``step s/N | reward r | pass@1 p | len L | trunc t | mismatch m | kl k | T s/step | eta H:MM:SS``
    from rollout/{reward_mean, pass@1, response_len_mean (tokens), truncation_rate},
    mismatch/logprob_abs_diff (mean |engine - trainer| logprob, nats), train/kl (KL on),
    perf/step_time_s and ``eta_s`` (seconds, e.g. mean step time x steps left).
    """
    parts = [f"step {step}/{num_steps}"]
    for key, label, fmt in (("rollout/reward_mean", "reward", ".3f"), ("rollout/pass@1", "pass@1", ".3f"),
                            ("rollout/response_len_mean", "len", ".1f"), ("rollout/truncation_rate", "trunc", ".2f"),
                            ("mismatch/logprob_abs_diff", "mismatch", ".2e"), ("train/kl", "kl", ".2e"),
                            ("perf/step_time_s", None, ".1f")):
        v = metrics.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(f"{v:{fmt}} s/step" if label is None else f"{label} {v:{fmt}}")
    if eta_s is not None and math.isfinite(eta_s):
        s = int(round(max(eta_s, 0.0)))
        parts.append(f"eta {s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}")
    return " | ".join(parts)


def console(line: str) -> None:
    """Print ``line`` to stdout without breaking an active progress bar (``tqdm.write``)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()
