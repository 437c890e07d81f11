"""Synthetic verifiable reasoning task after GSM-Infinite, small enough for a ~2M-parameter model.

Source: GSM-Infinite (Zhou et al., arXiv 2502.05252) as used to control reasoning depth in
"On the Interplay of Pre-Training, Mid-Training, and RL on Reasoning Language Models"
(arXiv 2512.07783): a problem is a dependency graph of named quantities and its difficulty is
the number of operations `op` needed to reach the asked quantity.

One problem (op = 3):
    prompt:   "Ann has 3 apples. Bob has 4 more apples than Ann. Cal has twice as many apples
               as Bob. Dan has as many apples as Cal and Ann together. How many apples does
               Dan have?"
    solution: "Bob has 3 + 4 = 7 apples.\nCal has 7 * 2 = 14 apples.\n
               Dan has 14 + 3 = 17 apples.\nThe answer is \\boxed{17}."
    label:    "17"

Graph: one leaf (1..9), then `op` derived quantities; each derives from the one defined just
before it (so every op is needed) with +k, -k (k in 1..9), x2 / x3, or + an earlier quantity.
Every value stays in 0..max_value (default MAX_VALUE = 99): no negatives, at most two digits.

Determinism: problem (seed, op, index) comes from `random.Random(f"gsm-synth:{seed}:{op}:{index}")`
(string seeding is stable across processes and PYTHONHASHSEED).

Left out on purpose: GSM-Infinite's distractor quantities, shuffled statement order and
multi-entity hierarchies -- they cost tokens a tiny model cannot afford.

Reward: `verify(response, label)` -> 1.0 / 0.0 on the extracted final answer (last \\boxed{...},
else "The answer is N", else the last number), after normalisation.

CLI: python -m megatron_rl.data.synthetic --out DIR --seed N [--n-train N] [--n-eval N]
[--rl-train-ops 4-5] [--edge-ops 4-5 --edge-frac 0.05] [--tool-frac 0.3]
writes train.jsonl (id band, plus an optional sparse share of the edge band, and optionally a
share of rows as calculator tool-use conversations) and
eval_{id,ood_mid,ood_hard}.jsonl with seeds disjoint from train and no eval prompt equal to a train
prompt, and optionally rl_train.jsonl.
"""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Collection
from decimal import Decimal, InvalidOperation
from pathlib import Path

