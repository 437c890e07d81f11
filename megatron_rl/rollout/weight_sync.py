"""Versioned weight sync Megatron -> rollout engines: ``WeightSync.sync(model, hf_config, version)``.

Legend: dst = the trainer rank that talks HTTP to the engines; bucket = ``{hf_name: tensor}`` of
at most ``bucket_bytes`` (``checkpoint.export.iter_hf_tensors``); version = the trainer's policy
version, sent to the engines as ``str(version)`` and echoed in every later /generate response.

One sync (collective over every trainer rank; only dst makes HTTP calls, on its own asyncio loop
because the trainer is synchronous and ``SGLangClient`` is async):
1. dst: ``pause_generation(mode=pause_mode)`` ("in_place" keeps in-flight requests, which resume
   with the new weights) and ``flush_cache`` (the radix / KV cache holds old-policy states).
2. every rank iterates ``iter_hf_tensors`` to the end; dst pushes each bucket with
   ``update_weights_from_tensor(bucket, weight_version=str(version))`` to every engine as it
   arrives ("tensor" mode), or writes it as one safetensors shard of an HF dir and finally calls
   ``update_weights_from_disk`` ("disk" mode: the fallback for real SGLang, whose tensor path
   needs CUDA IPC handles from the same node).
3. dst: ``continue_generation``, then checks that every engine's /get_server_info reports
   ``weight_version == str(version)``; a stale engine raises ``WeightVersionMismatchError``
   naming it.
dst broadcasts the outcome (metrics or the error text) so every rank returns or raises alike;
an HTTP failure mid-stream does not stop dst from draining the generator (no deadlock).

Mode "distributed" (SGLang's disaggregated path, ``update_weights_from_distributed``): dst hosts a
separate process group (group rank 0; TCP rendezvous at ``master_address:master_port``; world =
1 + engines, engine i joins as rank i + 1 through ``/init_weights_update_group``), built on the
first sync and reused until ``destroy_group()`` or a failed sync (which drops it; the next sync
builds a fresh one on a new port). Per bucket, dst POSTs ``/update_weights_from_distributed``
{names, dtypes, shapes, group_name, flush_cache, weight_version} to every engine and, while that
call is in flight, broadcasts each tensor from rank 0 (a worker thread; the HTTP call stays on the
loop). backend: "nccl" where CUDA is present, else "gloo" (the embedded CPU engine). The group
never touches the default (Megatron) group, see ``rollout.update_group``.
FP8 (``fp8_block=(128, 128)``): each bucket is quantised before it is sent
(``quant.fp8.quantize_named``: float8_e4m3fn + ``weight_scale_inv`` per block, a weight and its
scale in the same bucket); "disk" mode writes config.json with the FP8 ``quantization_config``;
"distributed" over gloo (no float8 support) sends FP8 weights as uint8 bytes, which the embedded
engine reinterprets because a ``weight_scale_inv`` accompanies them (``quant.fp8_engine``).
Left out: LoRA deltas.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
import time
from typing import Literal

import torch

from megatron_rl.checkpoint.export import DEFAULT_BUCKET_BYTES, iter_hf_tensors
from megatron_rl.quant.fp8 import quantization_config, quantize_named
from megatron_rl.rollout.update_group import DEFAULT_GROUP_NAME, UpdateGroup, dtype_to_str, init_update_group

SyncMode = Literal["tensor", "disk", "distributed"]


class WeightVersionMismatchError(RuntimeError):
    """After a sync, an engine reports another weight_version than the one just pushed."""


class WeightSyncError(RuntimeError):
    """The sync failed on dst (HTTP error, engine refusal); raised on every trainer rank."""


class WeightSync:
    """Push a live Megatron model's weights to the engines of ``client`` (an ``SGLangClient``).

    Args:
        client: SGLangClient over the engine urls (control calls go to every engine directly).
        bucket_bytes: max bytes per pushed bucket (per HTTP request in "tensor" mode, per shard
            file in "disk" mode).
        mode: "tensor" | "disk" | "distributed" (see module doc).
        dst: the global trainer rank that gathers the tensors and calls the engines.
        pause_mode: SGLang pause mode used around the update ("in_place" | "abort" | "retract").
        disk_dir: "disk" mode only: a directory visible to the engines (shared FS); default a
            temp dir on this host, removed after the engines have loaded it.
        master_address, master_port: "distributed" only: where dst hosts the group's rendezvous
            (an address the engines reach); port 0 = a free port picked at each (re)init.
        group_name, backend: "distributed" only: SGLang's group name; "nccl" | "gloo" (default:
            "nccl" with CUDA, else "gloo").
        group_timeout_s: "distributed" only: rendezvous and per-collective timeout.
        supervisor: dst only, optional ``EngineSupervisor``: dead engines are restarted before each
            sync and get this sync's weights before they rejoin the router (with a client built
            with ``drop_failed_engines=True``, an engine dying mid-sync is left out instead of
            failing the sync); adds rollout/engine_restarts, rollout/dead_engines,
            rollout/router_restarts to the metrics.
        fp8_block: quantise the Linear weights to blockwise FP8 at every sync (``--rollout-fp8``),
            None = send the model dtype.
    """

    def __init__(self, client, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, mode: SyncMode = "tensor",
                 dst: int = 0, pause_mode: str = "in_place", disk_dir: str | None = None,
                 master_address: str = "127.0.0.1", master_port: int = 0,
                 group_name: str = DEFAULT_GROUP_NAME, backend: str | None = None, group_timeout_s: float = 120.0,
                 supervisor=None, fp8_block: tuple[int, int] | None = None):
        if mode not in ("tensor", "disk", "distributed"):
            raise ValueError(f"mode must be 'tensor' | 'disk' | 'distributed', got {mode!r}")
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.client, self.bucket_bytes, self.mode = client, bucket_bytes, mode
        self.dst, self.pause_mode, self.disk_dir = dst, pause_mode, disk_dir
        self.master_address, self.master_port, self.group_name = master_address, master_port, group_name
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.group_timeout_s = group_timeout_s
        self.group: UpdateGroup | None = None  # dst only, "distributed" only
        self.supervisor = supervisor  # dst only: rollout.supervisor.EngineSupervisor (restarts engines)
        self.version: int | None = None  # the last version pushed successfully (every rank)
        self._group_urls: list[str] = []  # "distributed": the engines in the current group
        self.fp8_block = fp8_block

    # ------------------------------------------------------------------ public
    def sync(self, model, hf_config: dict, version: int) -> dict[str, float]:
        """Collective: push ``model``'s weights to every engine as weight_version ``str(version)``.

        Args:
            model: this rank's GPTModel chunk (any layout ``iter_hf_tensors`` supports).
            hf_config: HF config dict of the model (family, vocab, tying; written as config.json
                in "disk" mode).
            version: the policy version (int, e.g. the optimizer step).
        Returns:
            metrics on every rank: ``perf/sync_time_s`` (wall seconds on dst, pause to verified),
            ``perf/sync_gb_per_s`` (payload GB (1e9 bytes) / sync_time_s), ``sync/num_buckets``,
            ``sync/bytes`` (HF tensor bytes pushed).
        Raises:
            WeightVersionMismatchError: an engine reports another version afterwards (names it).
            WeightSyncError: an engine call failed on dst (message carries the cause).
        """
        rank = torch.distributed.get_rank()
        buckets = iter_hf_tensors(model, hf_config, bucket_bytes=self.bucket_bytes, dst=self.dst)
        if rank != self.dst:
            for _ in buckets:  # collectives only; yields nothing off dst
                pass
            return self._share(None, version)
        loop = asyncio.new_event_loop()
        try:
            outcome = self._sync_on_dst(loop, buckets, hf_config, str(version))
        finally:
            loop.run_until_complete(self.client.close())
            loop.close()
        return self._share(outcome, version)

    def check_versions(self, version: int | str) -> dict[str, str | None]:
        """Blocking (any process): every engine's weight_version must be ``str(version)``.

        Returns ``{url: version}``; raises WeightVersionMismatchError naming the stale engines.
        """
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(self._check(str(version)))
        finally:
            loop.run_until_complete(self.client.close())
            loop.close()

    # ------------------------------------------------------------------ dst side
    def _sync_on_dst(self, loop, buckets, hf_config: dict, version: str) -> dict | BaseException:
        run = loop.run_until_complete
        t0 = time.perf_counter()
        error: BaseException | None = None
        n_buckets = n_bytes = 0
        tmp = None
        supervised = {}
        try:
            if self.supervisor is not None:  # restart dead engines: this sync gives them the weights
                supervised = self.supervisor.before_sync(self.client)
            run(self.client.pause_generation(self.pause_mode))
            run(self.client.flush_cache())
            if self.mode == "disk":
                tmp = self.disk_dir or tempfile.mkdtemp(prefix="weight_sync_")
            if self.mode == "distributed" and self.group is not None and self._group_urls != self.client.live_urls:
                self._drop_group(loop)  # an engine died or was restarted: a fresh group of the live ones
            if self.mode == "distributed" and self.group is None:
                self._init_group(loop)
        except Exception as e:  # noqa: BLE001 - drained below, reported on every rank
            error = e
        shards: list[dict[str, str]] = []
        ndims: dict[str, int] = {}  # fp8 only: HF names -> ndim before quantisation
        for bucket in buckets:  # always drain: the other ranks are inside the same collectives
            if self.fp8_block is not None and error is None:
                try:
                    ndims.update({k: t.dim() for k, t in bucket.items()})
                    bucket = quantize_named(bucket, self.fp8_block)
                except Exception as e:  # noqa: BLE001 - e.g. NaN weights, named
                    error = e
            n_buckets += 1
            n_bytes += sum(t.numel() * t.element_size() for t in bucket.values())
            if error is not None:
                continue
            try:
                if self.mode == "tensor":
                    run(self.client.update_weights_from_tensor(bucket, weight_version=version))
                elif self.mode == "distributed":
                    self._push_distributed(loop, bucket, version)
                else:
                    shards.append(_write_shard(tmp, len(shards), bucket))
            except Exception as e:  # noqa: BLE001
                error = e
        try:
            if error is None and self.mode == "disk":
                _write_index(tmp, shards, hf_config if not ndims else
                             {**hf_config, "quantization_config": quantization_config(ndims, self.fp8_block)})
                run(self.client.update_weights_from_disk(tmp, weight_version=version))
            run(self.client.continue_generation())
            if error is None:
                run(self._check(version))
        except Exception as e:  # noqa: BLE001
            error = error or e
        finally:
            if tmp is not None and self.disk_dir is None:
                shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            if self.mode == "distributed":
                self._drop_group(loop)  # unknown state: the next sync builds a fresh group
            return error
        if self.supervisor is not None:
            try:  # the restarted engines hold this version now: back on the router
                supervised |= self.supervisor.after_sync(self.client)
            except Exception as e:  # noqa: BLE001 - reported on every rank
                return e
        dt = time.perf_counter() - t0
        return {"perf/sync_time_s": dt, "perf/sync_gb_per_s": n_bytes / 1e9 / max(dt, 1e-9),
                "sync/num_buckets": float(n_buckets), "sync/bytes": float(n_bytes), **supervised}

    # ------------------------------------------------------------------ "distributed" mode (dst)
    def destroy_group(self) -> None:
        """dst: engines leave the weight-update group and dst drops its side (no-op if none)."""
        loop = asyncio.new_event_loop()
        try:
            self._drop_group(loop, raise_errors=True)
        finally:
            loop.run_until_complete(self.client.close())
            loop.close()

    def _init_group(self, loop) -> None:
        """Engines join (HTTP, on the loop) while dst hosts the rendezvous (worker thread)."""
        port = self.master_port or _free_port(self.master_address)
        world = 1 + len(self.client.live_urls)
        join = loop.run_in_executor(None, lambda: init_update_group(
            self.master_address, port, 0, world, self.group_name, self.backend, self.group_timeout_s))
        http = self.client.init_weights_update_group(self.master_address, port, world,
                                                     group_name=self.group_name, backend=self.backend)
        group, _ = loop.run_until_complete(_gather_both(join, http))
        self.group, self._group_urls = group, list(self.client.live_urls)

    def _push_distributed(self, loop, bucket: dict[str, torch.Tensor], version: str) -> None:
        """One bucket: announce it over HTTP and broadcast its tensors (in order) concurrently."""
        group = self.group
        tensors = [t.detach().to(group.device).contiguous() for t in bucket.values()]
        if self.backend == "gloo":  # gloo has no float8: FP8 weights travel as their bytes
            tensors = [t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in tensors]

        def send() -> None:
            for t in tensors:
                group.broadcast(t, src=0)
        http = self.client.update_weights_from_distributed(
            list(bucket), [dtype_to_str(t.dtype) for t in tensors], [list(t.shape) for t in tensors],
            weight_version=version, group_name=self.group_name, flush_cache=True)
        loop.run_until_complete(_gather_both(loop.run_in_executor(None, send), http))

    def _drop_group(self, loop, raise_errors: bool = False) -> None:
        group, self.group = self.group, None
        if group is None:
            return
        try:
            loop.run_until_complete(self.client.destroy_weights_update_group(self.group_name))
        except Exception:  # noqa: BLE001 - engines may already have dropped it
            if raise_errors:
                raise
        finally:
            group.destroy()

    async def _check(self, version: str) -> dict[str, str | None]:
        got = await self.client.weight_versions()
        stale = {u: v for u, v in got.items() if v != version}
        if not got:
            raise WeightVersionMismatchError(f"weight sync to version {version!r}: no engine answered")
        if stale:
            raise WeightVersionMismatchError(
                f"weight sync to version {version!r}: engine(s) report another version: "
                + ", ".join(f"{u} has {v!r}" for u, v in stale.items()))
        return got

    def _share(self, outcome, version: int) -> dict[str, float]:
        """Broadcast dst's outcome (metrics or exception) to every rank; raise it everywhere;
        on success record ``version`` as ``self.version``."""
        box = [None if outcome is None else
               (type(outcome).__name__, str(outcome)) if isinstance(outcome, BaseException) else outcome]
        if torch.distributed.get_world_size() > 1:
            torch.distributed.broadcast_object_list(box, src=self.dst)
        (val,) = box
        if isinstance(val, tuple):
            kind, msg = val
            if kind == WeightVersionMismatchError.__name__:
                raise WeightVersionMismatchError(msg)
            raise WeightSyncError(f"weight sync failed on rank {self.dst}: {kind}: {msg}")
        self.version = version
        return val


async def _gather_both(fut, coro):
    """Await a thread future and an HTTP coroutine together; if one fails, still wait for the other
    (a blocked collective times out after group_timeout_s) and raise the first error."""
    res = await asyncio.gather(fut, coro, return_exceptions=True)
    for r in res:
        if isinstance(r, BaseException):
            raise r
    return res


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _write_shard(root: str, i: int, bucket: dict[str, torch.Tensor]) -> dict[str, str]:
    """Write one bucket as ``model-{i:05d}.safetensors``; returns {name: file} for the index."""
    from safetensors.torch import save_file

    fname = f"model-{i:05d}.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in bucket.items()}, os.path.join(root, fname))
    return {k: fname for k in bucket}


def _write_index(root: str, shards: list[dict[str, str]], hf_config: dict) -> None:
    """HF sharded-checkpoint index + config.json so ``from_pretrained(root)`` loads it."""
    weight_map = {k: f for shard in shards for k, f in shard.items()}
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(hf_config, f)
