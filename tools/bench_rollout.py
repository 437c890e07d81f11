"""Rollout throughput of K embedded engines behind the real sglang-router, per client concurrency.

    python tools/bench_rollout.py [--model HF_DIR] [--engines 2] [--concurrency 1,4,16,64]
                                  [--num-prompts 64] [--max-new-tokens 64] [--seed 0]
                                  [--max-running-requests 64] [--threads-per-engine 1] [--json OUT]
                                  [--no-hf-baseline]

Stack: `EngineLauncher` starts K `python -m megatron_rl.rollout.engine` processes (each with
OMP_NUM_THREADS=--threads-per-engine) and `sglang_router.launch_router` (round robin) on free
127.0.0.1 ports; everything is shut down on exit. Without --model the tiny model
(tools/make_tiny_model.py, seed 0) is written to a temp dir first.

Workload: --num-prompts synthetic problems (megatron_rl.data.synthetic.generate("id", ...,
seed)) as chat prompts (megatron_rl.data.chat.build_prompt_ids), the SAME set at every concurrency.
Each request: temperature 1, max_new_tokens, return_logprob, sampling seed = seed + prompt index
(so every level generates the same tokens). Requests go through `SGLangClient(router_url=...)`
with `max_concurrency` = the level; one untimed warm-up request per engine runs first.

Reported per concurrency (wall = first send to last answer of that level, seconds):
    gen tok/s = sum of len(output_ids) / wall      req/s = requests / wall
    p50 / p95 latency = percentiles (numpy, linear) of per-request seconds from send (after the
                        request got one of the `level` slots) to answer, router + engine queueing included
    mean out = mean generated tokens per request
Paired baseline (--hf-baseline, on by default): in-process HF transformers `generate` over ONE left-padded
batch of the same prompts and model (do_sample, temperature 1, the same max_new_tokens, stopping
each row at EOS like the engine), on torch.set_num_threads(--hf-threads) (default 1, the issue's
baseline: on a shared 2-core machine 2 OpenMP threads under load ran 5-10x SLOWER than 1), run
before the engines start. Reported: HF gen tok/s (tokens up to and including each
row's EOS / wall) and, per concurrency, `vs HF` = engine gen tok/s / HF gen tok/s.
The numbers depend on machine load: the run records os.getloadavg() before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megatron_rl.rollout.client import SamplingParams, SGLangClient  # noqa: E402
from megatron_rl.rollout.launcher import EngineLauncher, LaunchConfig  # noqa: E402


def _make_tiny(out: Path) -> Path:
    """tools/make_tiny_model.py's model (seed 0) in `out` (tools/ is on sys.path for scripts)."""
    from make_tiny_model import make_tiny_model

    return make_tiny_model(out, seed=0)


def build_prompts(model_dir: str, n: int, seed: int) -> list[list[int]]:
    """n chat-formatted synthetic prompts (token ids) for the tokenizer in `model_dir`."""
    from transformers import AutoTokenizer

    from megatron_rl.data.chat import build_prompt_ids
    from megatron_rl.data.synthetic import generate

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [build_prompt_ids(tok, row) for row in generate("id", n, seed)]


def hf_baseline(model_dir: str, prompts: list[list[int]], max_new_tokens: int, seed: int, threads: int) -> dict:
    """Batched HF `generate` on all prompts at once (left padding + attention mask); returns tok/s."""
    import torch
    from transformers import AutoModelForCausalLM

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        eos = model.generation_config.eos_token_id
        eos = set([eos] if isinstance(eos, int) else (eos or []))
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        torch.manual_seed(seed)
        with torch.no_grad():  # warm-up call, untimed
            model.generate(ids[:2], attention_mask=mask[:2], do_sample=True, max_new_tokens=2, pad_token_id=0)
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=0)
            wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)
    n_tokens = 0
    for row in out[:, width:].tolist():
        stop = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        n_tokens += stop
    return {"gen_tokens": n_tokens, "wall_s": wall, "gen_tok_per_s": n_tokens / wall, "threads": threads}


async def run_level(client: SGLangClient, prompts: list[list[int]], max_new_tokens: int, seed: int,
                    tag: str) -> dict:
    """Send every prompt once (client.max_concurrency in flight); returns this level's stats."""
    latencies: list[float] = []
    n_tokens = 0
    gate = asyncio.Semaphore(client.max_concurrency)  # ours, so latency excludes the wait for a slot

    async def one(i: int) -> None:
        nonlocal n_tokens
        sp = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed + i)
        async with gate:
            t0 = time.perf_counter()
            res = await client.generate(prompts[i], sp, return_logprob=True, rid=f"{tag}-{i}")
            latencies.append(time.perf_counter() - t0)
        n_tokens += len(res.output_ids)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies)
    return {"concurrency": client.max_concurrency, "requests": len(prompts), "gen_tokens": n_tokens,
            "wall_s": wall, "gen_tok_per_s": n_tokens / wall, "req_per_s": len(prompts) / wall,
            "p50_latency_s": float(np.percentile(lat, 50)), "p95_latency_s": float(np.percentile(lat, 95)),
            "mean_out_tokens": n_tokens / len(prompts)}