NAMES = ("Ann", "Bob", "Cal", "Dan", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon")
ITEMS = ("apples", "pens", "cards", "coins", "books")
MAX_VALUE = 99
MAX_OP = len(NAMES) - 1
SPLITS: dict[str, tuple[int, int]] = {"id": (1, 3), "ood_mid": (4, 5), "ood_hard": (6, 8)}
EVAL_SEED_STRIDE = 10**9  # eval split k uses seed + k * stride; train seeds must be below it


def _derive(rng: random.Random, values: list[int], names: list[str], item: str,
            max_value: int) -> tuple[int, str, str]:
    """One derived quantity from values[-1]. Returns (value, statement, solution line) minus the name."""
    pv, parent = values[-1], names[len(values) - 1]
    kinds = []
    if pv < max_value:
        kinds.append("add")
    if pv >= 1:
        kinds.append("sub")
    if 2 * pv <= max_value:
        kinds.append("mul")
    others = [i for i in range(len(values) - 1) if pv + values[i] <= max_value]
    if others:
        kinds.append("sum")
    kind = rng.choice(kinds)
    if kind == "add":
        k = rng.randint(1, min(9, max_value - pv))
        return pv + k, f"has {k} more {item} than {parent}.", f"has {pv} + {k} = {pv + k} {item}."
    if kind == "sub":
        k = rng.randint(1, min(9, pv))
        return pv - k, f"has {k} fewer {item} than {parent}.", f"has {pv} - {k} = {pv - k} {item}."
    if kind == "mul":
        k = rng.choice([m for m in (2, 3) if m * pv <= max_value])
        times = "twice" if k == 2 else "three times"
        return pv * k, f"has {times} as many {item} as {parent}.", f"has {pv} * {k} = {pv * k} {item}."
    i = rng.choice(others)
    ov = values[i]
    return (pv + ov, f"has as many {item} as {parent} and {names[i]} together.",
            f"has {pv} + {ov} = {pv + ov} {item}.")


def make_problem(seed: int, op: int, index: int, *, max_value: int = MAX_VALUE) -> dict:
    """Problem number `index` with `op` operations for `seed`; a pure function of its arguments.

    Every intermediate value lies in 0..max_value (lower it to make the arithmetic easier).
    Returns {"prompt": str, "label": str, "solution": str, "op": int}.
    Raises ValueError if op is not in 1..MAX_OP (one name per quantity) or max_value < 9.
    """
    if not 1 <= op <= MAX_OP:
        raise ValueError(f"op must be in 1..{MAX_OP}, got {op}")
    if max_value < 9:
        raise ValueError(f"max_value must be >= 9 (leaves are 1..9), got {max_value}")
    rng = random.Random(f"gsm-synth:{seed}:{op}:{index}")
    names = rng.sample(NAMES, op + 1)
    item = rng.choice(ITEMS)
    values = [rng.randint(1, 9)]
    statements = [f"{names[0]} has {values[0]} {item}."]
    steps = []
    for _ in range(op):
        value, statement, step = _derive(rng, values, names, item, max_value)
        name = names[len(values)]
        values.append(value)
        statements.append(f"{name} {statement}")
        steps.append(f"{name} {step}")
    statements.append(f"How many {item} does {names[op]} have?")
    steps.append(f"The answer is \\boxed{{{values[-1]}}}.")
    return {"prompt": " ".join(statements), "label": str(values[-1]),
            "solution": "\n".join(steps), "op": op}


def op_range(split_or_op_range: str | tuple[int, int]) -> tuple[int, int]:
    """Resolve a split name (SPLITS) or an inclusive (lo, hi) op range. Raises ValueError."""
    if isinstance(split_or_op_range, str):
        if split_or_op_range not in SPLITS:
            raise ValueError(f"unknown split {split_or_op_range!r}; known: {sorted(SPLITS)}")
        return SPLITS[split_or_op_range]
    lo, hi = split_or_op_range
    if not 1 <= lo <= hi <= MAX_OP:
        raise ValueError(f"op range must satisfy 1 <= lo <= hi <= {MAX_OP}, got {(lo, hi)}")
    return lo, hi


def generate(split_or_op_range: str | tuple[int, int], n: int, seed: int, *,
             exclude: Collection[str] = (), unique: bool = False,
             max_value: int = MAX_VALUE) -> list[dict]:
    """n problems with ops cycling through the (inclusive) op range, deterministic in seed.

    Row r has op = lo + r % (hi - lo + 1). With `exclude` (prompts to avoid) or `unique`, a rejected
    candidate is replaced by the next index for that op, so the output stays deterministic.
    Raises ValueError on a bad range, or when 100 * n + 1000 candidates were rejected.
    """
    lo, hi = op_range(split_or_op_range)
    ops = list(range(lo, hi + 1))
    next_index = dict.fromkeys(ops, 0)
    seen: set[str] = set()
    rows, rejected = [], 0
    while len(rows) < n:
        op = ops[len(rows) % len(ops)]
        row = make_problem(seed, op, next_index[op], max_value=max_value)
        next_index[op] += 1
        if row["prompt"] in exclude or (unique and row["prompt"] in seen):
            rejected += 1
            if rejected > 100 * n + 1000:
                raise ValueError(f"cannot draw {n} new problems for ops {lo}..{hi}; space exhausted")
            continue
        seen.add(row["prompt"])
        rows.append(row)
    return rows


_STEP = re.compile(r"^\w+ has (.+) = (\d+) \w+\.$")


def with_tool_trace(row: dict) -> dict:
    """The row as a calculator tool-use conversation (``rollout.tools_calc`` format) for SFT:
    user: prompt; per solution step, assistant: one calc call of the step's expression and tool:
    its value; then assistant: "The answer is \\boxed{label}.". Keeps label and op; the row
    becomes a ``messages`` row (no ``prompt`` / ``solution``). Raises ValueError for a row whose
    solution lines are not ``make_problem``'s."""
    from megatron_rl.rollout.tools_calc import tool_call_text

    messages = [{"role": "user", "content": row["prompt"]}]
    for line in row["solution"].split("\n")[:-1]:
        m = _STEP.match(line)
        if m is None:
            raise ValueError(f"not a make_problem solution step: {line!r}")
        messages += [{"role": "assistant", "content": tool_call_text(m.group(1))},
                     {"role": "tool", "content": m.group(2)}]
    messages.append({"role": "assistant", "content": f"The answer is \\boxed{{{row['label']}}}."})
    return {"messages": messages, "label": row["label"], "op": row["op"]}


def row_prompt(row: dict) -> str:
    """The user prompt of a ``prompt`` or tool-trace ``messages`` row."""
    return row["prompt"] if "prompt" in row else row["messages"][0]["content"]


def write_splits(out_dir: str | Path, seed: int, n_train: int, n_eval: int,
                 splits: dict[str, tuple[int, int]] | None = None,
                 max_value: int = MAX_VALUE, *, edge_ops: tuple[int, int] | None = None,
                 edge_frac: float = 0.0, tool_frac: float = 0.0) -> dict[str, Path]:
    """Write train.jsonl (the "id" band) and eval_<split>.jsonl for every split; return the paths.

    Eval split k (1-based, in `splits` order) uses seed + k * EVAL_SEED_STRIDE, is de-duplicated and
    excludes every train prompt.

    Edge exposure (optional): with `edge_ops` and 0 < `edge_frac` < 1, round(edge_frac * n_train)
    of the n_train rows are drawn from the op range `edge_ops` (seed + 5 * EVAL_SEED_STRIDE) instead
    of the id band, and the rows are shuffled together (random.Random(f"gsm-synth-mix:{seed}")).
    This is the sparse pre-/mid-training exposure to the band above the model's competence that
    "On the Interplay of Pre-Training, Mid-Training, and RL" (arXiv 2512.07783, Sec. 4) finds RL
    needs before it can raise pass@1 there; the eval splits still exclude every train prompt.

    Tool-use traces (optional): round(tool_frac * n_train) train rows, chosen with
    random.Random(f"gsm-synth-tool:{seed}"), become calculator conversations (``with_tool_trace``).

    Raises ValueError if seed is outside [0, EVAL_SEED_STRIDE), if edge_frac or tool_frac is
    outside [0, 1) or edge_frac is set without edge_ops, or if an eval prompt still appears in
    train (a bug guard).
    """
    from megatron_rl.data.jsonl import write_jsonl_atomic

    if not 0 <= seed < EVAL_SEED_STRIDE:
        raise ValueError(f"seed must be in [0, {EVAL_SEED_STRIDE}), got {seed}")
    if not 0.0 <= edge_frac < 1.0:
        raise ValueError(f"edge_frac must be in [0, 1), got {edge_frac}")
    if edge_frac > 0 and edge_ops is None:
        raise ValueError("edge_frac > 0 needs edge_ops (the op range of the exposure rows)")
    splits = dict(SPLITS if splits is None else splits)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_edge = round(edge_frac * n_train) if edge_ops is not None else 0
    train = generate(splits["id"], n_train - n_edge, seed, max_value=max_value)
    if n_edge:
        train += generate(edge_ops, n_edge, seed + 5 * EVAL_SEED_STRIDE, max_value=max_value)
        random.Random(f"gsm-synth-mix:{seed}").shuffle(train)
    if not 0.0 <= tool_frac < 1.0:
        raise ValueError(f"tool_frac must be in [0, 1), got {tool_frac}")
    for i in random.Random(f"gsm-synth-tool:{seed}").sample(range(len(train)), round(tool_frac * len(train))):
        train[i] = with_tool_trace(train[i])
    train_prompts = {row_prompt(r) for r in train}
    paths = {"train": out / "train.jsonl"}
    write_jsonl_atomic(paths["train"], train)
    for k, (name, rng) in enumerate(splits.items(), start=1):
        rows = generate(rng, n_eval, seed + k * EVAL_SEED_STRIDE, exclude=train_prompts, unique=True,
                        max_value=max_value)
        leaked = [r["prompt"] for r in rows if r["prompt"] in train_prompts]
        if leaked:
            raise ValueError(f"eval split {name} leaks {len(leaked)} train prompts, e.g. {leaked[0]!r}")
        paths[name] = out / f"eval_{name}.jsonl"
        write_jsonl_atomic(paths[name], rows)
    return paths


# ---------------------------------------------------------------- verifier
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*\$?\s*([-+]?\s*\d+(?:,\d{3})*(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"(?:(?<![\w)\]}])-)?(?<![\d.])\d+(?:,\d{3})*(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _last_boxed(text: str) -> str | None:
    """Content of the last balanced `\\boxed{...}` (nested braces allowed); None if there is none."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j]
        start = text.rfind("\\boxed", 0, start)  # unbalanced or bare: try the previous one
    return None


def extract_answer(response: str) -> str | None:
    """Final answer of a response: last \\boxed{...}, else last "The answer is N", else last number."""
    boxed = _last_boxed(response)
    if boxed is not None:
        return boxed
    found = _ANSWER_IS.findall(response)
    if found:
        return found[-1]
    found = _NUMBER.findall(response)
    return found[-1] if found else None


def normalize_answer(answer: str) -> str:
    """Drop whitespace, `$`, digit-group commas, trailing ".", a leading "+"; "-0" -> "0"; 7.0 -> 7."""
    s = re.sub(r"\s+", "", answer).replace("$", "")
    s = re.sub(r"(?<=\d),(?=\d)", "", s).rstrip(".").removeprefix("+")
    if _PLAIN_NUMBER.fullmatch(s):
        try:
            d = Decimal(s)
        except InvalidOperation:
            return s
        s = format(d.normalize() if d != d.to_integral_value() else d.to_integral_value(), "f")
        s = "0" if s in ("-0", "0") else s
    return s


def verify(response: str, label: str) -> float:
    """1.0 if the response's final answer equals the label after normalisation, else 0.0.

    Exact-match reward for `make_problem` rows (and any integer-answer task); never raises.
    """
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    return float(normalize_answer(answer) == normalize_answer(str(label)))


# ---------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-eval", type=int, default=500, help="rows per eval split")
    p.add_argument("--id-ops", default="1-3", help="op range of train and eval_id, e.g. 1-3")
    p.add_argument("--ood-mid-ops", default="4-5")
    p.add_argument("--ood-hard-ops", default="6-8")
    p.add_argument("--max-value", type=int, default=MAX_VALUE, help="cap on every intermediate value")
    p.add_argument("--rl-train-ops", default="",
                   help="also write rl_train.jsonl: RL prompts from this op range (e.g. 4-5), "
                        "excluding every eval and train prompt (default: not written)")
    p.add_argument("--n-rl-train", type=int, default=5000, help="rows of rl_train.jsonl")
    p.add_argument("--edge-ops", default="",
                   help="op range of the sparse exposure rows mixed into train.jsonl (e.g. 4-5)")
    p.add_argument("--edge-frac", type=float, default=0.0,
                   help="share of train.jsonl drawn from --edge-ops (e.g. 0.05; default 0: none)")
    p.add_argument("--tool-frac", type=float, default=0.0,
                   help="share of train.jsonl written as calculator tool-use conversations (default 0)")
    a = p.parse_args(argv)
    if not 0.0 <= a.tool_frac < 1.0:
        p.error(f"--tool-frac must be in [0, 1), got {a.tool_frac}")
    if a.edge_frac and not a.edge_ops:
        p.error("--edge-frac needs --edge-ops")
    if not 0.0 <= a.edge_frac < 1.0:
        p.error(f"--edge-frac must be in [0, 1), got {a.edge_frac}")

    def parse(s: str) -> tuple[int, int]:
        lo, _, hi = s.partition("-")
        return int(lo), int(hi or lo)

    splits = {"id": parse(a.id_ops), "ood_mid": parse(a.ood_mid_ops), "ood_hard": parse(a.ood_hard_ops)}
    edge = parse(a.edge_ops) if a.edge_ops else None
    for name, path in write_splits(a.out, a.seed, a.n_train, a.n_eval, splits, a.max_value,
                                   edge_ops=edge, edge_frac=a.edge_frac, tool_frac=a.tool_frac).items():
        print(f"{name}: {path}")
    if a.rl_train_ops:
        print(f"rl_train: {write_rl_train(a.out, a.seed, a.n_rl_train, parse(a.rl_train_ops), a.max_value)}")


def write_rl_train(out_dir: str | Path, seed: int, n: int, ops: tuple[int, int],
                   max_value: int = MAX_VALUE) -> Path:
    """Write rl_train.jsonl (RL prompts from op range ``ops``) next to the splits of
    :func:`write_splits` in ``out_dir``, excluding every prompt of train.jsonl and eval_*.jsonl
    found there. Seed: seed + 4 * EVAL_SEED_STRIDE (after the three default eval splits; the
    edge-exposure rows of train.jsonl use seed + 5 * EVAL_SEED_STRIDE)."""
    from megatron_rl.data.jsonl import load_jsonl, write_jsonl_atomic

    out = Path(out_dir)
    taken = {row_prompt(r) for f in sorted(out.glob("eval_*.jsonl")) + [out / "train.jsonl"]
             if f.is_file() for r in load_jsonl(f)}
    rows = generate(ops, n, seed + 4 * EVAL_SEED_STRIDE, exclude=taken, max_value=max_value)
    leaked = [r["prompt"] for r in rows if r["prompt"] in taken]
    if leaked:
        raise ValueError(f"rl_train leaks {len(leaked)} train/eval prompts, e.g. {leaked[0]!r}")
    write_jsonl_atomic(out / "rl_train.jsonl", rows)
    return out / "rl_train.jsonl"


if __name__ == "__main__":
    main()
