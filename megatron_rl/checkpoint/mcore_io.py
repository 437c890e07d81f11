"""Model-only Megatron-Core distributed checkpoints (torch_dist) that carry their HF config.

Layout of ``out_dir``::

    metadata.json, *.distcp, ...   megatron.core.dist_checkpointing (torch_dist): key "model"
                                   = the unwrapped GPTModel's ``sharded_state_dict()``
    (common state)                 "hf_config" (JSON text), "params_dtype" ("float32", ...),
                                   "format" = FORMAT
    hf_meta/                       optional copies of config.json, generation_config.json and
                                   tokenizer files (written by ``tools/convert.py hf-to-mcore``)

Written to ``<out_dir>.tmp-<pid of rank 0>`` by all ranks, renamed by rank 0 after a barrier: a
crash leaves no ``out_dir``, and the temp dirs of killed runs are removed by the next write
(``remove_stale_tmp_dirs``: only when their writer's pid is dead on this host). The checkpoint loads into any TP / PP / EP / ETP layout (sharded
tensors carry global offsets; the vocab padding may differ, Megatron's ``allow_shape_mismatch``).
Left out: optimizer state (see ``megatron_rl.train.checkpointing`` for full training state).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import socket

import torch

FORMAT = "megatron_rl.model_only.v1"
HF_META = "hf_meta"
META_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
              "tokenizer.model", "chat_template.jinja", "chat_template.json")


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _bcast(obj, src: int = 0):
    box = [obj]
    if torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def copy_hf_meta(src_dir: str, dst_dir: str) -> list[str]:
    """Copy config.json and tokenizer / generation files (``META_FILES``) that exist in
    ``src_dir`` into ``dst_dir`` (created). Returns the copied names."""
    os.makedirs(dst_dir, exist_ok=True)
    names = [n for n in META_FILES if os.path.isfile(os.path.join(src_dir, n))]
    for n in names:
        shutil.copy2(os.path.join(src_dir, n), os.path.join(dst_dir, n))
    return names


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Raise FileExistsError if ``out_dir`` exists and is not empty (unless ``overwrite``)."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        if not overwrite:
            raise FileExistsError(f"output directory {out_dir} exists and is not empty; "
                                  f"pass --overwrite (overwrite=True) to replace it")


OWNER = ".owner"  # "<hostname> <pid>" of the process writing a ``<out>.tmp-<pid>`` dir


def make_tmp_dir(out_dir: str, pid: int) -> str:
    """Create ``<out_dir>.tmp-<pid>`` (empty) with its owner file, after removing the temp dirs
    that killed runs left (``remove_stale_tmp_dirs``). Returns its path."""
    remove_stale_tmp_dirs(out_dir)
    tmp = f"{out_dir}.tmp-{pid}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp, mode=0o755)
    with open(os.path.join(tmp, OWNER), "w") as f:
        f.write(f"{socket.gethostname()} {pid}\n")
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_tmp_dirs(out_dir: str) -> list[str]:
    """Remove ``<out_dir>.tmp-<pid>`` dirs whose writer is dead; returns the removed paths.

    A temp dir is removed only when its owner file names this host and a pid that no longer
    exists here. A live pid (the writer, or a later process reusing its pid), another host's
    dir, or a dir without an owner file (written by an older version: its host is unknown) is
    left alone, so a conversion running concurrently elsewhere never loses its output.
    """
    parent, base = os.path.split(os.path.abspath(out_dir))
    removed = []
    for name in os.listdir(parent or "."):
        m = re.fullmatch(re.escape(base) + r"\.tmp-(\d+)", name)
        path = os.path.join(parent, name)
        if not m or not os.path.isdir(path):
            continue
        try:
            host, pid = open(os.path.join(path, OWNER)).read().split()
        except (OSError, ValueError):
            continue
        if host == socket.gethostname() and int(pid) == int(m.group(1)) and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def replace_dir(tmp: str, out_dir: str) -> None:
    """Move the finished ``tmp`` to ``out_dir``, replacing whatever is there."""
    if os.path.lexists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    else:
        os.replace(tmp, out_dir)


@contextlib.contextmanager
def in_process_write_queue():
    """Synchronous saves only: hand Megatron's torch_dist writer a thread-safe in-process queue
    instead of its default ``multiprocessing`` Manager queue, whose spawned server process
    re-imports torch to unpickle the write results (4-7 s per process here, more than writing a
    400 MB model). ``filesystem_async._results_queue`` is a private cache of megatron-core
    0.19.2; restored afterwards; a no-op if absent."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if not hasattr(fa, "_results_queue"):
        yield
        return
    old, fa._results_queue = fa._results_queue, queue.Queue()
    try:
        yield
    finally:
        fa._results_queue = old


