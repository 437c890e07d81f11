"""Save/resume of a whole training run with Megatron ``dist_checkpointing`` (torch_dist).

Layout under ``--save`` (default ``<run>/checkpoints/``)::

    iter_0000100/            dist_checkpointing dir: model + optimizer (sharded), common state
    iter_0000100/rng/rank<r>.pt   per-rank RNG states (CPU, CUDA if present, Megatron tracker)
    latest_checkpointed_iteration.txt   written last, atomically: the resume pointer

    iter_0000100/config.yaml      the run's resolved config (``train.run_config``)
    iter_0000100/MANIFEST.json    every file's size + CRC-32, written last (``ckpt_integrity``)

A checkpoint is first written to ``iter_XXXXXXX.tmp`` by all ranks, gets its manifest, and is
renamed by rank 0 after a barrier, then the pointer is replaced; a job killed mid-save leaves the
previous checkpoint and pointer intact (the stale ``.tmp`` is removed on the next save). Resume
verifies the manifest and refuses a damaged checkpoint naming the file (``--resume-fallback``:
take the newest intact one instead); a failed save (e.g. disk full) removes its temp dir. The checkpoint loads into any
parallel layout (fully reshardable optimizer state).
"""

from __future__ import annotations

import json
import os
import re
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


def _on_rank0(fn) -> None:
    """Run ``fn`` on rank 0; if it raises, raise it (rank 0) / a RuntimeError with its message
    (other ranks) everywhere, so no rank walks into the next collective alone."""
    err = None
    if torch.distributed.get_rank() == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            err = e
    box = [None if err is None else f"{type(err).__name__}: {err}"]
    torch.distributed.broadcast_object_list(box, src=0)
    if err is not None:
        raise err
    if box[0] is not None:
        raise RuntimeError(f"rank 0: {box[0]}")


def save_checkpoint(ckpt_root: str, step: int, tr, extra: dict, *, config: dict | None = None) -> str:
    """Save model, optimizer, scheduler, RNG and ``extra`` (JSON-able: data cursor, ...) at
    ``step``, the run's resolved ``config`` (``train.run_config``) as ``config.yaml`` when given,
    then its ``MANIFEST.json`` (sizes + CRC-32, ``ckpt_integrity``; it lists config.yaml too), then
    rename it into place and move the pointer. Collective: every rank must call it. Returns the
    final directory.

    Raises ``CheckpointSaveError`` naming the path and the cause ("no space left on device" when
    the file system is full, checked up front against the previous checkpoint's size and again
    after a failed write); the temp dir is removed and the previous checkpoint and pointer are
    untouched."""
    from megatron.core import dist_checkpointing

    from megatron_rl.checkpoint.mcore_io import in_process_write_queue
    from megatron_rl.train.ckpt_integrity import check_free_space, save_error, write_manifest

    rank = torch.distributed.get_rank()
    final = os.path.join(ckpt_root, f"iter_{step:07d}")
    tmp = final + ".tmp"

    def prepare():
        os.makedirs(ckpt_root, exist_ok=True)
        for n in os.listdir(ckpt_root):  # killed saves' leftovers (this run owns ckpt_root)
            if re.fullmatch(r"iter_\d{7}\.tmp", n):
                shutil.rmtree(os.path.join(ckpt_root, n), ignore_errors=True)
        prev = latest_step(ckpt_root)
        check_free_space(ckpt_root, None if prev is None else os.path.join(ckpt_root, f"iter_{prev:07d}"))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.makedirs(tmp)

    _on_rank0(prepare)
    torch.distributed.barrier()
    try:
        sd = _sharded(tr, is_loading=False)
        sd["scheduler"] = tr.scheduler.state_dict()
        sd["trainer_state"] = json.dumps({"step": step, "adam_step": _adam_step(tr.optimizer),
                                          **extra})
        with in_process_write_queue():  # no spawned manager process per save (seconds on CPU)
            dist_checkpointing.save(sd, tmp)
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank{rank}.pt"))
        if config is not None and rank == 0:  # what a resumed run compares its config with
            from megatron_rl.train.run_config import CONFIG_FILE, write_config_yaml

            write_config_yaml(os.path.join(tmp, CONFIG_FILE), config)
        torch.distributed.barrier()
        write_manifest(tmp)  # last file of the checkpoint, by atomic rename
        torch.distributed.barrier()
        if rank == 0:
            os.replace(tmp, final)
            tracker_tmp = os.path.join(ckpt_root, TRACKER + ".tmp")
            with open(tracker_tmp, "w") as f:
                f.write(str(step))
            os.replace(tracker_tmp, os.path.join(ckpt_root, TRACKER))
    except BaseException as e:  # torch's CheckpointException is a BaseException
        if rank != 0:
            raise
        err = save_error(e, tmp, final)  # before the removal frees the space
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(os.path.join(ckpt_root, TRACKER + ".tmp")):
            os.remove(os.path.join(ckpt_root, TRACKER + ".tmp"))
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise err from e
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


