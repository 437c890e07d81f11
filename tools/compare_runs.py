"""Before/after eval table over several RL runs (seeds, or configurations), from their metrics.jsonl.

    python tools/compare_runs.py runs/grpo_seed1/grpo runs/grpo_seed2/grpo runs/grpo_seed3/grpo
    python tools/compare_runs.py --per-run --key moe/max_violation runs/lbl_{off,micro,global}/grpo

For every ``eval/<split>/pass@<k>`` key: the value at the first evaluated step ("before") and at
the last evaluated step ("after") of each run, then the mean over runs and the seed-to-seed spread
(max - min) of the after-minus-before change. ``--key`` (with ``--per-run``) adds per-step training
metrics, averaged over each run's last ``--last`` logged steps. Markdown on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys


def load(run: str) -> dict[int, dict]:
    """step -> record of ``run``/metrics.jsonl (``run`` may also be the file itself).

    Raises FileNotFoundError naming the path; ValueError naming path:line for a bad line."""
    path = run if run.endswith(".jsonl") else os.path.join(run, "metrics.jsonl")
    out = {}
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e})") from None
            out[int(rec["step"])] = rec
    return out


def _eval_keys(recs: dict[int, dict]) -> list[str]:
    keys = {k for r in recs.values() for k in r if k.startswith("eval/")}

    def order(k):
        m = re.match(r"eval/(.+)/pass@(\d+)$", k)
        return (m.group(1), int(m.group(2))) if m else (k, 0)

    return sorted(keys, key=order)


def before_after(recs: dict[int, dict], key: str) -> tuple[int, float, int, float] | None:
    steps = sorted(s for s, r in recs.items() if key in r)
    if not steps:
        return None
    return steps[0], recs[steps[0]][key], steps[-1], recs[steps[-1]][key]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run dirs (holding metrics.jsonl) or metrics.jsonl files")
    p.add_argument("--per-run", action="store_true", help="one column per run instead of mean/spread")
    p.add_argument("--key", dest="keys", action="append", default=[],
                   help="a training metric to average over each run's last --last steps (repeatable)")
    p.add_argument("--last", type=int, default=10)
    a = p.parse_args(argv)
    if a.keys and not a.per_run:
        p.error("--key is shown per run only: add --per-run")
    runs = {r: load(r) for r in a.runs}
    keys = _eval_keys(next(iter(runs.values())))
    if not keys:
        sys.exit(f"{a.runs[0]}: no eval/ metrics")
    names = [os.path.basename(os.path.dirname(r.rstrip("/"))) if r.rstrip("/").endswith("grpo") else r
             for r in a.runs]
    if a.per_run:
        print("| metric | " + " | ".join(f"{n} before -> after" for n in names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for k in keys:
            cells = []
            for recs in runs.values():
                ba = before_after(recs, k)
                cells.append("-" if ba is None else f"{100 * ba[1]:.1f}% -> {100 * ba[3]:.1f}% (step {ba[2]})")
            print(f"| {k} | " + " | ".join(cells) + " |")
        for k in a.keys:
            cells = []
            for recs in runs.values():
                vals = [recs[s][k] for s in sorted(recs) if k in recs[s]][-a.last:]
                cells.append("-" if not vals else f"{sum(vals) / len(vals):.3f}")
            print(f"| {k} (mean of last {a.last} steps) | " + " | ".join(cells) + " |")
        return
    print(f"| metric | before (mean of {len(runs)}) | after (mean) | change per run | change mean | spread (max-min) |")
    print("|---|---|---|---|---|---|")
    for k in keys:
        rows = [before_after(recs, k) for recs in runs.values()]
        if any(r is None for r in rows):
            continue
        before = [r[1] for r in rows]
        after = [r[3] for r in rows]
        delta = [y - x for x, y in zip(before, after)]
        print(f"| {k} (step {rows[0][0]} -> {rows[0][2]}) | {100 * sum(before) / len(before):.1f}% | "
              f"{100 * sum(after) / len(after):.1f}% | " + ", ".join(f"{100 * d:+.1f}" for d in delta)
              + f" | {100 * sum(delta) / len(delta):+.1f} | {100 * (max(delta) - min(delta)):.1f} |")


if __name__ == "__main__":
    main()
