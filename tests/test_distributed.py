"""ambient_dist.distributed: launcher environments, the single-process case, work slices."""
import pytest
import torch

from ambient_dist.config import ExperimentConfig
from ambient_dist.distributed import (DistInfo, all_ranks_true, any_rank_true, env_rank_world,
                                      init_distributed, launcher_environment, rank_and_world,
                                      slice_bounds)


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


@pytest.mark.parametrize("n,world", [(10, 3), (2, 4), (0, 2), (7, 1)])
def test_rank_slices_cover_every_item_once_in_rank_order(n, world):
    bounds = [slice_bounds(n, r, world) for r in range(world)]
    assert [i for a, b in bounds for i in range(a, b)] == list(range(n))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_env_rank_world_reads_the_launcher_without_a_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")
    assert env_rank_world() == (2, 3, 2)  # no local rank given: the global one
    assert rank_and_world() == (0, 1)     # no process group joined
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    with pytest.raises(ValueError, match="RANK=3 is not in"):
        env_rank_world()
