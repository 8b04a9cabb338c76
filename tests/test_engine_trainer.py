"""The single-process training path, end to end at toy size (CPU, seconds per test).

Real modules throughout (networks, objective, data loader, sampler, memorization summary);
only the sizes are tiny: 32 training images of 16x16, a U-Net with 8 channels.
"""
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from ambient_dist.config import ConfigError, load_config, to_dict
from ambient_dist.data import ShardOptions
from ambient_dist.engine import trainer as trainer_mod
from ambient_dist.engine.run import check_output_dir, find_resume_point
from ambient_dist.engine.checkpoint import CheckpointManager
from ambient_dist.engine.run import build_trainer
from ambient_dist.engine.trainer import Trainer
from ambient_dist.models import build_network
from helpers import poison_loss, random_grey_shards, toy_overrides

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launchers"))
import train as train_launcher  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def toy_config(shards, run_root, **extra):
    return load_config(None, toy_overrides(shards, run_root, **extra))


def test_quickstart_path_from_config_to_samples_and_memorization(pixel_shards, tmp_path, capsys):
    config_file = tmp_path / "toy.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(toy_config(pixel_shards, tmp_path / "runs"))))
    assert train_launcher.main(["--config", str(config_file), "name=toy"]) == 0
    run = tmp_path / "runs" / "toy"
    cfg = load_config(run / "config.yaml")
    assert cfg == load_config(config_file, ["name=toy"])  # the saved config reproduces the run
    assert CheckpointManager(run, 3).latest().name == "ckpt-000000000048"
    assert list(run.glob("events.out.tfevents.*"))
    net = build_network(cfg)
    net.load_state_dict(load_file(str(run / "ema.safetensors")))  # what the sampler loads
    grid = Image.open(run / "samples.png")
    assert grid.size == (2 * 16, 2 * 16)  # 4 samples of 16x16 in a 2x2 grid
    summary = json.loads((run / "memorization.json").read_text())
    assert summary["feature_space"].startswith("pixels")
    assert summary["generated"]["count"] == 4 and summary["heldout"]["count"] == 8
    assert len(summary["generated"]["max_similarity"]) == 4
    attraction = summary["attraction"]   # held-out images noised, denoised, compared
    assert set(attraction["per_sigma"]) == {"0.5", "1", "2"} and attraction["count"] == 8
    assert all(v["mean_ratio"] > 0 for v in attraction["per_sigma"].values())
    printed = capsys.readouterr().out
    assert "memorization: nearest of 32 training images" in printed and "run directory" in printed
    assert "denoiser attraction of 8 held-out images" in printed
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 1 and info["fingerprint"] == cfg.fingerprint()


def test_the_ema_is_gathered_once_per_checkpoint_and_not_again_at_the_end(pixel_shards, tmp_path):
    # Under ZeRO a gather of the EMA is a collective over the whole model: the end of the run
    # (export, samples, memorization) reuses the last checkpoint's instead of gathering again.
    from ambient_dist.engine.run import finish
    cfg = toy_config(pixel_shards, tmp_path)   # 48 images, checkpoints at 24 and 48
    trainer = build_trainer(cfg, tmp_path / "r")
    gathers = []
    real = trainer.backend.full_weights
    trainer.backend.full_weights = lambda state: gathers.append(trainer.images_seen) or real(state)
    assert trainer.train() and finish(trainer) is not None
    assert gathers == [24, 48]
    assert [p.name for p in CheckpointManager(tmp_path / "r", 3).list()] == \
        ["ckpt-000000000024", "ckpt-000000000048"]
    from safetensors import safe_open
    with safe_open(str(tmp_path / "r" / "ema.safetensors"), "pt") as f:
        assert f.metadata()["images_seen"] == "48"


