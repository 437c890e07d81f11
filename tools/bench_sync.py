"""Benchmark ``WeightSync.sync`` (Megatron -> embedded engine) against a plain safetensors save+load.

    python tools/bench_sync.py                       # the tiny model (made in a temp dir)
    python tools/bench_sync.py --hf DIR --buckets 1,16,128 --mode tensor --reps 2

Starts one embedded engine on 127.0.0.1 (shut down at exit) and one trainer rank (world 1,
fp32 Megatron model loaded from the HF dir). For each bucket size (MiB) it times ``sync``
(pause -> flush -> stream buckets over HTTP -> continue -> version check) and reports payload
GB/s (1e9 bytes / s, best of --reps). Baseline: the same HF tensors written with
``safetensors.torch.save_file`` to a temp dir and read back with ``load_file`` (best of --reps);
ratio = sync time / baseline time. Left out: multi-rank layouts, real SGLang on GPUs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _baseline(model, hf: dict, reps: int) -> float:
    """Best seconds of save_file + load_file of all HF tensors (gathered once, not timed)."""
    from safetensors.torch import load_file, save_file

    from megatron_rl.checkpoint.export import iter_hf_tensors

    tensors = {k: v.cpu() for b in iter_hf_tensors(model, hf, bucket_bytes=2**40) for k, v in b.items()}
    best = float("inf")
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            save_file(tensors, os.path.join(d, "model.safetensors"))
            load_file(os.path.join(d, "model.safetensors"))
            best = min(best, time.perf_counter() - t0)
    return best


def _worker(rank: int, world: int, hf_dir: str, url: str, buckets_mib: list[float], mode: str,
            reps: int) -> dict:
    from megatron_rl.checkpoint.hf_loader import load_hf_weights
    from megatron_rl.models import ModelOptions, load_hf_config, transformer_config_from_hf
    from megatron_rl.models.base import build_model
    from megatron_rl.parallel import ParallelConfig, destroy_parallel, init_parallel
    from megatron_rl.rollout.client import SGLangClient
    from megatron_rl.rollout.weight_sync import WeightSync

    init_parallel(ParallelConfig(), device="cpu", seed=0)
    hf = load_hf_config(hf_dir)
    model = build_model(hf, transformer_config_from_hf(hf, ModelOptions()), pre_process=True,
                        post_process=True)
    load_hf_weights(model, hf_dir, hf)
    rows, version = [], 0
    for mib in buckets_mib:
        ws = WeightSync(SGLangClient([url]), bucket_bytes=int(mib * 2**20), mode=mode)
        best = None
        for _ in range(reps):
            version += 1
            m = ws.sync(model, hf, version=version)
            best = m if best is None or m["perf/sync_time_s"] < best["perf/sync_time_s"] else best
        rows.append((mib, best))
    base = _baseline(model, hf, reps)
    destroy_parallel()
    return {"rows": rows, "baseline_s": base}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf", help="HF model dir (default: the tiny model, made in a temp dir)")
    ap.add_argument("--buckets", default="0.25,1,8,64", help="bucket sizes in MiB, comma separated")
    ap.add_argument("--mode", choices=("tensor", "disk"), default="tensor")
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args(argv)

    from megatron_rl.rollout.launcher import EngineLauncher, LaunchConfig
    from megatron_rl.testing import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = a.hf
        if hf_dir is None:
            from make_tiny_model import make_tiny_model  # tools/ is on sys.path for scripts
            hf_dir = os.fspath(make_tiny_model(Path(tmp) / "tiny", seed=0))
        buckets = [float(x) for x in a.buckets.split(",")]
        with EngineLauncher(LaunchConfig(model_path=hf_dir, num_engines=1, router=False,
                                         health_timeout_s=300)) as launcher:
            (res,) = run_distributed(_worker, 1, hf_dir, launcher.engine_urls[0], buckets, a.mode, a.reps)
    base = res["baseline_s"]
    total = res["rows"][0][1]["sync/bytes"]
    print(f"model {hf_dir}: {total / 1e6:.1f} MB of HF tensors, mode={a.mode}, best of {a.reps}")
    print(f"{'bucket MiB':>10} {'buckets':>8} {'sync s':>8} {'GB/s':>8} {'vs save+load':>13}")
    for mib, m in res["rows"]:
        print(f"{mib:>10g} {int(m['sync/num_buckets']):>8d} {m['perf/sync_time_s']:>8.3f} "
              f"{m['perf/sync_gb_per_s']:>8.3f} {m['perf/sync_time_s'] / base:>12.2f}x")
    print(f"{'save+load':>10} {'1':>8} {base:>8.3f} {total / 1e9 / base:>8.3f} {1.0:>12.2f}x")


if __name__ == "__main__":
    main()
