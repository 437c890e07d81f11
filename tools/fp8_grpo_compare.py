"""Short GRPO runs with FP8 rollouts, TIS vs no correction (tiny model, CPU, one engine).

    python tools/fp8_grpo_compare.py --hf DIR --out RUNS_DIR [--steps 30 --seeds 1 2]

Per seed and setting (``--rollout-fp8 block128`` with ``--tis-cap 2`` / without) one run of
``megatron_rl.train.grpo`` (fp32 trainer, fp32 embedded engine serving the FP8 weights) on the
synthetic task's prompts, scored by a dense reward the untrained tiny model can climb (share of
digit characters in the response: exact match is ~never reached without SFT). Writes
``RUNS_DIR/<setting>_s<seed>/metrics.jsonl`` and prints a table (reward mean over the first and
last 5 steps, mean mismatch/logprob_abs_diff, mismatch/tis_clip_frac, final eval reward).

    python tools/fp8_grpo_compare.py --demo-run runs/grpo_demo --out RUNS_DIR [--steps 30 --seeds 1 2]

``--demo-run``: start from the SFT export of ``examples/grpo_moe.sh`` (``<run>/sft_hf``) with its
data (``<run>/data``: rl_train.jsonl, eval_{id,ood_mid,ood_hard}.jsonl), its GRPO hyper-parameters
and the real exact-match verifier (``synthetic_verifier``); evals before (step 0) and after. Add
``--settings fp32 fp8_none fp8_tis`` for the unquantised rollout as a reference.
Left out: bf16 engines and a bf16 trainer (the CPU bf16 kernels are slow): the trainer and the engine
compute in fp32, so the rollout/trainer gap is the FP8 weight quantisation alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, "") and str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def digit_reward(response: str, label: str) -> float:
    """Share of non-space characters that are digits (0 for an empty response)."""
    chars = [c for c in response if not c.isspace()]
    return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0


def _run(rank: int, world: int, argv: list[str], verifier) -> dict:
    from megatron_rl.train.grpo import main

    return main(argv) if verifier is None else main(argv, verifier=verifier)


def summarize(path: str) -> dict:
    recs = [json.loads(line) for line in open(path)]
    steps = [r for r in recs if r.get("step", 0) > 0 and "rollout/reward_mean" in r]
    first, last = steps[:5], steps[-5:]

    def mean(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else float("nan")
    evals = [r for r in recs if any(k.startswith("eval/") for k in r)]
    final = {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval/")}
    before = {k: v for k, v in (evals[0] if len(evals) > 1 else {}).items() if k.startswith("eval/")}
    return {"steps": len(steps), "reward_first5": mean(first, "rollout/reward_mean"),
            "reward_last5": mean(last, "rollout/reward_mean"),
            "mismatch": mean(steps, "mismatch/logprob_abs_diff"),
            "tis_clip_frac": mean(steps, "mismatch/tis_clip_frac"), "before_eval": before, "final_eval": final}


def main(argv=None) -> dict:
    from megatron_rl.data.jsonl import write_jsonl_atomic
    from megatron_rl.data.synthetic import generate
    from megatron_rl.testing import run_distributed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", default=None, help="HF dir (digit-share reward on the untrained model)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--demo-run", default=None,
                   help="run dir of examples/grpo_moe.sh: start from its sft_hf with its data and verifier")
    p.add_argument("--settings", nargs="+", default=["fp8_none", "fp8_tis"],
                   choices=["fp32", "fp8_none", "fp8_tis"])
    args = p.parse_args(argv)
    if args.hf is None and args.demo_run is None:
        p.error("give --hf or --demo-run")
    os.makedirs(args.out, exist_ok=True)
    settings = {"fp32": [], "fp8_none": ["--rollout-fp8", "block128"],
                "fp8_tis": ["--rollout-fp8", "block128", "--tis-cap", "2.0"]}
    if args.demo_run:  # the demo's GRPO stage (examples/grpo_moe.sh), one engine
        data = os.path.join(args.demo_run, "data")
        common = ["--hf", os.path.join(args.demo_run, "sft_hf"), "--train-data", os.path.join(data, "rl_train.jsonl"),
                  *[a for split in ("id", "ood_mid", "ood_hard")
                    for a in ("--eval-data", f"{split}={os.path.join(data, f'eval_{split}.jsonl')}")],
                  "--rollout-batch-size", "8", "--n-samples-per-prompt", "8", "--max-new-tokens", "96",
                  "--temperature", "1.0", "--lr", "1e-4", "--micro-batch-size", "8", "--eval-n-samples", "4",
                  "--eval-max-prompts", "64"]
        verifier = None
    else:
        train, evals = os.path.join(args.out, "train.jsonl"), os.path.join(args.out, "eval.jsonl")
        write_jsonl_atomic(train, generate("id", 64, seed=21))
        write_jsonl_atomic(evals, generate("id", 8, seed=22))
        common = ["--hf", args.hf, "--train-data", train, "--eval-data", f"id={evals}", "--rollout-batch-size", "4",
                  "--n-samples-per-prompt", "4", "--max-new-tokens", "16", "--lr", "1e-3", "--eval-n-samples", "2",
                  "--eval-max-prompts", "8"]
        verifier = digit_reward
    table = {}
    for seed in args.seeds:
        for name in args.settings:
            out = os.path.join(args.out, f"{name}_s{seed}")
            argv_run = [*common, "--out", out, "--num-engines", "1", "--num-steps", str(args.steps),
                        "--lr-warmup-steps", "0", "--lr-decay-style", "constant", "--eval-interval",
                        str(args.steps), "--seed", str(seed), *settings[name]]
            if not os.path.isfile(os.path.join(out, "metrics.jsonl")) or summarize(
                    os.path.join(out, "metrics.jsonl"))["steps"] < args.steps:
                run_distributed(_run, 1, argv_run, verifier)
            table[f"{name}_s{seed}"] = summarize(os.path.join(out, "metrics.jsonl"))
            print(f"{name}_s{seed}", json.dumps(table[f"{name}_s{seed}"]), flush=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(table, f, indent=2)
    return table


if __name__ == "__main__":
    main()