def test_tensorboard_has_the_promised_scalars(pixel_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = toy_config(pixel_shards, tmp_path)
    build_trainer(cfg, tmp_path / "run").train()
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("loss/all", "loss/clean", "loss/ambient", "objective/ambient_fraction",
                "train/lr", "perf/images_per_s", "train/grad_norm"):
        assert tag in tags, tag
    assert "objective/log_sigma" in events.Tags()["histograms"]
    memory = "perf/peak_memory_gib" if torch.cuda.is_available() else "perf/peak_rss_gib"
    assert events.Scalars(memory)[-1].value > 0
    steps = [e.step for e in events.Scalars("loss/all")]
    assert steps == [16, 32, 48]  # x axis: images seen


def _state(trainer: Trainer) -> dict:
    return {**{f"net.{k}": v.clone() for k, v in trainer.backend.module.state_dict().items()},
            **{f"ema.{k}": v.clone() for k, v in trainer.ema.state_dict().items()}}


@pytest.mark.parametrize("augmentation", [{}, {"augment.p": 0.5, "network.augment_dim": 8}],
                         ids=["xflip", "geometric-augment"])
def test_resume_equals_uninterrupted_run_bitwise(pixel_shards, tmp_path, augmentation):
    # Dropout and x-flips are on, so the global RNG, the noise generator and the loader
    # position all have to be restored for this to hold (and the augmentation draws too).
    cfg = toy_config(pixel_shards, tmp_path, **augmentation)
    straight = build_trainer(cfg, tmp_path / "a")
    losses_straight = [straight.train_step().item() for _ in range(6)]

    first = build_trainer(cfg, tmp_path / "b")
    losses_resumed = [first.train_step().item() for _ in range(3)]
    first.save_checkpoint()
    del first
    second = build_trainer(cfg, tmp_path / "b", resume_from=CheckpointManager(tmp_path / "b", 3).latest())
    assert second.images_seen == 24
    losses_resumed += [second.train_step().item() for _ in range(3)]

    assert losses_resumed == losses_straight
    a, b = _state(straight), _state(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt_a, opt_b = straight.backend.optimizer.state_dict(), second.backend.optimizer.state_dict()
    for p in opt_a["state"]:
        assert torch.equal(opt_a["state"][p]["exp_avg_sq"], opt_b["state"][p]["exp_avg_sq"])


def test_augmented_run_pictures_what_the_loss_read(pixel_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = toy_config(pixel_shards, tmp_path, **{"augment.p": 1.0, "network.augment_dim": 8,
                                          "train.total_kimg": 0.016})
    trainer = build_trainer(cfg, tmp_path / "run")
    trainer.train()
    picture = Image.open(tmp_path / "run" / "augmentation.png")
    assert picture.size == (3 * 16, 3 * 16)  # the 8 images of the first micro-batch, 3x3 grid
    assert "augmentation" in EventAccumulator(str(tmp_path / "run")).Reload().Tags()["images"]
    assert trainer.task.augment.recorded is None and not trainer.task.augment.record  # once only


def test_train_to_a_longer_total_continues_through_the_loop(pixel_shards, tmp_path):
    short = toy_config(pixel_shards, tmp_path, **{"train.total_kimg": 0.024})
    long = toy_config(pixel_shards, tmp_path, **{"train.total_kimg": 0.048})
    build_trainer(short, tmp_path / "b").train()
    resumed = build_trainer(long, tmp_path / "b", resume_from=find_resume_point(tmp_path / "b", "auto"))
    resumed.train()
    straight = build_trainer(long, tmp_path / "a")
    straight.train()
    a, b = _state(straight), _state(resumed)
    assert resumed.images_seen == straight.images_seen == 48
    assert all(torch.equal(a[k], b[k]) for k in a)


# Exact resume on every loader and worker count: N images straight, and N/2 then --resume to N,
# give the same model and EMA bit for bit, with x-flips, dropout and augmentation on or off.
# 8x8 images and N = 64 keep each run under a second.
EXACT_N_KIMG = 0.064
LOADERS = [("resident", 0), ("webdataset", 0), ("webdataset", 1), ("webdataset", 2),
           ("dali", 1), ("dali", 2)]
AUGMENT = {"flips": {}, "augment": {"augment.p": 0.5, "network.augment_dim": 8}}


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    """32 training + 8 held-out random 8x8 grey images."""
    return random_grey_shards(tmp_path_factory.mktemp("tiny"), 40, 8,
                              ShardOptions(resolution=8, channels=1, sigma_tn=0.5, count=32, heldout=8,
                                           samples_per_shard=16))


def tiny_config(shards, run_root, loader, workers, augment, total_kimg, **extra):
    # One checkpoint, at the end of each run: the resume point of the half run.
    return toy_config(shards, run_root, **{
        "data.resolution": 8, "network.attn_resolutions": "[4]", "data.loader": loader,
        "data.workers": workers, "train.total_kimg": total_kimg,
        "train.checkpoint_every_kimg": 1000, **AUGMENT[augment], **extra})


def train_tiny(shards, run, loader, workers, augment, total_kimg, resume=False, **extra) -> Trainer:
    cfg = tiny_config(shards, run.parent, loader, workers, augment, total_kimg, **extra)
    trainer = build_trainer(cfg, run, resume_from=find_resume_point(run, "auto") if resume else None)
    trainer.train()
    trainer.loader.close()
    return trainer


def differing(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def straight_runs(tiny_shards, tmp_path_factory):
    """(loader, workers, augment) -> model and EMA state after N images straight (cached)."""
    cache = {}

    def get(loader, workers, augment):
        if (loader, workers, augment) not in cache:
            run = tmp_path_factory.mktemp("straight") / "run"
            trainer = train_tiny(tiny_shards, run, loader, workers, augment, EXACT_N_KIMG)
            assert trainer.images_seen == 64
            cache[loader, workers, augment] = _state(trainer)
        return cache[loader, workers, augment]
    return get


@pytest.mark.parametrize("augment", list(AUGMENT))
@pytest.mark.parametrize("loader,workers", LOADERS, ids=[f"{n}-{w}" for n, w in LOADERS])
def test_resume_is_exact_on_every_loader_and_worker_count(tiny_shards, straight_runs, tmp_path,
                                                          loader, workers, augment):
    # Field case: data.loader=webdataset (even with 0 workers) resumed to 140 of 142 EMA
    # tensors off, because starting the DataLoader drew from the restored global RNG.
    run = tmp_path / "run"
    train_tiny(tiny_shards, run, loader, workers, augment, EXACT_N_KIMG / 2)
    resumed = train_tiny(tiny_shards, run, loader, workers, augment, EXACT_N_KIMG, resume=True)
    assert resumed.images_seen == 64
    straight = straight_runs(loader, workers, augment)
    assert differing(straight, _state(resumed)) == []
    # No loader touches the RNGs the run draws from, so every loader trains the same run.
    assert differing(straight, straight_runs("resident", 0, augment)) == []


@pytest.mark.parametrize("first,then", [(("webdataset", 2), ("resident", 0)),
                                        (("resident", 0), ("dali", 2)),
                                        (("dali", 1), ("webdataset", 1))],
                         ids=["webdataset-2-then-resident", "resident-then-dali-2",
                              "dali-1-then-webdataset-1"])
def test_resume_may_change_the_loader_and_its_workers(tiny_shards, straight_runs, tmp_path, first, then):
    # data.loader and data.workers are resumable changes (checkpoint.RESUMABLE_CHANGES): they
    # must not change the trajectory.
    run = tmp_path / "run"
    train_tiny(tiny_shards, run, *first, "augment", EXACT_N_KIMG / 2)
    resumed = train_tiny(tiny_shards, run, *then, "augment", EXACT_N_KIMG, resume=True)
    assert differing(straight_runs("resident", 0, "augment"), _state(resumed)) == []


def test_train_launcher_resume_on_webdataset_workers_is_exact(tiny_shards, straight_runs, tmp_path):
    # The field case as typed: ambient-train to N/2, then --resume auto to N (run_training's
    # own steps between the restore and the first step must not draw either).
    overrides = toy_overrides(tiny_shards, tmp_path, **{
        "data.resolution": 8, "network.attn_resolutions": "[4]", "data.loader": "webdataset",
        "data.workers": 2, "train.checkpoint_every_kimg": 1000})
    args = [*overrides_config(tmp_path, overrides), "--run-dir", str(tmp_path / "run")]
    assert train_launcher.main([*args, f"train.total_kimg={EXACT_N_KIMG / 2}"]) == 0
    assert train_launcher.main(["--resume", "auto", *args, f"train.total_kimg={EXACT_N_KIMG}"]) == 0
    ema = load_file(str(tmp_path / "run" / "ema.safetensors"))
    straight = {k[len("ema."):]: v for k, v in straight_runs("resident", 0, "flips").items()
                if k.startswith("ema.")}
    assert differing(straight, ema) == []


def test_a_sample_grid_at_the_resume_point_leaves_resume_exact(tiny_shards, straight_runs, tmp_path):
    # The straight run draws a grid at N/2 (sample_every), the run stopped there does not (its
    # last step): building the grid's network drew from the global RNG that dropout uses.
    every = {"train.sample_every_kimg": EXACT_N_KIMG / 2}
    straight = train_tiny(tiny_shards, tmp_path / "a", "resident", 0, "flips", EXACT_N_KIMG, **every)
    train_tiny(tiny_shards, tmp_path / "b", "resident", 0, "flips", EXACT_N_KIMG / 2, **every)
    resumed = train_tiny(tiny_shards, tmp_path / "b", "resident", 0, "flips", EXACT_N_KIMG, resume=True,
                         **every)
    assert differing(_state(straight), _state(resumed)) == []
    # and a run that draws grids is the run that draws none
    assert differing(_state(straight), straight_runs("resident", 0, "flips")) == []


def test_rng_states_are_restored_after_the_loader_is_started(tiny_shards, tmp_path, monkeypatch):
    # A loader that draws from the global RNG when built or started (none of ours does) draws
    # in a fresh run too, before its first step: the restored states must come after it.
    from ambient_dist.engine.task import ImageTask
    real = ImageTask.build_loader

    def drawing_loader(self, *args):
        torch.rand(3)
        return real(self, *args)
    monkeypatch.setattr(ImageTask, "build_loader", drawing_loader)
    straight = train_tiny(tiny_shards, tmp_path / "a", "resident", 0, "flips", EXACT_N_KIMG)
    train_tiny(tiny_shards, tmp_path / "b", "resident", 0, "flips", EXACT_N_KIMG / 2)
    resumed = train_tiny(tiny_shards, tmp_path / "b", "resident", 0, "flips", EXACT_N_KIMG, resume=True)
    assert differing(_state(straight), _state(resumed)) == []


def test_resume_refuses_options_that_change_the_trajectory(pixel_shards, tmp_path):
    cfg = toy_config(pixel_shards, tmp_path, **{"train.total_kimg": 0.008})
    build_trainer(cfg, tmp_path / "r").train()
    changed = toy_config(pixel_shards, tmp_path, **{"objective.sigma_tn": 1.0})
    with pytest.raises(ConfigError, match="objective.sigma_tn: 0.5 -> 1.0"):
        build_trainer(changed, tmp_path / "r", resume_from=find_resume_point(tmp_path / "r", "auto"))


def test_checkpoints_from_before_an_option_existed_resume_at_its_default(tmp_path):
    from ambient_dist.engine.checkpoint import check_resume_compatible
    cfg = load_config(None, ["train.batch=8"])
    saved = to_dict(cfg)
    del saved["augment"], saved["train"]["cudnn_benchmark"]  # written by an older version
    check_resume_compatible(saved, cfg, tmp_path)            # defaults: the run had neither
    augmented = load_config(None, ["train.batch=8", "augment.p=0.15", "network.augment_dim=8"])
    with pytest.raises(ConfigError, match=r"augment\.p: 0\.0 -> 0\.15"):
        check_resume_compatible(saved, augmented, tmp_path)


def test_existing_run_needs_resume_and_auto_starts_fresh_when_empty(pixel_shards, tmp_path):
    assert find_resume_point(tmp_path / "new", "auto") is None
    build_trainer(toy_config(pixel_shards, tmp_path, **{"train.total_kimg": 0.008}), tmp_path / "r").train()
    with pytest.raises(ConfigError, match="--resume auto"):
        find_resume_point(tmp_path / "r", None)
    with pytest.raises(ConfigError, match="no checkpoint"):
        find_resume_point(tmp_path / "new", str(tmp_path / "new"))


def test_sigterm_checkpoints_and_stops_cleanly(pixel_shards, tmp_path, monkeypatch):
    cfg = toy_config(pixel_shards, tmp_path, **{"train.total_kimg": 10})
    trainer = build_trainer(cfg, tmp_path / "r")
    real_step = trainer.train_step

    def step_then_preempt():
        loss = real_step()
        if trainer.steps == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what a cluster scheduler sends
        return loss
    monkeypatch.setattr(trainer, "train_step", step_then_preempt)
    assert trainer.train() is False  # stopped early, no exception
    latest = CheckpointManager(tmp_path / "r", 3).latest()
    assert CheckpointManager.load(latest).meta["images_seen"] == 16
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_non_finite_loss_skips_the_step_and_a_streak_stops_the_run(pixel_shards, tmp_path, monkeypatch):
    trainer = build_trainer(toy_config(pixel_shards, tmp_path), tmp_path / "r")
    trainer.train_step()
    poison_loss(trainer)
    before = _state(trainer)
    trainer.train_step()
    after = _state(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and EMA untouched
    assert trainer.bad_steps == 1 and trainer.images_seen == 16
    monkeypatch.setattr(trainer_mod, "MAX_BAD_STEPS_IN_A_ROW", 3)
    trainer.train_step()
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        trainer.train_step()


def test_bf16_channels_last_and_accumulation_step(pixel_shards, tmp_path):
    cfg = toy_config(pixel_shards, tmp_path, **{"train.precision": "bf16", "train.channels_last": True,
                                          "train.batch_per_gpu": 4, "optimizer.grad_clip": 1.0})
    trainer = build_trainer(cfg, tmp_path / "r")
    assert trainer.accumulation == 2
    before = [p.detach().clone() for p in trainer.backend.module.parameters()]
    losses = [trainer.train_step() for _ in range(3)]
    assert all(torch.isfinite(loss) for loss in losses)
    assert trainer.images_seen == 24 and trainer.loader.samples_seen == 24
    assert all(p.dtype == torch.float32 for p in trainer.backend.module.parameters())  # fp32 master weights
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.backend.module.parameters()))


def test_output_directory_problems_are_reported_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="not writable"):
        check_output_dir(blocker / "run", 0)
    with pytest.raises(ConfigError, match="GiB free"):
        check_output_dir(tmp_path / "run", 2**60)


def test_describe_prints_config_parameters_and_gflop(capsys):
    argv = ["--config", str(ROOT / "configs" / "fashion-mnist-300.yaml"), "--describe", "data.shards="]
    assert train_launcher.main(argv) == 0
    out = capsys.readouterr().out
    assert "name: fashion-mnist-300" in out and "sigma_tn: 0.5" in out
    cfg = load_config(ROOT / "configs" / "fashion-mnist-300.yaml", ["data.shards="])
    params = sum(p.numel() for p in build_network(cfg).parameters())
    assert f"parameters: {params}\n" in out
    gflop = float(out.split("train GFLOP/image:")[1].split()[0])
    assert gflop > 0


def test_launcher_reports_config_errors_by_key(capsys, tmp_path):
    argv = ["--config", str(ROOT / "configs" / "fashion-mnist-300.yaml"), "data.shards=",
            "objective.sigma_tn=-1"]
    assert train_launcher.main(argv) == 2
    assert "objective.sigma_tn" in capsys.readouterr().err


def test_resume_at_another_world_size_stops_with_a_clear_message(pixel_shards, tmp_path):
    from ambient_dist.distributed import DistInfo
    cfg = toy_config(pixel_shards, tmp_path, **{"train.total_kimg": 0.008})
    build_trainer(cfg, tmp_path / "r").train()
    two_ranks = DistInfo(rank=0, world_size=2)
    with pytest.raises(ConfigError, match="written by 1 ranks; this run has 2"):
        build_trainer(cfg, tmp_path / "r", dist_info=two_ranks,
                resume_from=find_resume_point(tmp_path / "r", "auto"))


def test_output_check_is_safe_when_every_rank_probes_the_same_directory(tmp_path):
    # Every rank of a job checks the shared run directory at once; their probes must not
    # collide (one rank deleting another's probe file failed a 2-rank run).
    from concurrent.futures import ThreadPoolExecutor
    run = tmp_path / "shared-run"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: [check_output_dir(run, 0) for _ in range(100)], range(8)))
    assert not list(run.iterdir())  # no probe left behind


