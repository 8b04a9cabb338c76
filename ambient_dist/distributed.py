"""Ranks, process groups and small collectives: one home for training, sampling and evaluation.

Process-group set-up for every way a job can be started. One function,
`init_distributed(cfg)`, turns whatever the launcher left in the environment into a `DistInfo` (rank, world size, local rank, device) and, for more than one rank, an
initialised torch.distributed process group:

    plain `python launchers/train.py`   no RANK/WORLD_SIZE: one rank, no process group
    deepspeed / torchrun                RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set
    mpirun (Open MPI)                   OMPI_COMM_WORLD_RANK/_SIZE/_LOCAL_RANK, mapped here
                                        to RANK/WORLD_SIZE/LOCAL_RANK before initialising
    srun (SLURM, one task per GPU)      SLURM_PROCID/_NTASKS/_LOCALID, mapped the same way
                                        (the batch script exports MASTER_ADDR: the first host)

MASTER_ADDR defaults to 127.0.0.1 (single-node runs and tests never leave the machine) and
MASTER_PORT to 29500. The backend is NCCL with CUDA and gloo on CPU; `distributed.timeout_s`
bounds every collective, so a dead rank ends the job with an error instead of hanging it.
DS_ACCELERATOR=cpu is set when there is no GPU, before DeepSpeed is first imported, so that
DeepSpeed does not go looking for one.

Work of a known size (samples to make, images to extract features of) is split in contiguous
slices: rank r gets [r*N/W, (r+1)*N/W) (`slice_bounds`), so gathering the slices in rank order
(`gather_rows`) restores the original order. `env_rank_world` reads the launcher's rank
without any process group (sample.py splits its work that way); `rank_and_world` asks the
running process group.

This module imports only the config (never engine or metrics, which both use it).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ambient_dist.config import ExperimentConfig

# Open MPI's and SLURM's names for what torch.distributed expects (Open MPI first: mpirun
# inside a SLURM allocation describes its own ranks, not the allocation's tasks).
_LAUNCHER_TO_TORCH = (
    {"OMPI_COMM_WORLD_RANK": "RANK", "OMPI_COMM_WORLD_SIZE": "WORLD_SIZE",
     "OMPI_COMM_WORLD_LOCAL_RANK": "LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE": "LOCAL_WORLD_SIZE"},
    {"SLURM_PROCID": "RANK", "SLURM_NTASKS": "WORLD_SIZE", "SLURM_LOCALID": "LOCAL_RANK"},
)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launcher_environment(env: dict | None = None) -> dict[str, str]:
    """The RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* variables this process should run with.

    Variables the launcher already set win; Open MPI's (else SLURM's) are mapped when
    torch's are missing.
    """
    env = dict(os.environ if env is None else env)
    out: dict[str, str] = {}
    if "RANK" not in env:
        for mapping in _LAUNCHER_TO_TORCH:
            if all(k in env for k in list(mapping)[:2]):
                out = {name: env[k] for k, name in mapping.items() if k in env}
                break
    if int(env.get("WORLD_SIZE", out.get("WORLD_SIZE", "1"))) > 1:
        out.setdefault("MASTER_ADDR", env.get("MASTER_ADDR", "127.0.0.1"))
        out.setdefault("MASTER_PORT", env.get("MASTER_PORT", "29500"))
    return {**{k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in env}, **out}


def use_cpu_accelerator_if_no_gpu() -> None:
    """Tell DeepSpeed to use its CPU accelerator when there is no CUDA device."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed(cfg: ExperimentConfig) -> DistInfo:
    """Read the launcher's environment, pick the device, join the process group if needed."""
    os.environ.update(launcher_environment())
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    use_cpu_accelerator_if_no_gpu()
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=cfg.distributed.timeout_s)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if cfg.distributed.engine == "deepspeed":
            import deepspeed  # its communication layer must know about the group it uses
            deepspeed.init_distributed(dist_backend=backend, timeout=timeout,
                                       auto_mpi_discovery=False, verbose=False)
        else:
            dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world_size,
                                    device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, device)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def _flag_over_ranks(flag: bool, info: DistInfo, op) -> bool:
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=op)
    return bool(t.item() > 0)


def all_ranks_true(flag: bool, info: DistInfo) -> bool:
    """True only if `flag` holds on every rank."""
    return _flag_over_ranks(flag, info, dist.ReduceOp.MIN)


def any_rank_true(flag: bool, info: DistInfo) -> bool:
    """True if `flag` holds on any rank (e.g. a stop request seen by one rank)."""
    return _flag_over_ranks(flag, info, dist.ReduceOp.MAX)


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


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
    """[start, stop) of rank's contiguous share of n items (shares differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


def collective_device() -> torch.device:
    """Where tensors must be for the running process group's collectives."""
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks of the running process group (`t` itself without one), on
    t's device. A collective: every rank calls it with a tensor of the same shape."""
    _, world = rank_and_world()
    if world == 1:
        return t
    out = t.to(collective_device())
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's contiguous slice (rank order) -> [total, ...] on the CPU.

    Slices differ by at most one row; each is padded to the longest for all_gather."""
    _, world = rank_and_world()
    dev = collective_device()
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
