"""GPU check of the embedded engine (a `tools/gpu_check.sh` extra stage): the engine on CUDA.

    python tools/gpu_check_engine.py OUT_DIR      -> OUT_DIR/engine.json, exit 1 on failure

Writes {"status": "pass"|"fail"|"skipped", "figures": {name: {"value", "unit"}}, "skipped": {...}}
(via temp + rename). Without a CUDA device: status "skipped" ("no CUDA device"), exit 0.
Checks, on the tiny model (tools/make_tiny_model.py, seed 0) in a temp dir:
 1. parity: the engine in-process with `device="cuda"` (fp32, TF32 off) on 8 prompts of different
    lengths in one batch; greedy tokens equal HF greedy on CPU, logprobs of an fp32 CPU HF forward
    within 1e-3 (CUDA vs CPU kernels);
 2. throughput: 64 prompts x 64 sampled tokens on CUDA, tok/s (a figure, no target);
 3. GRPO smoke: `megatron_rl.train.grpo.main` for 2 steps, trainer on CUDA (`--device cuda`) and one
    embedded engine on the same GPU (`--engine-args "--device cuda"`); passes when both steps
    finish with finite loss; figures: step / rollout seconds of the last step.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def parity_verifier(response: str, label: str) -> float:
    """Reward about half the samples (len parity) so the smoke has non-zero advantages."""
    return float(len(response) % 2 == 0)


def _grpo_worker(rank: int, world: int, argv: list[str]) -> dict:
    from megatron_rl.train.grpo import main

    return main(argv, verifier=parity_verifier)


def _write(out_dir: Path, rec: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "engine.json.tmp"
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, out_dir / "engine.json")


def check_parity(model_dir: str, figures: dict) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rl.rollout.engine.sampling import SamplingParams
    from megatron_rl.rollout.engine.server import EngineConfig, EngineServer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [tok.encode(f"{i * 7}+{i}*{i + 2}=" + "1" * i) for i in range(8)]
    server = EngineServer(EngineConfig(model_path=model_dir, device="cuda"))
    failures, worst = [], 0.0

    async def run(items):
        return await server.run(items)
    server.sched.start()
    try:
        items = [dict(rid=f"p{i}", input_ids=p, params=SamplingParams(temperature=0, max_new_tokens=16), return_logprob=True)
                 for i, p in enumerate(prompts)]
        outs = asyncio.run(run(items))
        for p, o in zip(prompts, outs):
            want = ref.generate(torch.tensor([p]), do_sample=False, max_new_tokens=16)[0, len(p):].tolist()
            if o["output_ids"] != want[: len(o["output_ids"])]:
                failures.append(f"greedy differs from HF CPU for prompt {p}")
            with torch.no_grad():
                lp = torch.log_softmax(ref(torch.tensor([p + o["output_ids"]])).logits[0, len(p) - 1:-1].double(), -1)
            for i, (x, t, _) in enumerate(o["meta_info"]["output_token_logprobs"]):
                worst = max(worst, abs(x - lp[i, t].item()))
        figures["cuda_vs_cpu_logprob_max_abs_diff"] = {"value": worst, "unit": "nats"}
        if not worst < 1e-3:
            failures.append(f"logprobs differ from the CPU fp32 reference by {worst:.2e} (> 1e-3)")
        many = [dict(rid=f"t{i}", input_ids=prompts[i % 8], params=SamplingParams(max_new_tokens=64, ignore_eos=True,
                                                                                   sampling_seed=i)) for i in range(64)]
        t0 = time.perf_counter()
        outs = asyncio.run(run(many))
        wall = time.perf_counter() - t0
        figures["engine_cuda_64x64_tok_per_s"] = {"value": sum(len(o["output_ids"]) for o in outs) / wall,
                                                  "unit": "tokens/s"}
    finally:
        server.sched.shutdown()
    return failures


def check_grpo(model_dir: str, tmp: Path, figures: dict) -> list[str]:
    from megatron_rl.data.jsonl import write_jsonl_atomic
    from megatron_rl.data.synthetic import generate
    from megatron_rl.testing import run_distributed

    write_jsonl_atomic(tmp / "train.jsonl", generate("id", 8, seed=21))
    write_jsonl_atomic(tmp / "eval.jsonl", generate("id", 4, seed=22))
    out = tmp / "grpo"
    argv = ["--hf", model_dir, "--train-data", str(tmp / "train.jsonl"), "--eval-data", f"id={tmp / 'eval.jsonl'}",
            "--out", str(out), "--num-engines", "1", "--engine-args", "--device cuda", "--device", "cuda",
            "--rollout-batch-size", "2", "--n-samples-per-prompt", "4", "--max-new-tokens", "16",
            "--num-steps", "2", "--micro-batch-size", "4", "--lr", "1e-3", "--lr-warmup-steps", "0",
            "--eval-n-samples", "2", "--eval-max-prompts", "2", "--seed", "5"]
    run_distributed(_grpo_worker, 1, argv)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "train/loss" in r]
    if len(steps) < 2 or not all(math.isfinite(r["train/loss"]) for r in steps):
        return [f"GRPO smoke: expected 2 steps with finite loss, got {len(steps)}"]
    for key, name in (("perf/step_time_s", "grpo_step_s"), ("perf/rollout_time_s", "grpo_rollout_s")):
        if key in steps[-1]:
            figures[name] = {"value": steps[-1][key], "unit": "s"}
    return []


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = Path(args[0])
    import torch

    if not torch.cuda.is_available():
        _write(out_dir, {"status": "skipped", "figures": {}, "skipped": {"engine": "no CUDA device"}})
        print("gpu_check_engine: skipped (no CUDA device)")
        return 0
    figures, failures = {}, []
    with tempfile.TemporaryDirectory(prefix="gpu-check-engine-") as tmp:
        from make_tiny_model import make_tiny_model

        model_dir = os.fspath(make_tiny_model(Path(tmp) / "tiny", seed=0))
        for name, fn in (("parity", lambda: check_parity(model_dir, figures)),
                         ("grpo", lambda: check_grpo(model_dir, Path(tmp), figures))):
            try:
                failures += fn()
            except Exception:  # noqa: BLE001 - recorded, the other check still runs
                failures.append(f"{name}: {traceback.format_exc()[-1500:]}")
    rec = {"status": "fail" if failures else "pass", "figures": figures, "skipped": {}}
    if failures:
        rec["detail"] = "\n".join(failures)[-4000:]
    _write(out_dir, rec)
    print(json.dumps(rec, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