def save_model_checkpoint(model, out_dir: str, hf_config: dict, *, overwrite: bool = False,
                          hf_meta_from: str | None = None) -> str:
    """Save the model's weights (all ranks' shards) as a torch_dist checkpoint. Collective.

    Args:
        model: this rank's GPTModel chunk (wrapped or not).
        out_dir: final checkpoint directory.
        hf_config: HF config dict, stored in the common state (``read_hf_config``).
        overwrite: replace an existing non-empty ``out_dir``.
        hf_meta_from: an HF directory whose config / tokenizer files are copied to ``hf_meta/``.
    Returns:
        ``out_dir`` (absolute).
    Raises:
        FileExistsError: ``out_dir`` is non-empty and not ``overwrite`` (nothing is written).
    """
    from megatron.core import dist_checkpointing

    out_dir = os.path.abspath(out_dir)
    rank = torch.distributed.get_rank()
    err = None
    if rank == 0:
        try:
            check_out_dir(out_dir, overwrite)
        except FileExistsError as e:
            err = str(e)
    err = _bcast(err)
    if err:
        raise FileExistsError(err)
    tmp = f"{out_dir}.tmp-{_bcast(os.getpid())}"
    module = _unwrap(model)
    if rank == 0:
        make_tmp_dir(out_dir, int(tmp.rsplit("-", 1)[1]))
    torch.distributed.barrier()
    try:
        sd = {"model": module.sharded_state_dict(), "hf_config": json.dumps(hf_config),
              "params_dtype": str(module.config.params_dtype).removeprefix("torch."),
              "format": FORMAT}
        with in_process_write_queue():
            dist_checkpointing.save(sd, tmp)
        torch.distributed.barrier()
        if rank == 0:
            if hf_meta_from is not None:
                copy_hf_meta(hf_meta_from, os.path.join(tmp, HF_META))
            os.remove(os.path.join(tmp, OWNER))
            replace_dir(tmp, out_dir)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    torch.distributed.barrier()
    return out_dir


def read_common(ckpt_dir: str) -> dict:
    """The common (non-sharded) state of a dist checkpoint; no process group needed.

    Raises FileNotFoundError when ``ckpt_dir`` is not a dist checkpoint (names the dir)."""
    from megatron.core import dist_checkpointing

    if not os.path.isfile(os.path.join(ckpt_dir, "metadata.json")):
        raise FileNotFoundError(f"{ckpt_dir} is not a Megatron dist checkpoint "
                                f"(no metadata.json)")
    return dist_checkpointing.load_common_state_dict(ckpt_dir)


def read_hf_config(ckpt_dir: str) -> dict | None:
    """The HF config dict stored by ``save_model_checkpoint``; None for checkpoints without one
    (e.g. training checkpoints of ``megatron_rl.train.checkpointing``)."""
    common = read_common(ckpt_dir)
    return json.loads(common["hf_config"]) if "hf_config" in common else None


def read_params_dtype(ckpt_dir: str, default: torch.dtype = torch.float32) -> torch.dtype:
    """The parameter dtype the checkpoint was saved in (``default`` if not recorded)."""
    name = read_common(ckpt_dir).get("params_dtype")
    return getattr(torch, name) if name else default


def _match_stored_dtypes(module, ckpt_dir: str) -> None:
    """Cast each parameter of ``module`` to the dtype its tensor has in the checkpoint (matched
    by the sharded tensor's global key, the parameter found by its storage)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from torch.distributed.checkpoint import FileSystemReader

    # torch DCP's own metadata (megatron-core 0.19.2's load_tensors_metadata breaks on torch >= 2.10)
    stored = FileSystemReader(ckpt_dir).read_metadata().state_dict_metadata
    params = {p.untyped_storage().data_ptr(): p for p in module.parameters()}
    for sh in nested_values(module.sharded_state_dict()):
        meta, data = stored.get(getattr(sh, "key", None)), getattr(sh, "data", None)
        dtype = getattr(getattr(meta, "properties", None), "dtype", None)
        if dtype is None or data is None or dtype == data.dtype:
            continue
        p = params.get(data.untyped_storage().data_ptr())
        if p is not None:
            p.data = p.data.to(dtype)


@torch.no_grad()
def load_model_checkpoint(model, ckpt_dir: str, *, keep_dtype: bool = False) -> dict | None:
    """Load a dist checkpoint's "model" weights into this rank's chunk, any layout. Collective.

    keep_dtype: first give every parameter the dtype its tensor was saved in (conversion, so a
    bf16 or mixed-dtype checkpoint is exported unchanged); else the model's dtypes are kept.
    Returns the stored HF config dict (None if absent). Raises FileNotFoundError (not a dist
    checkpoint) or megatron's CheckpointingException (missing keys / global shape mismatch,
    each naming the tensor)."""
    from megatron.core import dist_checkpointing

    hf_config = read_hf_config(ckpt_dir)
    module = _unwrap(model)
    if keep_dtype:
        _match_stored_dtypes(module, ckpt_dir)
    loaded = dist_checkpointing.load({"model": module.sharded_state_dict()}, ckpt_dir)
    module.load_state_dict(loaded["model"])
    return hf_config
