"""Rank bookkeeping for sampling and evaluation: who am I, which slice is mine, gather.

Launchers are started by `torchrun` / `deepspeed` (RANK, WORLD_SIZE, LOCAL_RANK) or `mpirun`
(Open MPI's OMPI_COMM_WORLD_*); `env_rank_world` reads them through the engine's
`launcher_environment`, so sample.py can split work without any process group at all.
Evaluation needs collectives (gathering features, merging nearest neighbours): it joins a
process group with the engine's `init_distributed`.

Work is split in contiguous slices: rank r gets [r*N/W, (r+1)*N/W), so gathering the slices
in rank order restores the original order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ambient_dist.engine.distributed import launcher_environment


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) if none."""
    env = launcher_environment()
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"launcher environment: RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world, int(env.get("LOCAL_RANK", rank))


def rank_and_world() -> tuple[int, int]:
    """(rank, world) of the running process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def slice_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    return n * rank // world, n * (rank + 1) // world


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
