"""ambient_dist.engine.power_ema: the power-function EMA in training (ema.kind=power) -- its
update rule, snapshots that survive kill -9 bit for bit, and ZeRO-3 slices that reconstruct to
the gathered EMA. Toy sizes as in test_engine_trainer.py."""
import filecmp
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ambient_dist.config import ConfigError, load_config, to_dict
from ambient_dist.engine.checkpoint import CheckpointManager
from ambient_dist.engine.ema import EMA
from ambient_dist.engine.power_ema import PowerEMA
from ambient_dist.engine.run import build_trainer
from ambient_dist.posthoc_ema import SNAPSHOT_DIR, gamma_from_sigma_rel, list_snapshots, reconstruct

from helpers import free_port, poison_loss, toy_overrides

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
POWER = {"ema.kind": "power", "ema.snapshot_every_kimg": 0.016}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_power_ema_follows_the_power_function_update_rule():
    torch.manual_seed(0)
    live = {"w": torch.randn(4)}
    main = EMA(live)
    power = PowerEMA(main, live, [0.05, 0.10])
    assert power.profiles[0] is main
    reference = [live["w"].clone(), live["w"].clone()]
    batch = 16
    for step in range(1, 11):
        live = {"w": live["w"] + torch.randn(4)}
        power.update(live, step * batch, batch)
        for j, s in enumerate((0.05, 0.10)):
            beta = (1 - batch / (step * batch)) ** (gamma_from_sigma_rel(s) + 1)
            reference[j] = beta * reference[j] + (1 - beta) * live["w"]
    for j in range(2):
        torch.testing.assert_close(power.profiles[j].shadow["w"], reference[j], rtol=1e-6, atol=1e-6)
    restored = PowerEMA(EMA({"w": torch.zeros(4)}), {"w": torch.zeros(4)}, [0.05, 0.10])
    restored.load_state_dict(power.state_dict())
    assert torch.equal(restored.profiles[1].shadow["w"], power.profiles[1].shadow["w"])


def test_power_ema_config_is_validated_by_key():
    with pytest.raises(ConfigError, match=r"^ema\.sigma_rels: needs at least two"):
        load_config(None, ["ema.kind=power", "ema.sigma_rels=[0.05]"])
    with pytest.raises(ConfigError, match=r"^ema\.sigma_rels: each must be in \(0, 0\.2887\)"):
        load_config(None, ["ema.kind=power", "ema.sigma_rels=[0.05,0.5]"])
    with pytest.raises(ConfigError, match=r"^ema\.sigma_rels: lists a value twice"):
        load_config(None, ["ema.kind=power", "ema.sigma_rels=[0.05,0.05]"])
    with pytest.raises(ConfigError, match=r"^ema\.snapshot_every_kimg: must be > 0"):
        load_config(None, ["ema.kind=power", "ema.snapshot_every_kimg=0"])
    with pytest.raises(ConfigError, match=r"^ema\.kind: 'edm2' is not one of"):
        load_config(None, ["ema.kind=edm2"])
    assert load_config(None, []).ema.kind == "classic"   # the classic EMA stays the default


def test_training_snapshots_reconstruct_the_tracked_emas(pixel_shards, tmp_path):
    cfg = load_config(None, toy_overrides(pixel_shards, tmp_path, **POWER))
    trainer = build_trainer(cfg, tmp_path / "r")
    assert trainer.train()
    assert [s.images_seen for s in list_snapshots(tmp_path / "r")] == [16, 32, 48]
    result = reconstruct(tmp_path / "r", [0.05, 0.08, 0.10])
    exported = load_file(str(tmp_path / "r" / "ema.safetensors"))   # the first sigma_rel's EMA
    second = trainer.power_ema.profiles[1].state_dict()
    for sigma_rel, tracked in ((0.05, exported), (0.10, second)):
        path, fit_error = result[sigma_rel]
        rebuilt = load_file(str(path))
        assert rebuilt.keys() == tracked.keys()
        for k, v in tracked.items():   # float32 round-off of a float64 sum with ~0 coefficients
            torch.testing.assert_close(rebuilt[k], v, rtol=2e-7, atol=1e-7)
        assert fit_error < 1e-6
    assert 0 < result[0.08][1] < 0.5
    between = load_file(str(result[0.08][0]))   # neither tracked EMA: a third average
    assert any(not torch.allclose(between[k], v) for k, v in exported.items())
    assert any(not torch.allclose(between[k], v) for k, v in second.items())


