"""Print the before/after evaluation table of a run: ``python -m megatron_rl.train.report
RUN/metrics.jsonl`` (markdown; first and last step that logged ``eval/*`` keys)."""

from __future__ import annotations

import json
import sys


def eval_table(path: str) -> str:
    """Markdown table: one row per eval split, columns = accuracy at the first / last eval.

    Raises ValueError (naming the file) when the run logged no evaluation."""
    evals = []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if any(k.startswith("eval/") for k in rec):
                evals.append(rec)
    if not evals:
        raise ValueError(f"{path}: no eval/* records")
    first, last = evals[0], evals[-1]
    splits = sorted({k.split("/")[1] for k in last if k.startswith("eval/")})
    lines = [f"| split | accuracy @ step {first['step']} | accuracy @ step {last['step']} | n |",
             "|---|---|---|---|"]
    for s in splits:
        a0, a1 = first.get(f"eval/{s}/accuracy"), last.get(f"eval/{s}/accuracy")
        lines.append(f"| {s} | {_pct(a0)} | {_pct(a1)} | {last.get(f'eval/{s}/n')} |")
    return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


if __name__ == "__main__":
    print(eval_table(sys.argv[1]))
