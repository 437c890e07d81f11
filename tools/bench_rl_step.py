"""Benchmark one GRPO RL step, phase by phase, against a bare Megatron forward/backward of the same tokens.

    python tools/bench_rl_step.py                     # tiny model (made in a temp dir), 2 engines
    python tools/bench_rl_step.py --hf DIR --steps 3 --warmup 1 --json out.json
    python tools/bench_rl_step.py --ab-count-forward  # + the same run with the extra counting forward

Run 1 (one spawned trainer rank, world 1): ``megatron_rl.train.grpo.main`` for warmup + steps RL
steps on synthetic prompts with embedded engines (started by grpo itself) and a parity verifier
(reward = len(response) % 2 == 0, so advantages are non-zero). Per-phase times (rollout, reward,
logprob, train, sync, step) and tokens/s are read from its metrics.jsonl; the micro-batch shapes
[B, S] of every mini-batch are recorded by wrapping ``grpo.microbatches``, and the policy model's
forward calls per RL step by a forward pre-hook.
With ``--ab-count-forward``, run 1b: the same RL run (same seeds) with ``MoERouting.count_in_old_pass``
off, i.e. the router counts of the moe/* metrics taken by ``GlobalLBL.collect_counts``' extra
no-grad forward per mini-batch (what every MoE step did before the counts were recorded during
the old-logprob forward); reported side by side: forwards per step and logprob + train time.
Run 2 (a second spawned rank, the same trainer set-up via ``train.setup``): for each measured step,
``engine.train_step`` with ``lm_forward_step`` (plain LM loss over every position) on random
tokens with exactly those micro-batch shapes, one optimizer step per mini-batch, timed.
Reports RL overhead = RL step time / bare fwd-bwd time and train-phase-only ratio = RL train
phase / bare fwd-bwd (means over the measured steps). Left out: multi-rank layouts, SGLang.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("rollout", "reward", "logprob", "train", "sync")


def parity_verifier(response: str, label: str) -> float:
    return float(len(response) % 2 == 0)


def _rl_worker(rank: int, world: int, argv: list[str], extra_count_forward: bool = False) -> dict:
    import megatron_rl.train.grpo as grpo

    shapes: list[list[list[tuple[int, int]]]] = []  # per rl_step call: per mini-batch: [(B, S)]
    forwards: list[int] = []  # per rl_step call: policy model forwards (no-grad passes included)
    calls = [0]
    orig = grpo.microbatches
    orig_routing = grpo.moe_routing

    def moe_routing(tr, cfg):
        routing = orig_routing(tr, cfg)
        routing.count_in_old_pass = not extra_count_forward
        tr.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        return routing

    # rl_step builds its k mini-batches in one list comprehension; group by step via a wrapper
    orig_rl_step = grpo.rl_step

    def rl_step(*a, **kw):
        step_shapes: list[list[tuple[int, int]]] = []

        def rec(samples, advantages, rows, seq_len, pad_id, **kw):
            mbs = orig(samples, advantages, rows, seq_len, pad_id, **kw)
            step_shapes.append([tuple(mb.tokens.shape) for mb in mbs])
            return mbs

        grpo.microbatches = rec
        n0 = calls[0]
        try:
            return orig_rl_step(*a, **kw)
        finally:
            grpo.microbatches = orig
            shapes.append(step_shapes)
            forwards.append(calls[0] - n0)

    grpo.rl_step, grpo.moe_routing = rl_step, moe_routing
    res = grpo.main(argv, verifier=parity_verifier)
    return {"shapes": shapes, "forwards": forwards, "result": res}


def _bare_worker(rank: int, world: int, argv: list[str], steps_shapes: list, vocab_hi: int) -> dict:
    import torch

    from megatron_rl.parallel import destroy_parallel
    from megatron_rl.train.engine import lm_forward_step, train_step
    from megatron_rl.train.grpo import parse_args
    from megatron_rl.train.logprobs import causal_mask
    from megatron_rl.train.setup import setup

    args, _ = parse_args(argv)
    # same model / optimizer config as the RL run (build_trainer + load_hf_weights)
    tr = setup(args, train_steps=args.train_iters).trainer
    dev = next(tr.model.parameters()).device
    gen = torch.Generator().manual_seed(0)

    def batch(b: int, s: int) -> dict:
        tokens = torch.randint(0, vocab_hi, (b, s), generator=gen)
        labels = torch.zeros_like(tokens)
        labels[:, :-1] = tokens[:, 1:]
        mask = torch.ones(b, s)
        mask[:, -1] = 0.0
        return {k: v.to(dev) for k, v in {
            "tokens": tokens, "labels": labels, "loss_mask": mask,
            "position_ids": torch.arange(s).expand(b, s).contiguous(),
            "attention_mask": causal_mask(b, s)}.items()}

    times = []
    for minis in steps_shapes:  # warm-up steps included; the caller drops them
        data = [[batch(b, s) for b, s in mini] for mini in minis]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for mbs in data:
            train_step(tr, mbs, forward_step=lm_forward_step)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    destroy_parallel()
    return {"times": times, "device": str(dev)}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def _run_all(a, n_steps: int):
    """The RL run (+ the extra-forward run with --ab-count-forward) and the bare run, in a temp dir."""
    from megatron_rl.data.jsonl import write_jsonl_atomic
    from megatron_rl.data.synthetic import generate
    from megatron_rl.testing import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = a.hf
        if hf_dir is None:
            from make_tiny_model import make_tiny_model  # tools/ is on sys.path for scripts
            hf_dir = os.fspath(make_tiny_model(Path(tmp) / "tiny", seed=0))
        data = Path(tmp) / "train.jsonl"
        write_jsonl_atomic(data, generate("id", max(8, a.rollout_batch_size * n_steps), seed=21))
        out = Path(tmp) / "run"
        rl_argv = ["--hf", hf_dir, "--train-data", str(data), "--out", str(out), "--device", a.device,
                   "--num-engines", str(a.num_engines), "--rollout-batch-size", str(a.rollout_batch_size),
                   "--n-samples-per-prompt", str(a.n_samples_per_prompt),
                   "--max-new-tokens", str(a.max_new_tokens), "--num-steps", str(n_steps),
                   "--mini-batches-per-rollout", str(a.mini_batches_per_rollout),
                   "--micro-batch-size", str(a.micro_batch_size), "--temperature", "1.0",
                   "--lr", "1e-4", "--lr-warmup-steps", "0", "--seed", "5"]
        t0 = time.perf_counter()
        (rl,) = run_distributed(_rl_worker, 1, rl_argv)
        rl_wall = time.perf_counter() - t0
        recs = {r["step"]: r for r in map(json.loads, open(out / "metrics.jsonl"))}
        ab = None
        if a.ab_count_forward:
            out_b = Path(tmp) / "run_extra_forward"
            ab_argv = list(rl_argv)
            ab_argv[ab_argv.index("--out") + 1] = str(out_b)
            (rl_b,) = run_distributed(_rl_worker, 1, ab_argv, True)
            ab = {"run": rl_b, "recs": {r["step"]: r for r in map(json.loads, open(out_b / "metrics.jsonl"))}}
        with open(Path(hf_dir) / "config.json") as f:
            vocab = json.load(f)["vocab_size"]
        bare_argv = list(rl_argv)
        bare_argv[bare_argv.index("--out") + 1] = str(Path(tmp) / "bare")
        (bare,) = run_distributed(_bare_worker, 1, bare_argv, rl["shapes"], vocab)
    return rl, recs, ab, bare, rl_wall


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf", help="HF model dir (default: the tiny model, made in a temp dir)")
    ap.add_argument("--num-engines", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="measured RL steps")
    ap.add_argument("--warmup", type=int, default=1, help="RL steps run first and not measured")
    ap.add_argument("--rollout-batch-size", type=int, default=4)
    ap.add_argument("--n-samples-per-prompt", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--mini-batches-per-rollout", type=int, default=1)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--ab-count-forward", action="store_true",
                    help="also run the RL steps with the extra no-grad counting forward (the old path) "
                         "and report forwards per step and logprob + train time side by side")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    n_steps = a.warmup + a.steps
    rl, recs, ab, bare, rl_wall = _run_all(a, n_steps)

    measured = list(range(a.warmup + 1, n_steps + 1))
    rows = []
    for step in measured:
        r = recs[step]
        minis = rl["shapes"][step - 1]
        rows.append({
            "step": step,
            **{f"{p}_s": r.get(f"perf/{p}_time_s") for p in PHASES},
            "step_s": r["perf/step_time_s"], "tokens": round(r["perf/tokens_per_s"] * r["perf/step_time_s"]),
            "padded_tokens": sum(b * s for mini in minis for b, s in mini),
            "microbatch_shapes": minis, "bare_fwd_bwd_s": bare["times"][step - 1],
        })
    mean = {k: _mean([row[k] for row in rows]) for k in
            [f"{p}_s" for p in PHASES] + ["step_s", "tokens", "padded_tokens", "bare_fwd_bwd_s"]}
    summary = {
        "rl_step_s": mean["step_s"], "bare_fwd_bwd_s": mean["bare_fwd_bwd_s"],
        "rl_tokens_per_s": mean["tokens"] / mean["step_s"],
        "bare_tokens_per_s": mean["tokens"] / mean["bare_fwd_bwd_s"],
        "rl_overhead_ratio": mean["step_s"] / mean["bare_fwd_bwd_s"],
        "train_phase_ratio": mean["train_s"] / mean["bare_fwd_bwd_s"],
    }
    result = {"config": {**vars(a), "hf": a.hf or "tiny (tools/make_tiny_model.py)", "device": bare["device"]},
              "steps": rows, "mean": mean, "summary": summary, "rl_run_wall_s": rl_wall,
              "load_avg": os.getloadavg()}

    print(f"device {bare['device']}, {a.num_engines} embedded engines, {a.rollout_batch_size} prompts x "
          f"{a.n_samples_per_prompt} samples, max_new_tokens {a.max_new_tokens}, "
          f"{a.steps} measured steps after {a.warmup} warm-up; load avg {os.getloadavg()[0]:.2f}")
    print(f"{'phase':<16} {'mean s':>9} {'% of step':>10}")
    for p in PHASES:
        v = mean[f"{p}_s"]
        print(f"{p:<16} {v:>9.3f} {100 * v / mean['step_s']:>9.1f}%")
    other = mean["step_s"] - sum(mean[f"{p}_s"] for p in PHASES)
    print(f"{'other':<16} {other:>9.3f} {100 * other / mean['step_s']:>9.1f}%")
    print(f"{'RL step':<16} {mean['step_s']:>9.3f} {100.0:>9.1f}%")
    print(f"{'bare fwd+bwd':<16} {mean['bare_fwd_bwd_s']:>9.3f}   (same micro-batch shapes, LM loss)")
    print(f"tokens/step {mean['tokens']:.0f} (padded {mean['padded_tokens']:.0f}); tokens/s RL "
          f"{summary['rl_tokens_per_s']:.1f} vs bare {summary['bare_tokens_per_s']:.1f}")
    print(f"RL overhead ratio (RL step / bare fwd-bwd): {summary['rl_overhead_ratio']:.2f}x; "
          f"train-phase-only ratio: {summary['train_phase_ratio']:.2f}x")
    print(f"policy forwards per RL step: {_mean([rl['forwards'][s - 1] for s in measured]):.1f}")
    if ab is not None:
        result["count_forward_ab"] = _count_forward_ab(rl, recs, ab, measured)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


def _count_forward_ab(rl: dict, recs: dict, ab: dict, measured: list[int]) -> dict:
    """Side by side: router counts from the old-logprob forward (this code) vs the extra no-grad
    counting forward per mini-batch (``count_in_old_pass`` off); same seeds, same steps."""
    def side(run, rr):
        return {"forwards_per_step": _mean([run["forwards"][s - 1] for s in measured]),
                "logprob_s": _mean([rr[s]["perf/logprob_time_s"] for s in measured]),
                "train_s": _mean([rr[s]["perf/train_time_s"] for s in measured])}

    new, old = side(rl, recs), side(ab["run"], ab["recs"])
    moe_dev = max((abs(recs[s][k] - ab["recs"][s][k]) for s in measured for k in recs[s]
                   if k.startswith("moe/") and k in ab["recs"][s]), default=float("nan"))
    out = {"recorded": new, "extra_forward": old, "moe_metric_max_abs_diff": moe_dev,
           "forwards_ratio": old["forwards_per_step"] / new["forwards_per_step"],
           "logprob_plus_train_ratio": (old["logprob_s"] + old["train_s"]) / (new["logprob_s"] + new["train_s"])}
    print(f"{'router counts':<22} {'forwards/step':>14} {'logprob s':>10} {'train s':>9}")
    for name, v in (("old-logprob forward", new), ("extra counting fwd", old)):
        print(f"{name:<22} {v['forwards_per_step']:>14.1f} {v['logprob_s']:>10.3f} {v['train_s']:>9.3f}")
    print(f"extra / recorded: forwards {out['forwards_ratio']:.2f}x, logprob + train time "
          f"{out['logprob_plus_train_ratio']:.2f}x; max |moe/* metric difference| {moe_dev:.3g}")
    return out


if __name__ == "__main__":
    main()
