"""Stand-alone weight-update process groups (SGLang's ``init_weights_update_group`` protocol).

Legend: dst = the trainer rank that owns the group (group rank 0, hosts the TCP rendezvous);
engine i (0-based, in client url order) joins as group rank ``rank_offset = i + 1``;
world = 1 + number of engines.

The group is built from a ``TCPStore`` (+ a ``PrefixStore`` named after ``group_name``) and a
backend object constructed directly (``ProcessGroupGloo`` / ``ProcessGroupNCCL``), so it never
touches ``torch.distributed``'s default group: the trainer keeps its Megatron groups, the engine
(which has no default group) needs none. Construction blocks until every rank has joined.

Left out: SGLang's multi-TP-rank engines (each TP rank would join as ``rank_offset + tp_rank``).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_GROUP_NAME = "weight_update_group"


@dataclass
class UpdateGroup:
    """One member's handle: the backend process group and the store keeping the rendezvous alive."""

    pg: object
    store: object
    rank: int
    world_size: int
    backend: str
    device: torch.device

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """In-place broadcast of ``tensor`` from group rank ``src`` (blocking). RuntimeError on timeout."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        self.pg.broadcast([tensor], opts).wait()

    def destroy(self) -> None:
        for meth in ("shutdown", "abort"):
            fn = getattr(self.pg, meth, None)
            if fn is not None:
                try:
                    fn()
                    break
                except Exception:  # noqa: BLE001 - best effort, the group is dropped anyway
                    pass
        self.pg = self.store = None


def init_update_group(master_address: str, master_port: int, rank: int, world_size: int,
                      group_name: str = DEFAULT_GROUP_NAME, backend: str = "gloo",
                      timeout_s: float = 120.0) -> UpdateGroup:
    """Join (rank 0: host) the group; blocks until all ``world_size`` ranks joined.

    Raises ValueError (bad rank/backend, "nccl" without CUDA), RuntimeError / DistStoreError
    (rendezvous timeout, port in use).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA; use backend='gloo' on CPU")
    timeout = datetime.timedelta(seconds=timeout_s)
    tcp = dist.TCPStore(master_address, int(master_port), world_size, rank == 0, timeout=timeout)
    store = dist.PrefixStore(f"{group_name}/", tcp)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=master_address)]
        pg, device = dist.ProcessGroupGloo(store, rank, world_size, opts), torch.device("cpu")
    else:  # pragma: no cover - GPU path
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg, device = dist.ProcessGroupNCCL(store, rank, world_size, opts), torch.device("cuda", torch.cuda.current_device())
    return UpdateGroup(pg=pg, store=tcp, rank=rank, world_size=world_size, backend=backend, device=device)


def dtype_from_str(name: str) -> torch.dtype:
    """"bfloat16" | "torch.bfloat16" -> torch.bfloat16; ValueError otherwise."""
    short = name[len("torch."):] if name.startswith("torch.") else name
    dt = getattr(torch, short, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def dtype_to_str(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the form SGLang resolves with ``getattr(torch, name)``)."""
    return str(dtype).removeprefix("torch.")
