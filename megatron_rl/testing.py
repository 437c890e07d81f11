"""Multi-process launcher for tests and tools: run ``fn(rank, world_size, *args)`` in N spawned
CPU processes with a gloo rendezvous on localhost, collect each rank's return value.

Failures in any rank are re-raised in the caller with that rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from megatron_rl.parallel import free_port


def _entry(rank: int, world: int, port: int, outdir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    try:
        result = ("ok", fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - shipped back to the parent
        result = ("err", traceback.format_exc())
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    if result[0] == "err":
        raise SystemExit(1)


def run_distributed(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    ``fn`` must be importable (module level) and its return values picklable.
    Returns the per-rank return values, rank order. Raises RuntimeError with the first failing
    rank's traceback.
    """
    port = free_port()
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_entry, args=(world_size, port, outdir, fn, args),
                                 nprocs=world_size, join=False, start_method="spawn")
        try:
            while not ctx.join():
                pass
        except Exception:  # a rank exited non-zero; report its traceback below
            pass
        results = []
        for r in range(world_size):
            path = os.path.join(outdir, f"rank{r}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a result")
            with open(path, "rb") as f:
                status, val = pickle.load(f)
            if status == "err":
                raise RuntimeError(f"rank {r} failed:\n{val}")
            results.append(val)
        return results
