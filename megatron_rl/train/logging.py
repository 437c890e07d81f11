"""Run-directory metrics: one JSON object per step in ``metrics.jsonl`` + TensorBoard scalars.

Only the logging rank (global rank 0) writes. Keys are grouped like ``train/loss``,
``perf/tokens_per_s``, ``eval/id/accuracy``. Lines are flushed as they are written, so a killed
run keeps every completed step; on resume, lines for steps after the checkpoint are dropped
first so the file never holds two records for one step.
"""

from __future__ import annotations

import json
import math
import os


class MetricsLogger:
    """Append-only metrics writer (jsonl + TensorBoard) for the logging rank.

    Args:
        run_dir: the run directory (created if absent).
        enabled: False on non-logging ranks (every call becomes a no-op).
        resume_step: drop existing records with ``step > resume_step`` (None: keep all).
    """

    def __init__(self, run_dir: str, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
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

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            self._tb.close()
