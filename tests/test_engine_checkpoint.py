"""Engine building blocks on their own: lr ramp, EMA semantics, atomic checkpoints, logging."""

import pytest
import torch

from ambient_dist.config import OptimizerConfig
from ambient_dist.engine import checkpoint as ckpt_mod
from ambient_dist.engine.checkpoint import (Checkpoint, CheckpointManager,
                                            export_safetensors_atomic)
from ambient_dist.engine.ema import EMA, ema_beta
from ambient_dist.engine.logging import TrainingStats
from ambient_dist.engine.lr import learning_rate, set_learning_rate


# -- learning-rate ramp -------------------------------------------------------------------

def test_lr_ramps_linearly_in_images_then_stays_constant():
    opt = OptimizerConfig(lr=2e-4, lr_rampup_kimg=10)  # ramp over 10,000 images
    assert learning_rate(opt, 0) == 0.0  # EDM: the very first step runs at rate 0
    assert learning_rate(opt, 2_500) == pytest.approx(0.5e-4)
    assert learning_rate(opt, 5_000) == pytest.approx(1e-4)
    assert learning_rate(opt, 10_000) == pytest.approx(2e-4)
    assert learning_rate(opt, 10_000_000) == pytest.approx(2e-4)


def test_lr_without_ramp_is_the_full_rate_from_the_start():
    assert learning_rate(OptimizerConfig(lr=3e-4, lr_rampup_kimg=0), 0) == 3e-4


def test_set_learning_rate_sets_every_group():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [p1]}, {"params": [p2]}], lr=1.0)
    set_learning_rate(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


# -- EMA ------------------------------------------------------------------------------------

def test_ema_beta_is_a_half_life_in_images():
    # No ramp: after `halflife` images (in any batch split) the old average weighs one half.
    for batch in (1, 64, 500):
        beta = ema_beta(10**9, batch, halflife_kimg=0.5, rampup_ratio=0)
        assert beta ** (500 / batch) == pytest.approx(0.5)


def test_ema_beta_ramp_caps_the_half_life_early_in_training():
    # At 1,000 images with ratio 0.05 the half-life is 50 images, not 500,000.
    beta = ema_beta(1_000, 10, halflife_kimg=500, rampup_ratio=0.05)
    assert beta == pytest.approx(0.5 ** (10 / 50))
    assert ema_beta(0, 10, 500, 0.05) == 0.0  # first step: the EMA becomes the weights
    assert ema_beta(10**9, 10, 500, 0.05) == pytest.approx(0.5 ** (10 / 500_000))


def test_ema_follows_edm_update_rule_step_by_step():
    torch.manual_seed(0)
    live = {"w": torch.randn(5), "steps": torch.tensor(0)}
    ema = EMA(live)
    reference = live["w"].clone()
    images, batch = 0, 8
    for step in range(20):
        live["w"] = live["w"] + torch.randn(5)
        live["steps"] = torch.tensor(step + 1)
        beta = ema_beta(images, batch, halflife_kimg=0.1, rampup_ratio=0.05)
        ema.update(live, beta)
        reference = beta * reference + (1 - beta) * live["w"]  # EDM: lerp(p_net, p_ema, beta)
        images += batch
    torch.testing.assert_close(ema.shadow["w"], reference, rtol=1e-6, atol=1e-6)
    assert ema.shadow["steps"].item() == 20  # integer buffers are copied, not averaged


def test_ema_first_update_with_beta_zero_equals_the_weights_exactly():
    ema = EMA({"w": torch.zeros(4)})
    w = torch.tensor([1e10, -3.0, 1e-20, 7.0])
    ema.update({"w": w}, 0.0)
    assert torch.equal(ema.shadow["w"], w)


def test_ema_of_bf16_weights_is_kept_in_float32():
    # 0.999 decay steps are far below bf16 resolution near 1.0; a bf16 average would not move.
    ema = EMA({"w": torch.ones(3, dtype=torch.bfloat16)})
    assert ema.shadow["w"].dtype == torch.float32
    for _ in range(10):
        ema.update({"w": torch.full((3,), 2.0, dtype=torch.bfloat16)}, 0.999)
    expected = 2 - 0.999 ** 10
    assert ema.shadow["w"][0].item() == pytest.approx(expected, rel=1e-5)


def test_ema_state_roundtrip_and_copy_to_module():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA.of_module(net)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update(net.state_dict(), 0.5)
    other = EMA.of_module(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)))
    other.load_state_dict(ema.state_dict())
    target = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    other.copy_to(target)
    assert torch.equal(target[0].weight, ema.shadow["0.weight"])
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({"0.weight": torch.zeros(2, 3)})


