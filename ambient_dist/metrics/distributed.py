"""Rank bookkeeping for sampling and evaluation: who am I, which slice is mine, gather.

Launchers are started by `torchrun` / `deepspeed` (RANK, WORLD_SIZE, LOCAL_RANK) or `mpirun`
(OMPI_COMM_WORLD_* for Open MPI, PMI_* for MPICH / Intel MPI); `env_rank_world` reads
whichever is set, so sample.py can split work without any process group at all. Evaluation
needs collectives (gathering features, merging nearest neighbours): `init_from_env` starts a
process group (gloo on CPU, nccl on GPU) when more than one rank is running.

Work is split in contiguous slices: rank r gets [r*N/W, (r+1)*N/W), so gathering the slices
in rank order restores the original order.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

_ENV_NAMES = (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
              ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
              ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"))


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) if none."""
    for rank_key, world_key, local_key in _ENV_NAMES:
        if rank_key in os.environ and world_key in os.environ:
            rank, world = int(os.environ[rank_key]), int(os.environ[world_key])
            if not 0 <= rank < world:
                raise ValueError(f"{rank_key}={rank} is not in [0, {world_key}={world})")
            return rank, world, int(os.environ.get(local_key, rank))
    return 0, 1, 0


def rank_and_world() -> tuple[int, int]:
    """(rank, world) of the running process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def slice_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    return n * rank // world, n * (rank + 1) // world


def init_from_env(device: torch.device, timeout_s: float = 600.0) -> bool:
    """Start a process group when the environment says there are several ranks.

    Returns True if this call started it (the caller should destroy it at the end)."""
    rank, world, _ = env_rank_world()
    if world == 1 or dist.is_initialized():
        return False
    # torchrun sets MASTER_ADDR/PORT; under mpirun the user exports them (see README).
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return True


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's contiguous slice (rank order) -> [total, ...] on the CPU.

    Slices differ by at most one row; each is padded to the longest for all_gather."""
    _, world = rank_and_world()
    dev = _collective_device()
    longest = max(b - a for a, b in (slice_bounds(total, r, world) for r in range(world)))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: len(local)] = local.to(dev)
    blocks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(blocks, padded)
    pieces = []
    for r, block in enumerate(blocks):
        a, b = slice_bounds(total, r, world)
        pieces.append(block[: b - a].cpu())
    return torch.cat(pieces)