def test_a_skipped_step_still_moves_the_power_ema_toward_the_unchanged_weights(pixel_shards, tmp_path):
    # The profiles weigh every span of images; over a skipped step (non-finite loss) the
    # weights are the previous step's, and the average must take them in for that span.
    from ambient_dist.posthoc_ema import power_beta
    cfg = load_config(None, toy_overrides(pixel_shards, tmp_path, **POWER, **{"optimizer.lr": 0.05}))
    trainer = build_trainer(cfg, tmp_path / "r")
    for _ in range(3):   # the averages now differ from the live weights
        trainer.train_step()
    poison_loss(trainer)
    live = {k: v.clone() for k, v in trainer.backend.module.state_dict().items()}
    before = [{k: v.clone() for k, v in ema.state_dict().items()} for ema in trainer.power_ema.profiles]
    trainer.train_step()
    assert trainer.bad_steps == 1
    assert all(torch.equal(live[k], v) for k, v in trainer.backend.module.state_dict().items())
    for gamma, ema, old in zip(trainer.power_ema.gammas, trainer.power_ema.profiles, before):
        beta = power_beta(gamma, 32, 8)   # the skipped step ended at 32 images
        largest = 0.0
        for k, v in ema.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(v, old[k].lerp(live[k], 1 - beta), rtol=1e-6, atol=1e-7)
                largest = max(largest, (v - old[k]).abs().max().item())
        assert largest > 1e-5   # the update is 100x the tolerance: the test is not vacuous


# Dies by SIGKILL in the middle of writing a snapshot: its own part is written, meta.json not.
KILL_WORKER = """
import os, signal, sys
from ambient_dist.engine import power_ema
real = power_ema.write_snapshot_meta
def dying(path, meta):
    if meta["images_seen"] == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, meta)
power_ema.write_snapshot_meta = dying
from ambient_dist.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


def _train(args, env_extra=None, worker=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    cmd = [PY, "-c", worker, *args] if worker else [PY, "launchers/train.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def test_kill_9_then_resume_gives_the_uninterrupted_runs_snapshots_bit_for_bit(pixel_shards, tmp_path):
    # Checkpoints at 24 and 48 images, a snapshot every step (8 images); the process dies by
    # SIGKILL at 40 images, after the checkpoint at 24 and a complete snapshot at 32, halfway
    # through the snapshot at 40. The resume replays from 24 and must write the same bytes.
    overrides = toy_overrides(pixel_shards, tmp_path / "runs", **{
        "ema.kind": "power", "ema.snapshot_every_kimg": 0.008, "train.total_kimg": 0.064})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(to_dict(load_config(None, overrides))))
    straight = _train(["--config", str(config), "name=straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = _train(["--config", str(config), "name=killed"], {"KILL_AT": "40"}, KILL_WORKER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / "runs" / "killed"
    assert CheckpointManager(run, 3).latest().name == "ckpt-000000000024"
    assert [s.images_seen for s in list_snapshots(run)] == [8, 16, 24, 32]
    assert (run / SNAPSHOT_DIR / "snapshot-000000000040" / "rank00000.safetensors").is_file()

    resumed = _train(["--config", str(config), "name=killed", "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = tmp_path / "runs" / "straight" / SNAPSHOT_DIR, run / SNAPSHOT_DIR
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) == 8
    for name in names:
        files = sorted(p.name for p in (a / name).iterdir())
        assert files == ["meta.json", "rank00000.safetensors"]
        assert filecmp.cmp(a / name / files[1], b / name / files[1], shallow=False), name
        # meta.json differs only in the config's fingerprint, which hashes the run's name
        meta_a, meta_b = (json.loads((d / name / "meta.json").read_text()) for d in (a, b))
        assert meta_a.pop("fingerprint") != meta_b.pop("fingerprint") and meta_a == meta_b
    assert not list(b.rglob(".*tmp*"))   # no temporary file left behind


def _two_ranks(args: list[str]) -> None:
    """ambient-train on two CPU ranks (gloo), started as a cluster starts them (one process each,
    RANK / WORLD_SIZE in the environment), as tests/test_engine_deepspeed_backend.py does."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([PY, "launchers/train.py", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_two_zero3_ranks_reconstruct_the_single_process_result(pixel_shards, tmp_path):  # noqa: F811
    # Two ranks draw their own noise, so no single process reproduces their training; what must
    # agree is the EMA: each rank snapshots only its ZeRO-3 partition of the fp32 masters, and
    # one process assembling those slices must give (a) the tracked EMA the run gathered with
    # its all-reduce (ema.safetensors) and (b) for any sigma_rel, the reconstruction from the
    # same snapshots written whole, as one rank would write them (assembled here by plain
    # concatenation of the rank partitions). Both to float32 round-off: the weights are the same
    # ones, unlike the ZeRO-vs-plain EMA test (rtol 1e-4), whose two trajectories differ by
    # DeepSpeed's order of gradient reduction.
    from ambient_dist.posthoc_ema import rank_file, write_snapshot_meta, write_snapshot_part
    cfg = load_config(None, toy_overrides(pixel_shards, tmp_path / "runs", **{
        **POWER, "distributed.engine": "deepspeed", "distributed.zero_stage": 3,
        "train.batch_per_gpu": 2}))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    _two_ranks(["--config", str(config), "name=z3"])
    run = tmp_path / "runs" / "z3"
    snapshots = list_snapshots(run)
    assert [(s.images_seen, s.world_size) for s in snapshots] == [(16, 2), (32, 2), (48, 2)]
    exported = load_file(str(run / "ema.safetensors"))
    biggest = max(exported, key=lambda k: exported[k].numel())
    part = load_file(str(rank_file(snapshots[-1].path, 1)))
    assert part[f"0/{biggest}"].numel() < exported[biggest].numel()   # rank 1 holds a slice

    sharded = reconstruct(run, [0.05, 0.08])
    rebuilt = load_file(str(sharded[0.05][0]))
    assert rebuilt.keys() == exported.keys()
    for k, v in exported.items():
        torch.testing.assert_close(rebuilt[k], v, rtol=2e-7, atol=1e-7)

    single = tmp_path / "single"
    for s in snapshots:
        parts = [load_file(str(rank_file(s.path, r))) for r in range(2)]
        whole = []
        for j in range(len(s.sigma_rels)):
            profile = {}
            for name, ref in exported.items():
                key = f"{j}/{name}"
                if key in parts[1]:   # a partitioned parameter: rank 0's chunk, then rank 1's
                    flat = torch.cat([parts[0][key].reshape(-1), parts[1][key].reshape(-1)])
                    profile[name] = flat[:ref.numel()].view(ref.shape)
                else:
                    profile[name] = parts[0][key]
            whole.append(profile)
        path = single / SNAPSHOT_DIR / s.path.name
        write_snapshot_part(path, 0, whole, {})
        write_snapshot_meta(path, {**json.loads((s.path / "meta.json").read_text()), "world_size": 1})
    one = reconstruct(single, [0.05, 0.08])
    for sigma_rel in (0.05, 0.08):
        a, b = load_file(str(sharded[sigma_rel][0])), load_file(str(one[sigma_rel][0]))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=2e-7, atol=1e-7)
        assert sharded[sigma_rel][1] == pytest.approx(one[sigma_rel][1], rel=1e-12)
    # The checkpoint holds every rank's slices of the other profile, for an exact resume.
    ckpt = CheckpointManager(run, 3).latest()
    state = load_file(str(ckpt / "rank00001.safetensors"))
    assert torch.equal(state[f"power_ema.1/{biggest}"], part[f"1/{biggest}"])