# -- checkpoints ----------------------------------------------------------------------------

def _checkpoint(value: float, images: int) -> Checkpoint:
    opt_param = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([opt_param])
    opt_param.grad = torch.ones(2)
    opt.step()
    return Checkpoint(model={"w": torch.full((3, 3), value)}, ema={"w": torch.full((3, 3), -value)},
                      rng={"torch": torch.get_rng_state()},
                      state={"optimizer": opt.state_dict(), "loader": {"position": images}},
                      meta={"images_seen": images})


def test_checkpoint_roundtrip_latest_and_keep_last_k(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    assert mgr.latest() is None
    for i, images in enumerate((100, 200, 300)):
        mgr.save(_checkpoint(float(i), images), images)
    assert [p.name for p in mgr.list()] == ["ckpt-000000000200", "ckpt-000000000300"]
    assert mgr.latest().name == "ckpt-000000000300"
    loaded = CheckpointManager.load(mgr.latest())
    assert torch.equal(loaded.model["w"], torch.full((3, 3), 2.0))
    assert torch.equal(loaded.ema["w"], torch.full((3, 3), -2.0))
    assert loaded.state["loader"] == {"position": 300}
    assert loaded.meta["images_seen"] == 300
    assert "exp_avg" in loaded.state["optimizer"]["state"][0]


def test_crash_while_writing_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep=1)
    mgr.save(_checkpoint(1.0, 100), 100)

    def dies_mid_write(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")  # a half-written file, then the process is gone
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(ckpt_mod.torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(_checkpoint(2.0, 200), 200)
    monkeypatch.undo()

    assert mgr.latest().name == "ckpt-000000000100"
    assert [p.name for p in mgr.list()] == ["ckpt-000000000100"]  # the partial one is hidden
    assert torch.equal(CheckpointManager.load(mgr.latest()).model["w"], torch.full((3, 3), 1.0))
    # The next successful save cleans up the stray temporary directory.
    mgr.save(_checkpoint(3.0, 300), 300)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert mgr.latest().name == "ckpt-000000000300"


def test_crash_before_latest_is_updated_keeps_the_old_pointer_valid(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(_checkpoint(1.0, 100), 100)
    monkeypatch.setattr(ckpt_mod, "atomic_write_text",
                        lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        mgr.save(_checkpoint(2.0, 200), 200)
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "ckpt-000000000100"
    assert CheckpointManager.load(mgr.latest()).meta["images_seen"] == 100


def test_loading_an_incomplete_checkpoint_names_the_missing_file(tmp_path):
    path = CheckpointManager(tmp_path, keep=1).save(_checkpoint(1.0, 100), 100)
    (path / "ema.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        CheckpointManager.load(path)


class ArbitraryObject:
    pass


def test_checkpoint_state_is_never_unpickled_beyond_plain_data(tmp_path):
    path = CheckpointManager(tmp_path, keep=1).save(_checkpoint(1.0, 100), 100)
    torch.save({"evil": ArbitraryObject()}, path / "state.pt")  # would run code on unpickling
    with pytest.raises(Exception, match="[Ww]eights only"):
        CheckpointManager.load(path)


def test_export_safetensors_atomic_writes_loadable_file_with_metadata(tmp_path):
    from safetensors import safe_open
    target = tmp_path / "ema.safetensors"
    export_safetensors_atomic({"a": torch.arange(6.0).reshape(2, 3).t()}, target, {"images_seen": "7"})
    with safe_open(str(target), "pt") as f:
        assert f.metadata()["images_seen"] == "7"
        assert torch.equal(f.get_tensor("a"), torch.arange(6.0).reshape(2, 3).t())
    assert [p.name for p in tmp_path.iterdir()] == ["ema.safetensors"]


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


