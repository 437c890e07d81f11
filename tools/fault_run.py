"""A long GRPO run with an engine SIGKILLed every K steps, compared with the same run undisturbed.

    python tools/fault_run.py --out runs/fault_run [--hf DIR] [--steps 40] [--kill-every 10]

Both runs: the GRPO entry point (world 1, fp32, 2 embedded engines + sglang-router), synthetic
prompts, the parity reward of tests/_grpo_runs.py. In the faulty run the verifier SIGKILLs
one engine (alternating over the sorted engine pids) at the first scoring call of step K*k (after that step's rollout, before its
weight sync: the moment that ended runs before issue 14), so the launcher must restart it and
sync it before it serves again. Checks: every step has one metrics row and exactly P * n scored
samples (nothing lost or scored twice), ``rollout/engine_restarts`` reaches steps / K, and both
engines end at the final version. Then every metric of every step is compared between the two
runs; ``<out>/summary.json`` holds the counts and the per-metric max |diff|.
Without --hf a tiny model is made (tools/make_tiny_model.py, seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

if __package__ in (None, "") and str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

P, N = 2, 4  # prompts per step, samples per prompt


def _engine_pids() -> list[int]:
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            cmd = open(f"/proc/{d}/cmdline", "rb").read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"megatron_rl.rollout.engine" in cmd:
            out.append(int(d))
    return sorted(out)


def _run(rank: int, world: int, argv: list[str], kill_every: int, log_path: str) -> dict:
    """One GRPO run; the verifier counts its calls (one line per step in log_path) and kills."""
    from megatron_rl.train.grpo import main

    calls = {"n": 0}

    def verifier(response: str, label: str) -> float:
        i = calls["n"]
        calls["n"] += 1
        step = i // (P * N) + 1
        if kill_every and i % (P * N) == 0 and step % kill_every == 0:
            pids = _engine_pids()
            victim = pids[(step // kill_every - 1) % len(pids)]
            with open(log_path, "a") as f:
                f.write(json.dumps({"kill_at_step": step, "pid": victim}) + "\n")
            os.kill(victim, signal.SIGKILL)
        return float(len(response) % 2 == 0)

    res = main(argv, verifier=verifier)
    return {**res, "verifier_calls": calls["n"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--hf", default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--kill-every", type=int, default=10)
    a = ap.parse_args(argv)
    from megatron_rl.data.jsonl import write_jsonl_atomic
    from megatron_rl.data.synthetic import generate
    from megatron_rl.testing import run_distributed

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    hf = a.hf
    if hf is None:
        import importlib.util

        spec = importlib.util.spec_from_file_location("mtm", Path(__file__).parent / "make_tiny_model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        hf = str(out / "tiny")
        if not (out / "tiny" / "config.json").exists():
            mod.make_tiny_model(hf, seed=0)
    data = out / "train.jsonl"
    write_jsonl_atomic(data, generate("id", 64, seed=21))
    summary = {}
    for name, kill in (("clean", 0), ("faulty", a.kill_every)):
        run = out / name
        argv = ["--hf", hf, "--train-data", str(data), "--out", str(run), "--num-engines", "2",
                "--rollout-batch-size", str(P), "--n-samples-per-prompt", str(N), "--max-new-tokens", "16",
                "--num-steps", str(a.steps), "--mini-batches-per-rollout", "1", "--micro-batch-size", "4",
                "--lr", "1e-3", "--lr-warmup-steps", "0", "--seed", "5", "--no-resume"]
        (res,) = run_distributed(_run, 1, argv, kill, str(out / f"{name}_kills.jsonl"))
        rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
        summary[name] = {"result": res, "rows": rows}
    clean, faulty = summary["clean"], summary["faulty"]
    steps = [r["step"] for r in faulty["rows"]]
    kills = [json.loads(line) for line in open(out / "faulty_kills.jsonl")] if (out / "faulty_kills.jsonl").exists() else []
    checks = {
        "every_step_one_row": steps == list(range(1, a.steps + 1)),
        "samples_scored": faulty["result"]["verifier_calls"], "samples_expected": a.steps * P * N,
        "kills": len(kills), "engine_restarts_final": faulty["rows"][-1].get("rollout/engine_restarts"),
        "engine_versions": faulty["result"]["engine_versions"],
    }
    diffs = {}
    for rc, rf in zip(clean["rows"], faulty["rows"]):
        for k, v in rc.items():
            if isinstance(v, (int, float)) and isinstance(rf.get(k), (int, float)) and not k.startswith("perf/"):
                diffs[k] = max(diffs.get(k, 0.0), abs(float(v) - float(rf[k])))
    report = {"checks": checks, "max_abs_diff": dict(sorted(diffs.items())),
              "differing": sorted(k for k, d in diffs.items() if d > 0)}
    (out / "summary.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
