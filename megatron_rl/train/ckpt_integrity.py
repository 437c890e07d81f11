"""Checkpoint integrity: a manifest of every file's size and CRC-32, and save errors that say what
happened.

``MANIFEST.json`` (``{"format", "files": {relative path: {"size": bytes, "crc32": 8 hex digits}}}``) is
written into a finished checkpoint's temp dir last, by atomic rename, before the dir itself is
renamed into place; a checkpoint without one was never completed. ``verify_manifest`` re-reads
every file (sizes first, then hashes) and raises ``CheckpointCorruptError`` naming the file that
is missing, truncated / grown, or altered. Both are collective: rank r hashes files[r::world]
(the checkpoint dir is on a file system every rank sees, as Megatron's torch_dist requires).

CRC-32 (``zlib.crc32``, standard library) because it is the fastest check available without an
extra package: 1.65-1.94 GB/s on one core here against 0.64-0.68 for hashlib's SHA-256, 0.73-0.75
for SHA-1 and 0.33-0.37 for BLAKE2b (xxhash / crc32c are not installed). The manifest guards
against accidental damage (a CRC-32 catches every burst of <= 32 bits and any other change with
probability 1 - 2^-32), not against deliberate tampering. It adds about one read of the
checkpoint to each save and each resume, split over the ranks.

``save_error`` turns a failed save into ``CheckpointSaveError`` ("no space left on device" with
the path and the free bytes when the disk is full: torch's writer reports ENOSPC as e.g.
"unexpected pos 704 vs 598"); ``check_free_space`` refuses a save up front when the file system
has less room than the previous checkpoint took.
Left out: per-rank local checkpoints (non-shared file systems), asynchronous saves.
"""

from __future__ import annotations

import errno
import json
import os
import zlib

import torch

MANIFEST = "MANIFEST.json"
FORMAT = "megatron_rl.manifest.v1"  # files: {path: {"size", "crc32"}}
_CHUNK = 8 << 20


class CheckpointCorruptError(RuntimeError):
    """A checkpoint whose files do not match its manifest (or that has none); names the file."""


class CheckpointSaveError(RuntimeError):
    """A save that failed; names the path and the cause (e.g. no space left on device)."""


def crc32_file(path: str) -> str:
    """CRC-32 (zlib) of a file's bytes as 8 hex digits, read in 8 MiB chunks."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _files(ckpt_dir: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(ckpt_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), ckpt_dir)
            if rel not in (MANIFEST, MANIFEST + ".tmp"):
                out.append(rel)
    return sorted(out)


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(obj) -> list:
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def write_manifest(ckpt_dir: str) -> dict:
    """Hash every file under ``ckpt_dir`` and write ``MANIFEST.json`` (temp file, fsync, rename).
    Collective; rank 0 writes. Returns the manifest dict. Raises OSError from the file system."""
    rank, world = _rank_world()
    files = _files(ckpt_dir) if rank == 0 else None
    if world > 1:
        box = [files]
        torch.distributed.broadcast_object_list(box, src=0)
        files = box[0]
    mine = {rel: {"size": os.path.getsize(os.path.join(ckpt_dir, rel)),
                  "crc32": crc32_file(os.path.join(ckpt_dir, rel))} for rel in files[rank::world]}
    entries = {k: v for part in _gather(mine) for k, v in part.items()}
    manifest = {"format": FORMAT, "files": dict(sorted(entries.items()))}
    if rank == 0:
        tmp = os.path.join(ckpt_dir, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(ckpt_dir, MANIFEST))
    return manifest


def _check_files(ckpt_dir: str, files: dict, rels: list[str]) -> list[str]:
    problems = []
    for rel in rels:
        path, want = os.path.join(ckpt_dir, rel), files[rel]
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
            continue
        size = os.path.getsize(path)
        if size != want["size"]:
            kind = "truncated" if size < want["size"] else "grown"
            problems.append(f"{path}: {kind}: {size} bytes, the manifest says {want['size']}")
        elif crc32_file(path) != want["crc32"]:
            problems.append(f"{path}: contents changed (crc32 differs from the manifest)")
    return problems


def verify_manifest(ckpt_dir: str) -> dict:
    """Check every file of ``ckpt_dir`` against its manifest. Collective (rank r checks
    files[r::world]); raises the same ``CheckpointCorruptError`` on every rank, naming the
    damaged files (missing manifest, missing / truncated / altered file). Returns the manifest."""
    rank, world = _rank_world()
    path = os.path.join(ckpt_dir, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except FileNotFoundError:
        manifest, files, err = None, {}, f"{path}: missing (the save never completed, or was made by an older version)"
    except (ValueError, KeyError, TypeError) as e:
        manifest, files, err = None, {}, f"{path}: unreadable ({type(e).__name__}: {e})"
    else:
        err = None
    rels = sorted(files)
    problems = ([err] if err and rank == 0 else []) + _check_files(ckpt_dir, files, rels[rank::world])
    problems = [p for part in _gather(problems) for p in part]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointCorruptError(f"checkpoint {ckpt_dir} is damaged: " + "; ".join(problems[:5]) + more)
    return manifest


def manifest_bytes(ckpt_dir: str) -> int | None:
    """Total bytes of the files listed in ``ckpt_dir``'s manifest (None without a readable one)."""
    try:
        with open(os.path.join(ckpt_dir, MANIFEST)) as f:
            return sum(v["size"] for v in json.load(f)["files"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _free_bytes(path: str) -> tuple[int, int]:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def check_free_space(ckpt_root: str, previous: str | None) -> None:
    """Raise CheckpointSaveError (nothing written) when ``ckpt_root``'s file system has fewer free
    bytes than the ``previous`` checkpoint's manifest lists (a save needs about as much)."""
    need = manifest_bytes(previous) if previous else None
    if need is None:
        return
    free, total = _free_bytes(ckpt_root)
    if free < need:
        raise CheckpointSaveError(f"no space left on device for a checkpoint under {ckpt_root}: {free} bytes "
                                  f"free of {total}, the previous checkpoint {previous} took {need}")


def _is_enospc(e: BaseException | None) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def save_error(e: BaseException, tmp: str, final: str) -> CheckpointSaveError:
    """What a failed save of ``final`` (written into ``tmp``) should raise. Call before removing
    ``tmp``: a file system left with < 16 MiB free counts as full (torch's writer hides the
    ENOSPC)."""
    where = os.path.dirname(final) or "."
    try:
        free, total = _free_bytes(tmp if os.path.isdir(tmp) else where)
    except OSError:
        free, total = -1, -1
    full = _is_enospc(e) or 0 <= free < 16 << 20
    cause = f"{type(e).__name__}: {e}"
    if full:
        return CheckpointSaveError(f"no space left on device while saving checkpoint {final} (temp dir {tmp} "
                                   f"removed; {free} bytes free of {total}); the previous checkpoint is kept. "
                                   f"Underlying error: {cause}")
    return CheckpointSaveError(f"saving checkpoint {final} failed (temp dir {tmp} removed; the previous "
                               f"checkpoint is kept): {cause}")
