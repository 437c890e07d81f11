"""Process-group set-up: torch.distributed (from torchrun/Slurm env) + Megatron model parallel.

``init_parallel(ParallelConfig, device=...)`` is the one entry point; on CPU it applies the
patches in ``megatron_rl.device`` first and uses gloo. Rendezvous comes from the environment:
torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, or Slurm's SLURM_PROCID/
SLURM_NTASKS/SLURM_LOCALID with MASTER_ADDR/MASTER_PORT exported by the sbatch script; a
single process with none of these runs as world size 1 on localhost.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from megatron_rl import device as _device


@dataclass(kw_only=True)
class ParallelConfig:
    """Parallel layout. dp is derived: world_size / (tp * pp * cp).

    Attributes: tp (tensor), pp (pipeline), ep (expert), etp (expert tensor; None = 1), cp
    (context), sequence_parallel (requires tp > 1).
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None  # None = tp (Megatron's default)
    cp: int = 1
    sequence_parallel: bool = False

    def dp(self, world_size: int) -> int:
        """Data-parallel size for a world size; raises ValueError if it does not divide."""
        mp = self.tp * self.pp * self.cp
        if world_size % mp:
            raise ValueError(f"world size {world_size} not divisible by tp*pp*cp={mp}")
        dp = world_size // mp
        etp = self.etp if self.etp is not None else self.tp
        if (world_size // self.pp) % (self.ep * etp):
            raise ValueError(
                f"world size {world_size}/pp={self.pp} not divisible by ep*etp={self.ep * etp}"
            )
        return dp


def _env_rank_world() -> tuple[int, int, int]:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                int(os.environ.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return (int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]),
                int(os.environ.get("SLURM_LOCALID", 0)))
    return 0, 1, 0


def free_port() -> int:
    """An unused TCP port on localhost (for single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(pc: ParallelConfig, *, device: str | None = None, seed: int = 1234,
                  timeout_s: int = 600) -> str:
    """Initialise torch.distributed and Megatron's parallel state; seed the RNG trackers.

    Args:
        pc: the parallel layout.
        device: "cpu" | "cuda" | None (auto).
        seed: base seed; Megatron derives per-TP/EP-rank seeds from it.
    Returns:
        the resolved device name.
    Raises:
        ValueError: inconsistent layout for the world size, SP without TP, CP on CPU.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    dev = _device.resolve_device(device)
    if dev == "cpu":
        _device.apply_cpu_patches("cpu")
    if pc.sequence_parallel and pc.tp == 1:
        raise ValueError("--sequence-parallel needs --tp > 1")
    if dev == "cpu" and pc.cp > 1:
        raise ValueError("--cp > 1 needs Transformer Engine attention (GPU); use --cp 1 on CPU")
    rank, world, local_rank = _env_rank_world()
    pc.dp(world)
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if world == 1:
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        if dev == "cuda":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(
            backend=_device.dist_backend(dev), rank=rank, world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=pc.tp,
            pipeline_model_parallel_size=pc.pp,
            context_parallel_size=pc.cp,
            expert_model_parallel_size=pc.ep,
            expert_tensor_parallel_size=pc.etp,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return dev


def destroy_parallel(*, keep_process_group: bool = False) -> None:
    """Tear down Megatron's groups and (unless ``keep_process_group``) the default process group,
    so another layout can be initialised in the same processes. Safe to call twice."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if torch.distributed.is_initialized() and not keep_process_group:
        torch.distributed.destroy_process_group()
