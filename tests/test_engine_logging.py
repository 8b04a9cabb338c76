"""ambient_dist.engine.logging: training statistics split by branch and taken over the global batch."""
import pytest
import torch

from ambient_dist.engine.logging import TrainingStats


# -- logging helpers ----------------------------------------------------------------------

def test_training_stats_split_loss_by_branch():
    stats = TrainingStats()
    stats.add_batch(torch.tensor([1.0, 3.0, 10.0]), torch.tensor([False, False, True]),
                    torch.tensor([0.1, 0.2, 2.0]))
    stats.add_step(torch.tensor(4.0), skipped=False)
    stats.add_step(torch.tensor(float("nan")), skipped=True)
    scalars, sigmas = stats.summary()
    assert scalars["loss/clean"] == 2.0 and scalars["loss/ambient"] == 10.0
    assert scalars["objective/ambient_fraction"] == pytest.approx(1 / 3)
    assert scalars["train/grad_norm"] == 4.0 and scalars["train/skipped_steps"] == 1
    assert sigmas.shape == (3,)
    assert stats.summary()[0] == {"train/skipped_steps": 0.0}  # reset after a summary


def _stats_on_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    stats = TrainingStats()
    if rank == 0:   # rank 0: two clean samples; rank 1: one clean, three ambient
        stats.add_batch(torch.tensor([1.0, 3.0]), torch.tensor([False, False]), torch.ones(2))
    else:
        stats.add_batch(torch.tensor([5.0, 10.0, 20.0, 30.0]), torch.tensor([False, True, True, True]),
                        torch.ones(4))
    scalars, _ = stats.summary()
    torch.save(scalars, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_training_stats_are_over_the_whole_global_batch_not_rank_0s_share(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_stats_on_rank, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):  # every rank logs the same global figures
        scalars = torch.load(tmp_path / f"rank{rank}.pt")
        assert scalars["loss/all"] == pytest.approx(69 / 6)
        assert scalars["loss/clean"] == pytest.approx(3.0)      # (1 + 3 + 5) / 3
        assert scalars["loss/ambient"] == pytest.approx(20.0)   # (10 + 20 + 30) / 3
        assert scalars["objective/ambient_fraction"] == pytest.approx(0.5)