def _intact(ckpt_root: str, step: int, fallback: bool) -> str:
    """The dir of checkpoint ``step`` after ``verify_manifest``; with ``fallback``, a damaged one
    is skipped (with a warning) for the newest older intact ``iter_*``. Raises
    CheckpointCorruptError naming the damaged file (and, without fallback, the flag)."""
    from megatron_rl.train.ckpt_integrity import CheckpointCorruptError, verify_manifest

    path = os.path.join(ckpt_root, f"iter_{step:07d}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} (from {ckpt_root}/{TRACKER}) is missing")
    try:
        verify_manifest(path)
        return path
    except CheckpointCorruptError as e:
        if not fallback:
            raise CheckpointCorruptError(f"{e}. Refusing to resume from it; pass --resume-fallback to "
                                         f"resume from the newest intact checkpoint instead") from e
        first = e
    older = sorted((int(n[5:]) for n in os.listdir(ckpt_root) if re.fullmatch(r"iter_\d{7}", n)), reverse=True)
    for s in [s for s in older if s < step]:
        cand = os.path.join(ckpt_root, f"iter_{s:07d}")
        try:
            verify_manifest(cand)
        except CheckpointCorruptError as e:
            print(f"[checkpoint] skipping damaged {cand}: {e}", flush=True)
            continue
        print(f"[checkpoint] --resume-fallback: {first}; resuming from {cand} instead", flush=True)
        return cand
    raise CheckpointCorruptError(f"{first}; --resume-fallback found no intact older checkpoint under {ckpt_root}")


SCHEDULE_FIELDS = {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
                   "lr_decay_steps": "the schedule length (--train-iters / --num-steps)",
                   "lr_decay_style": "--lr-decay-style", "start_wd": "--weight-decay", "end_wd": "--weight-decay",
                   "wd_incr_steps": "the schedule length (--train-iters / --num-steps)"}
GROUP_SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")  # per param group, in Megatron's group identity


class ScheduleMismatchError(ValueError):
    """A resumed run asks for another LR / weight-decay schedule than its checkpoint holds."""


def check_schedule(scheduler, saved: dict, path: str) -> None:
    """Refuse a changed schedule unless the run says which one wins (Megatron's rule).

    ``scheduler``: this run's ``OptimizerParamScheduler``; ``saved``: its ``state_dict()`` from the
    checkpoint at ``path``. With neither ``--override-opt_param-scheduler`` nor
    ``--use-checkpoint-opt_param-scheduler``, Megatron's ``OptimizerParamScheduler.load_state_dict``
    asserts equality with a bare message (megatron/core/optimizer_param_scheduler.py
    ``_check_and_set``); this raises ``ScheduleMismatchError`` first, naming each changed value, its
    flag and both ways out. A changed length alone passes where the schedule is flat (constant LR
    on both sides / constant weight decay): extending such a run needs no flag."""
    if scheduler.override_opt_param_scheduler or scheduler.use_checkpoint_opt_param_scheduler:
        return
    # a schedule's length is moot where it is flat: a constant LR on both sides, and a constant
    # weight decay (start == end): take the checkpoint's, so Megatron's equality check passes
    if saved.get("lr_decay_style") == "constant" == scheduler.lr_decay_style:
        scheduler.lr_decay_steps = saved.get("lr_decay_steps", scheduler.lr_decay_steps)
    if saved.get("start_wd") == saved.get("end_wd") and scheduler.start_wd == scheduler.end_wd:
        scheduler.wd_incr_steps = saved.get("wd_incr_steps", scheduler.wd_incr_steps)
    changed = [f"{k} ({flag}): checkpoint {saved[k]!r}, this run {getattr(scheduler, k)!r}"
               for k, flag in SCHEDULE_FIELDS.items() if k in saved and saved[k] != getattr(scheduler, k)]
    if changed:
        raise ScheduleMismatchError(
            f"checkpoint {path} was saved with another optimizer schedule: " + "; ".join(changed)
            + ". Pass --override-opt_param-scheduler to use this run's values, or "
              "--use-checkpoint-opt_param-scheduler to keep the checkpoint's (Megatron's flags)")


