"""Print the before/after evaluation table of a run (markdown):

    python -m megatron_rl.train.report RUN/sft/metrics.jsonl
    python -m megatron_rl.train.report RUN/grpo/metrics.jsonl

Several files may be given; they are read in order as one run: "before" is the first record that logged ``eval/*``
keys, "after" the last. SFT runs log ``eval/<split>/accuracy`` (greedy exact match); RL runs
(``megatron_rl.train.grpo``, step 0 = before the first RL step) log ``eval/<split>/pass@<k>``, and
then the table has a before/after column pair per k."""

from __future__ import annotations

import json
import re
import sys

_PASS = re.compile(r"^eval/([^/]+)/pass@(\d+)$")


def _eval_records(paths) -> list[dict]:
    evals = []
    for path in paths:
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if any(k.startswith("eval/") for k in rec):
                    evals.append(rec)
    if not evals:
        raise ValueError(f"{', '.join(map(str, paths))}: no eval/* records")
    return evals


def eval_table(*paths: str) -> str:
    """Markdown table of the first vs last evaluation in ``paths`` (read in order).

    accuracy keys -> one accuracy column pair; pass@k keys -> a column pair per k. Raises
    ValueError (naming the files) when they logged no evaluation."""
    evals = _eval_records(paths)
    first, last = evals[0], evals[-1]
    if any(_PASS.match(k) for k in last):
        return pass_at_k_table(first, last)
    splits = sorted({k.split("/")[1] for k in last if k.startswith("eval/")})
    lines = [f"| split | accuracy @ step {first['step']} | accuracy @ step {last['step']} | n |",
             "|---|---|---|---|"]
    for s in splits:
        a0, a1 = first.get(f"eval/{s}/accuracy"), last.get(f"eval/{s}/accuracy")
        lines.append(f"| {s} | {_pct(a0)} | {_pct(a1)} | {last.get(f'eval/{s}/n')} |")
    return "\n".join(lines)


def pass_at_k_table(first: dict, last: dict) -> str:
    """One row per split; for each k (ascending) pass@k at ``first``'s and ``last``'s step."""
    found = [m.groups() for m in map(_PASS.match, list(first) + list(last)) if m]
    splits = sorted({s for s, _ in found})
    ks = sorted({int(k) for _, k in found})
    a, b = first["step"], last["step"]
    head = "| split | " + " | ".join(f"pass@{k} @ step {a} | pass@{k} @ step {b}" for k in ks) + " |"
    lines = [head, "|---|" + "---|---|" * len(ks)]
    for s in splits:
        cells = [f"{_pct(first.get(f'eval/{s}/pass@{k}'))} | {_pct(last.get(f'eval/{s}/pass@{k}'))}"
                 for k in ks]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m megatron_rl.train.report METRICS.jsonl [MORE.jsonl ...]")
    print(eval_table(*sys.argv[1:]))