def test_a_damaged_shard_is_one_error_line_in_every_launcher(pixel_shards, tmp_path, capsys):
    """Field case: one flipped byte in a shard tar reached the user as a Python traceback."""
    import shutil

    from helpers import load_launcher
    damaged = tmp_path / "damaged"
    shutil.copytree(pixel_shards, damaged)
    tar = sorted(damaged.glob("train-*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0x01
    tar.write_bytes(bytes(data))
    overrides = toy_overrides(damaged, tmp_path / "runs")
    capsys.readouterr()
    assert train_launcher.main(overrides_config(tmp_path, overrides)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tar}: checksum mismatch") and "Traceback" not in err
    run = tmp_path / "ok" / "toy"
    assert train_launcher.main(overrides_config(tmp_path, toy_overrides(pixel_shards, tmp_path / "ok")) + ["name=toy"]) == 0
    capsys.readouterr()
    assert load_launcher("evaluate").main([str(run), "--shards", str(damaged), "--no-fid", "--quiet",
                                           "--num", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "checksum mismatch" in err and "Traceback" not in err


def overrides_config(tmp_path, overrides: list[str]) -> list[str]:
    """train.py arguments: an empty config file plus the overrides."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    return ["--config", str(empty), *overrides]


def test_resume_on_remade_shards_is_refused_naming_what_changed(tmp_path, capsys):
    """Field case: shards of the same images remade with --noise-seed 1, then
    `train.py --resume RUN data.shards=<new>`: every fixed noisy copy was silently swapped."""
    opts = dict(resolution=16, channels=1, sigma_tn=0.5, count=32, heldout=8, samples_per_shard=16)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = random_grey_shards(tmp_path / "a", 40, 16, ShardOptions(**opts, noise_seed=0))
    second = random_grey_shards(tmp_path / "b", 40, 16, ShardOptions(**opts, noise_seed=1))
    run = tmp_path / "runs" / "toy"
    assert train_launcher.main(overrides_config(tmp_path, toy_overrides(first, tmp_path / "runs")) + ["name=toy"]) == 0
    capsys.readouterr()
    rc = train_launcher.main(["--resume", str(run), f"data.shards={second}", "train.total_kimg=0.064"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: data.shards") and "noise_seed 0 then, 1 now" in err
    assert "one fixed noisy copy per image" in err and "Traceback" not in err
    # The same shards resume as before.
    assert train_launcher.main(["--resume", str(run), "train.total_kimg=0.064"]) == 0


@pytest.mark.parametrize("loader, workers", [("resident", 0), ("webdataset", 0), ("webdataset", 1),
                                             ("webdataset", 2), ("dali", 1)])
def test_a_bad_noisy_copy_read_by_a_loader_worker_is_one_error_line(pixel_shards, tmp_path, capsys,
                                                                    monkeypatch, loader, workers):
    """Field case (issue 22, 5): a stored noisy copy holding a NaN, read with
    data.loader=webdataset data.workers=1, was shown as "Caught ShardError in DataLoader worker
    process 0." and the worker's traceback; now every loader, in whichever process or thread
    reads it, gives the resident loader's line."""
    import io

    import numpy as np

    from ambient_dist.data.shards import ShardSet
    decode = ShardSet.decode_noisy

    def with_a_nan(self, i, data):   # the worker (a fork of this process) reads through it
        if i == 3:
            noisy = np.load(io.BytesIO(data))
            noisy.flat[7] = np.nan
            buf = io.BytesIO()
            np.save(buf, noisy)
            data = buf.getvalue()
        return decode(self, i, data)
    monkeypatch.setattr(ShardSet, "decode_noisy", with_a_nan)
    key = ShardSet(pixel_shards).keys[3]
    overrides = toy_overrides(pixel_shards, tmp_path / "runs", **{"data.loader": loader,
                                                                  "data.workers": workers})
    capsys.readouterr()
    assert train_launcher.main(overrides_config(tmp_path, overrides)) == 2
    err = capsys.readouterr().err   # the progress bar's lines, then the error
    assert "Traceback" not in err and "Caught" not in err, err
    assert err.count("error: ") == 1 and err.splitlines()[-1].startswith("error: ")
    assert err.endswith(
        f"key {key}: noisy copy holds 1 non-finite values (NaN or inf); the shard was written "
        "by something else or damaged: remake it with make_shards\n")


def test_run_json_records_provenance_resolved_fields_and_notes(pixel_shards, tmp_path, capsys, monkeypatch):
    """run.json (issue 22, cases 6 and 7): the package version and the revision of its own
    checkout (this one), library versions, the fields resolved for the world size, and what
    the run does other than the config says -- also said on screen, once."""
    import importlib.metadata
    import subprocess

    from ambient_dist import progress
    from ambient_dist.engine.run import write_run_info
    monkeypatch.setattr(progress, "_SAID", set())
    monkeypatch.delenv("RANK", raising=False)
    cfg = toy_config(pixel_shards, tmp_path, **{"objective.method": "noise_only", "sampling.sigma_min": 0.002,
                                                "train.total_kimg": 0.05, "train.batch": 8})
    write_run_info(tmp_path, cfg, world_size=2)
    info = json.loads((tmp_path / "run.json").read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert info["git_revision"] == head and isinstance(info["git_dirty"], bool)
    assert info["version"] == importlib.metadata.version("ambient_dist")
    assert info["torch"] == importlib.metadata.version("torch") and "cuda" in info and info["numpy"]
    assert info["resolved"] == {"task": "image", "world_size": 2, "batch_per_gpu": 4, "accumulation_steps": 1}
    assert info["notes"] == [
        "train.total_kimg 0.05 is 50 images, not a whole number of train.batch 8: training runs "
        "to 56 images (steps are whole batches)",
        "sampling.sigma_min 0.002 replaced by objective.sigma_tn = 0.5: objective.method=noise_only "
        "never learned below sigma_tn, so sampling stops there and returns the denoiser's estimate "
        "D(x; sigma_tn)"]
    assert capsys.readouterr().out == "".join(f"note: {n}\n" for n in info["notes"])
    write_run_info(tmp_path, toy_config(pixel_shards, tmp_path), world_size=1)
    assert json.loads((tmp_path / "run.json").read_text())["notes"] == []
