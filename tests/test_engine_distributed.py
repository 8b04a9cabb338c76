"""Distributed set-up: launcher environments, and the DeepSpeed engine at 2 ranks on CPU."""
import torch

from ambient_dist.config import ExperimentConfig
from ambient_dist.engine.distributed import (DistInfo, all_ranks_true, any_rank_true,
                                             init_distributed, launcher_environment)


def test_open_mpi_variables_are_mapped_to_torch_names_with_loopback_defaults():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    out = launcher_environment(env)
    assert out == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_slurm_tasks_are_mapped_when_no_other_launcher_set_ranks():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "MASTER_ADDR": "node001"}
    assert launcher_environment(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                         "MASTER_ADDR": "node001", "MASTER_PORT": "29500"}
    # mpirun inside a SLURM allocation: Open MPI's view of the ranks wins.
    env.update(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="2")
    assert launcher_environment(env)["WORLD_SIZE"] == "2"


def test_variables_set_by_the_launcher_win_over_open_mpi_and_defaults():
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.7",
           "MASTER_PORT": "1234", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}
    out = launcher_environment(env)
    assert out["RANK"] == "0" and out["MASTER_ADDR"] == "10.0.0.7" and out["MASTER_PORT"] == "1234"


def test_a_plain_process_is_one_rank_without_a_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert launcher_environment({}) == {}
    info = init_distributed(ExperimentConfig())
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert not torch.distributed.is_initialized()
    one = DistInfo()
    assert any_rank_true(True, one) and not all_ranks_true(False, one)