def _param_groups(tree) -> list[dict]:
    """Every optimizer param group (a dict) in a (possibly chained) optimizer state dict."""
    if isinstance(tree, dict):
        groups = tree.get("param_groups")
        if isinstance(groups, list) and all(isinstance(g, dict) for g in groups):
            return list(groups)
        return [g for v in tree.values() for g in _param_groups(v)]
    if isinstance(tree, (list, tuple)):
        return [g for v in tree for g in _param_groups(v)]
    return []


def reconcile_group_schedule(optimizer, saved_optimizer_sd, *, override: bool) -> None:
    """Make the saved and the current param groups agree on ``GROUP_SCHEDULE_KEYS``.

    Megatron's ``DistributedOptimizer.load_state_dict`` pairs each current param group with its
    saved one by a tuple that includes ``max_lr`` / ``min_lr`` / ``start_wd`` / ``end_wd``
    (``param_group_identifier_keys``), so a changed ``--lr`` fails there with a bare ``KeyError``.
    Groups are paired on the other identifier keys; ``override``: the saved groups take this
    run's values, else the current groups take the checkpoint's. Mutates both in place."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    others = [k for k in param_group_identifier_keys if k not in GROUP_SCHEDULE_KEYS]
    current = [g for o in _inner_optimizers(optimizer) for g in o.param_groups]
    saved_groups = _param_groups(saved_optimizer_sd)
    for cur in current:
        ident = tuple(cur.get(k) for k in others)
        for sg in saved_groups:
            if tuple(sg.get(k) for k in others) == ident:
                src, dst = (cur, sg) if override else (sg, cur)
                dst.update({k: src[k] for k in GROUP_SCHEDULE_KEYS if k in src})


def load_checkpoint(ckpt_root: str, tr, step: int | None = None, *, fallback: bool = False) -> dict | None:
    """Load the checkpoint at ``step`` (default: latest) into ``tr`` in place, after checking
    every file against its manifest (``ckpt_integrity.verify_manifest``).

    fallback: when that checkpoint is damaged, load the newest older intact one instead (the
        CLI's ``--resume-fallback``); its ``step`` is returned, and the run continues from it.
    Returns the ``extra`` dict saved with it (plus ``step``), or None when there is nothing to
    resume. Raises FileNotFoundError if the pointer names a missing directory,
    ``CheckpointCorruptError`` naming the damaged file (missing, truncated or altered),
    ``ScheduleMismatchError`` for a changed LR / weight-decay schedule without
    ``--override-opt_param-scheduler`` / ``--use-checkpoint-opt_param-scheduler`` (``check_schedule``)."""
    from megatron.core import dist_checkpointing

    step = latest_step(ckpt_root) if step is None else step
    if step is None:
        return None
    path = _intact(ckpt_root, step, fallback)
    _ensure_adam_state(tr.optimizer)
    sd = _sharded(tr, is_loading=True)
    sd["scheduler"] = None
    sd["trainer_state"] = None
    common = dist_checkpointing.load_common_state_dict(path)
    check_schedule(tr.scheduler, common["scheduler"], path)  # before the (long) load
    loaded = dist_checkpointing.load({k: v for k, v in sd.items() if v is not None}, path)
    tr.model.module.load_state_dict(loaded["model"])
    reconcile_group_schedule(tr.optimizer, loaded["optimizer"], override=tr.scheduler.override_opt_param_scheduler)
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