async def bench(launcher: EngineLauncher, prompts: list[list[int]], levels: list[int],
                max_new_tokens: int, seed: int) -> list[dict]:
    rows = []
    warm = SamplingParams(temperature=1.0, max_new_tokens=4, seed=seed)
    for i, url in enumerate(launcher.engine_urls):  # direct: each engine pays its first-call cost once
        async with SGLangClient([url]) as c:
            await c.generate(prompts[0], warm, rid=f"warm-{i}")
    for level in levels:
        async with SGLangClient(launcher.engine_urls, router_url=launcher.router_url,
                                max_concurrency=level, retries=0) as client:
            row = await run_level(client, prompts, max_new_tokens, seed, tag=f"c{level}")
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


COLUMNS = ("concurrency", "requests", "gen_tokens", "wall_s", "gen_tok_per_s", "req_per_s",
           "p50_latency_s", "p95_latency_s", "mean_out_tokens")
HEADER = ("conc", "reqs", "tokens", "wall s", "gen tok/s", "req/s", "p50 s", "p95 s", "mean out")


def format_row(row: dict) -> str:
    cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
    return "| " + " | ".join(f"{x:>9}" for x in cells) + " |"


def format_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(f"{h:>9}" for h in HEADER) + " |"
    sep = "|" + "|".join("-" * 11 for _ in HEADER) + "|"
    return "\n".join([head, sep, *map(format_row, rows)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF model dir (default: the tiny model, written to a temp dir)")
    p.add_argument("--engines", type=int, default=2, help="number of embedded engines (K)")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client concurrencies")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="data seed and base sampling seed")
    p.add_argument("--max-running-requests", type=int, default=64, help="per engine")
    p.add_argument("--threads-per-engine", type=int, default=1, help="OMP_NUM_THREADS of each engine")
    p.add_argument("--json", help="write {config, load, rows} here")
    p.add_argument("--hf-threads", type=int, default=1, help="torch threads of the HF baseline")
    p.add_argument("--no-hf-baseline", dest="hf_baseline", action="store_false",
                   help="skip the paired in-process batched HF generate baseline")
    a = p.parse_args(argv)
    a.levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
    if a.engines < 1 or a.num_prompts < 1 or not a.levels or min(a.levels) < 1:
        p.error("--engines, --num-prompts and every --concurrency must be >= 1")
    return a


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        model = a.model
        if model is None:
            model = os.fspath(_make_tiny(Path(tmp) / "tiny"))
        prompts = build_prompts(model, a.num_prompts, a.seed)
        env = {"OMP_NUM_THREADS": str(a.threads_per_engine)}
        cfg = LaunchConfig(model_path=model, num_engines=a.engines, router=True, health_timeout_s=300,
                           extra_args=("--max-running-requests", str(a.max_running_requests)),
                           engine_env=tuple(dict(env) for _ in range(a.engines)), log_dir=os.path.join(tmp, "logs"))
        load_before = os.getloadavg()
        print(f"{a.engines} engines, {len(prompts)} prompts (mean {np.mean([len(p) for p in prompts]):.1f} tokens), "
              f"max_new_tokens {a.max_new_tokens}, loadavg {load_before}", flush=True)
        hf = None
        if a.hf_baseline:
            hf = hf_baseline(model, prompts, a.max_new_tokens, a.seed, a.hf_threads)
            print(f"HF batched generate ({hf['threads']} threads): {hf['gen_tokens']} tokens in "
                  f"{hf['wall_s']:.2f} s = {hf['gen_tok_per_s']:.1f} gen tok/s", flush=True)
        print(format_table([]), flush=True)
        with EngineLauncher(cfg) as launcher:
            rows = asyncio.run(bench(launcher, prompts, a.levels, a.max_new_tokens, a.seed))
        load_after = os.getloadavg()
    for row in rows:
        row["vs_hf"] = row["gen_tok_per_s"] / hf["gen_tok_per_s"] if hf else None
    print(f"\n{format_table(rows)}\nloadavg before {load_before}, after {load_after}, cpus {os.cpu_count()}")
    if hf:
        print("engine / HF batched generate (gen tok/s): " +
              ", ".join(f"c={r['concurrency']}: {r['vs_hf']:.2f}x" for r in rows))
    if a.json:
        out = {"config": {k: v for k, v in vars(a).items() if k != "json"}, "model": a.model or "tiny (temp)",
               "prompt_tokens_mean": float(np.mean([len(p) for p in prompts])),
               "loadavg_before": load_before, "loadavg_after": load_after, "cpu_count": os.cpu_count(), "rows": rows,
               "hf_baseline": hf}
        tmp_out = Path(f"{a.json}.tmp")
        tmp_out.write_text(json.dumps(out, indent=2))
        os.replace(tmp_out, a.json)
    return rows


if __name__ == "__main__":
    main()