@pytest.mark.slow
def test_a_zero2_run_resumed_from_an_earlier_checkpoint_rewrites_the_same_snapshots(pixel_shards,  # noqa: F811
                                                                                     tmp_path):
    # ZeRO-2 on two ranks: each rank's EMA is a fragment of the flat fp32 masters (some
    # parameters hold no element on a rank). The run is cut back to its checkpoint at 24 images,
    # as a crash there would leave it; the resumed ranks must restore every profile's fragment
    # from their checkpoint files and write the snapshots at 32 and 48 again, bit for bit.
    import shutil
    cfg = load_config(None, toy_overrides(pixel_shards, tmp_path / "runs", **{
        **POWER, "distributed.engine": "deepspeed", "distributed.zero_stage": 2,
        "train.batch_per_gpu": 4}))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    _two_ranks(["--config", str(config), "name=z2"])
    run, cut = tmp_path / "runs" / "z2", tmp_path / "cut"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / "ckpt-000000000048")
    (cut / "checkpoints" / "latest").write_text("ckpt-000000000024\n")
    for name in ("snapshot-000000000032", "snapshot-000000000048"):
        shutil.rmtree(cut / SNAPSHOT_DIR / name)
    _two_ranks(["--config", str(config), "--run-dir", str(cut), "--resume", "auto"])
    for s in list_snapshots(run):
        for part in ("rank00000.safetensors", "rank00001.safetensors"):
            assert filecmp.cmp(s.path / part, cut / SNAPSHOT_DIR / s.path.name / part, shallow=False), \
                (s.path.name, part)
    assert [s.images_seen for s in list_snapshots(cut)] == [16, 32, 48]
    (path, fit_error), = reconstruct(cut, [0.05]).values()
    rebuilt, exported = load_file(str(path)), load_file(str(cut / "ema.safetensors"))
    for k, v in exported.items():
        torch.testing.assert_close(rebuilt[k], v, rtol=2e-7, atol=1e-7)
    assert fit_error < 1e-6
