"""Save/resume of a whole training run with Megatron ``dist_checkpointing`` (torch_dist).

Layout under ``<run>/checkpoints/``::

    iter_0000100/            dist_checkpointing dir: model + optimizer (sharded), common state
    iter_0000100/rng/rank<r>.pt   per-rank RNG states (CPU, CUDA if present, Megatron tracker)
    latest_checkpointed_iteration.txt   written last, atomically: the resume pointer

A checkpoint is first written to ``iter_XXXXXXX.tmp`` by all ranks and renamed by rank 0 after a
barrier, then the pointer is replaced; a job killed mid-save leaves the previous checkpoint and
pointer intact (the stale ``.tmp`` is removed on the next save). The checkpoint loads into any
parallel layout (fully reshardable optimizer state).
"""

from __future__ import annotations

import json
import os
import shutil

import torch

TRACKER = "latest_checkpointed_iteration.txt"
_OPT_META = {"distrib_optim_sharding_type": "dp_reshardable"}


def _sharded(tr, is_loading: bool) -> dict:
    model_sd = tr.model.module.sharded_state_dict()
    return {
        "model": model_sd,
        "optimizer": tr.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                     metadata=_OPT_META),
    }


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"cpu": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["cpu"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _inner_optimizers(optimizer) -> list:
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]


def _adam_step(optimizer) -> int:
    """torch.optim.Adam keeps its update count per parameter ('step'); Megatron's reshardable
    optimizer checkpoint does not carry it (TE/Apex fused Adam keep it in param_groups). All
    parameters share one count, so we save it with the trainer state."""
    for opt in _inner_optimizers(optimizer):
        for st in opt.state.values():
            if "step" in st:
                return int(st["step"])
    return 0


def _ensure_adam_state(optimizer) -> None:
    """A fresh torch Adam has no per-parameter state until its first step, but Megatron's
    (non-TE/Apex) optimizer ``state_dict`` needs it to build the load plan: create torch's
    initial state (step 0, zero moments); loading then overwrites it in place."""
    for opt in _inner_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                if len(opt.state[p]) == 0:
                    opt.state[p]["step"] = torch.tensor(0.0)
                    opt.state[p]["exp_avg"] = torch.zeros_like(p.data)
                    opt.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


def _set_adam_step(optimizer, step: int) -> None:
    for opt in _inner_optimizers(optimizer):
        for st in opt.state.values():
            if "step" in st:  # a fresh tensor each: the load path may alias one across params
                old = st["step"]
                st["step"] = (torch.tensor(float(step), dtype=old.dtype, device=old.device)
                              if torch.is_tensor(old) else step)


def save_checkpoint(ckpt_root: str, step: int, tr, extra: dict) -> str:
    """Save model, optimizer, scheduler, RNG and ``extra`` (JSON-able: data cursor, ...) at
    ``step``. Collective: every rank must call it. Returns the final checkpoint directory."""
    from megatron.core import dist_checkpointing

    rank = torch.distributed.get_rank()
    final = os.path.join(ckpt_root, f"iter_{step:07d}")
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        for d in (tmp, final):
            if os.path.exists(d):
                shutil.rmtree(d)
        os.makedirs(tmp)
    torch.distributed.barrier()
    sd = _sharded(tr, is_loading=False)
    sd["scheduler"] = tr.scheduler.state_dict()
    sd["trainer_state"] = json.dumps({"step": step, "adam_step": _adam_step(tr.optimizer),
                                      **extra})
    from megatron_rl.checkpoint.mcore_io import in_process_write_queue

    with in_process_write_queue():  # no spawned manager process per save (seconds on CPU)
        dist_checkpointing.save(sd, tmp)
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank{rank}.pt"))
    torch.distributed.barrier()
    if rank == 0:
        os.replace(tmp, final)
        tracker_tmp = os.path.join(ckpt_root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(step))
        os.replace(tracker_tmp, os.path.join(ckpt_root, TRACKER))
    torch.distributed.barrier()
    return final


def latest_step(ckpt_root: str) -> int | None:
    """Step of the last complete checkpoint under ``ckpt_root`` or None.

    Raises ValueError when the pointer file is corrupt (names the file)."""
    path = os.path.join(ckpt_root, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, got {text!r}")
    return int(text)


def load_checkpoint(ckpt_root: str, tr, step: int | None = None) -> dict | None:
    """Load the checkpoint at ``step`` (default: latest) into ``tr`` in place.

    Returns the ``extra`` dict saved with it (plus ``step``), or None when there is nothing to
    resume. Raises FileNotFoundError if the pointer names a missing directory."""
    from megatron.core import dist_checkpointing

    step = latest_step(ckpt_root) if step is None else step
    if step is None:
        return None
    path = os.path.join(ckpt_root, f"iter_{step:07d}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} (from {ckpt_root}/{TRACKER}) is missing")
    _ensure_adam_state(tr.optimizer)
    sd = _sharded(tr, is_loading=True)
    sd["scheduler"] = None
    sd["trainer_state"] = None
    common = dist_checkpointing.load_common_state_dict(path)
    loaded = dist_checkpointing.load({k: v for k, v in sd.items() if v is not None}, path)
    tr.model.module.load_state_dict(loaded["model"])
    tr.optimizer.load_state_dict(loaded["optimizer"])
    tr.scheduler.num_steps = 0  # upstream load_state_dict *adds* the saved step count
    tr.scheduler.load_state_dict(common["scheduler"])
    state = json.loads(common["trainer_state"])
    _set_adam_step(tr.optimizer, state.pop("adam_step", 0))
    rank = torch.distributed.get_rank()
    rng_path = os.path.join(path, "rng", f"rank{rank}.pt")
    if os.path.exists(rng_path):  # absent when resuming into a different world size
        _set_rng_state(torch.load(rng_path, weights_only=False))
    return state
