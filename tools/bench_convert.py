"""Throughput of tools/convert.py against a plain safetensors read of the same files.

    python tools/bench_convert.py [--hf DIR | --preset tiny|small] [--max-shard-size 5GB]
                                  [--workdir DIR]

Each phase runs in a fresh child process (1 rank, CPU), so its peak RSS is its own:
- read:        ``safetensors.torch.load_file`` of every *.safetensors in the HF dir, one at a time,
               each tensor cloned (load_file may return lazily mapped tensors that are never read)
- hf-to-mcore: ``convert.py hf-to-mcore`` (model build + lazy HF read + torch_dist save)
- mcore-to-hf: ``convert.py mcore-to-hf`` (dist load + streamed export + shard writes)
GB/s = bytes of the HF safetensors files (1e9 B/GB) / wall seconds of the phase (imports
excluded). Peak RSS = ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the child; "over imports"
subtracts the RSS measured after the imports. Without --hf the tiny model (tools/
make_tiny_model.py) or a ~430 MB "small" variant is written to a temp dir first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRESETS = {
    "tiny": {},
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, num_experts=16, moe_intermediate_size=512,
                  intermediate_size=1024),
}
PHASES = ("read", "hf-to-mcore", "mcore-to-hf")


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(phase: str, hf: str, work: str, max_shard: str) -> None:
    """Run one phase in this process; print a JSON line with the measurements."""
    import torch  # noqa: F401  (imports before the baseline)
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT / "tools"))
    import convert  # noqa: E402
    import megatron.core  # noqa: F401

    base = _rss_now()
    t0 = time.perf_counter()
    if phase == "read":
        for f in sorted(Path(hf).glob("*.safetensors")):
            sd = load_file(f)  # may be backed by a lazy mmap: clone to really read the bytes
            sd = {k: t.clone() for k, t in sd.items()}
            del sd
    elif phase == "hf-to-mcore":
        convert.main(["hf-to-mcore", "--hf", hf, "--out", f"{work}/mcore", "--overwrite"])
    else:
        convert.main(["mcore-to-hf", "--ckpt", f"{work}/mcore", "--out", f"{work}/hf_out",
                      "--overwrite", "--max-shard-size", max_shard])
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("BENCH " + json.dumps({"phase": phase, "seconds": seconds, "peak_rss": peak,
                                 "base_rss": base}))


def _run_phase(phase: str, hf: str, work: str, max_shard: str) -> dict:
    cmd = [sys.executable, __file__, "--_phase", phase, "--hf", hf, "--workdir", work,
           "--max-shard-size", max_shard]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")]
    if out.returncode or not lines:
        raise RuntimeError(f"phase {phase} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][6:])


def _table(rows: list[dict], hf_bytes: int, largest: int, n_files: int) -> str:
    mb = 2**20
    read_gbs = hf_bytes / 1e9 / rows[0]["seconds"]
    lines = [f"HF checkpoint: {hf_bytes / mb:.1f} MiB in {n_files} file(s), largest "
             f"{largest / mb:.1f} MiB",
             f"{'phase':<12} {'seconds':>8} {'GB/s':>7} {'vs read':>8} {'peak RSS MiB':>13} "
             f"{'over imports':>13} {'/largest shard':>15}"]
    for r in rows:
        gbs = hf_bytes / 1e9 / r["seconds"]
        over = r["peak_rss"] - r["base_rss"]
        lines.append(f"{r['phase']:<12} {r['seconds']:>8.2f} {gbs:>7.3f} {gbs / read_gbs:>8.3f} "
                     f"{r['peak_rss'] / mb:>13.0f} {over / mb:>13.0f} {over / largest:>15.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", default=None, help="HF checkpoint dir (default: make one)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="model made when --hf is not given")
    p.add_argument("--max-shard-size", default="5GB", help="mcore-to-hf shard size")
    p.add_argument("--workdir", default=None, help="where outputs go (default: a temp dir)")
    p.add_argument("--_phase", choices=PHASES, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._phase:
        _child(a._phase, a.hf, a.workdir, a.max_shard_size)
        return []
    with tempfile.TemporaryDirectory(prefix="bench_convert.") as tmp:
        work = a.workdir or tmp
        hf = a.hf
        if hf is None:
            sys.path.insert(0, str(ROOT / "tools"))
            from make_tiny_model import make_tiny_model

            hf = os.fspath(make_tiny_model(Path(work) / f"hf_{a.preset}", seed=0,
                                           overwrite=True, **PRESETS[a.preset]))
        files = sorted(Path(hf).glob("*.safetensors"))
        sizes = [f.stat().st_size for f in files]
        rows = [_run_phase(ph, hf, work, a.max_shard_size) for ph in PHASES]
        print(_table(rows, sum(sizes), max(sizes), len(files)))
    return rows


if __name__ == "__main__":
    main()
