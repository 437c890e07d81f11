"""Greedy samples of an HF checkpoint on a synthetic-task split: accuracy and how many steps it writes.

    python tools/sample_policy.py --hf runs/grpo_demo/sft_hf \
        --data runs/grpo_demo/data/eval_ood_mid.jsonl --n 32 [--show 3]

Why: pass@1 says whether a policy solves the band above its SFT data, not why it fails. On the
synthetic task (``megatron_rl.data.synthetic``) a row with ``op`` operations needs ``op`` derivation
lines ("<Name> has a + b = c <item>."); a policy that writes fewer lines is taking a shortcut or
stopping early, and RL cannot reinforce a chain length it never samples. This prints, per ``op``,
the greedy exact-match rate (``synthetic.verify``) and the histogram of derivation lines written.

Generation: the SFT evaluation's ``train.evaluate.hf_greedy`` (HF transformers
``generate(do_sample=False)``, float32 on CPU, left-padded batches) on ``chat.build_prompt_ids``
(the prompts the RL loop and its evals use), stopping at the end-of-turn token. Markdown on stdout.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def count_steps(response: str) -> int:
    """Derivation lines of a synthetic-task response: lines containing both " has " and "="."""
    return sum(1 for line in response.splitlines() if " has " in line and "=" in line)


def sample(hf_dir: str, rows: list[dict], max_new_tokens: int = 96) -> list[str]:
    """Greedy responses (decoded, special tokens skipped) of the checkpoint ``hf_dir`` to ``rows``,
    through the SFT evaluation's generator (``train.evaluate.hf_greedy``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rl.data.chat import build_prompt_ids
    from megatron_rl.train.evaluate import hf_greedy

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    responses, _ = hf_greedy(model, tok, [build_prompt_ids(tok, r) for r in rows], max_new_tokens)
    return tok.batch_decode(responses, skip_special_tokens=True)


def summarize(rows: list[dict], responses: list[str]) -> str:
    """Markdown table: per op, n, greedy exact match and the histogram of derivation lines."""
    from megatron_rl.data.synthetic import verify

    by_op: dict[object, list[tuple[float, int]]] = collections.defaultdict(list)
    for row, resp in zip(rows, responses, strict=True):
        by_op[row.get("op", "?")].append((verify(resp, str(row["label"])), count_steps(resp)))
    lines = ["| op | n | greedy exact match | derivation lines written (count x times) |",
             "|---|---|---|---|"]
    for op in sorted(by_op, key=str):
        res = by_op[op]
        hist = collections.Counter(s for _, s in res)
        acc = sum(r for r, _ in res) / len(res)
        lines.append(f"| {op} | {len(res)} | {100 * acc:.1f}% | "
                     + ", ".join(f"{s} x{c}" for s, c in sorted(hist.items())) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", required=True, help="HF checkpoint directory (e.g. an SFT or GRPO export)")
    p.add_argument("--data", required=True, help="jsonl with prompt, label (and op) per row")
    p.add_argument("--n", type=int, default=32, help="first N rows (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--show", type=int, default=0, help="also print the first K responses")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error(f"--n must be >= 1, got {a.n}")
    if not (Path(a.hf) / "config.json").is_file():
        p.error(f"--hf {a.hf}: no config.json there")
    from megatron_rl.data.loader import load_rows

    rows = [r for _, r in load_rows(a.data)][: a.n]
    responses = sample(a.hf, rows, a.max_new_tokens)
    table = summarize(rows, responses)
    print(f"{a.hf} on {a.data} (first {len(rows)} rows, greedy, {a.max_new_tokens} new tokens)\n")
    print(table)
    for row, resp in list(zip(rows, responses))[: a.show]:
        print(f"\n--- op {row.get('op')} label {row['label']}\n{resp}")
    return table


if __name__ == "__main__":
    main()
