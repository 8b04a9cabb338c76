"""The DeepSpeed engine with two ranks on CPU (gloo, DS_ACCELERATOR=cpu, 127.0.0.1 only).

Ranks are started the way a cluster starts them -- one process each, RANK / WORLD_SIZE /
MASTER_ADDR in the environment -- so that a test can signal or kill one rank; the `torchrun`,
`deepspeed` and `mpirun` launchers each get a smoke test of their own. Each launch costs tens
of seconds on a 2-core machine (importing DeepSpeed dominates), hence the `slow` marks.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ambient_dist.config import ConfigError, load_config, to_dict
from ambient_dist.engine.checkpoint import CheckpointManager
from ambient_dist.engine.deepspeed_backend import deepspeed_config

from helpers import free_port, toy_overrides

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# Poisons one micro-batch loss on rank 0 (its third call) with NaN.
NAN_WORKER = """
import os, sys
from ambient_dist.engine import task
real_build_loss = task.build_loss

def poisoned_build_loss(cfg):
    loss_fn, calls = real_build_loss(cfg), [0]
    def poisoned(*args, **kwargs):
        out = loss_fn(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 3 and os.environ["RANK"] == "0":
            out.loss = out.loss * float("nan")
        return out
    return poisoned

task.build_loss = poisoned_build_loss  # what ImageTask builds its loss with
from ambient_dist.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


def rank_env(rank: int, world: int, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=str(ROOT))
    return env


def write_config(tmp: Path, shards_dir: Path, **extra) -> Path:
    options = {"distributed.engine": "deepspeed", "train.batch_per_gpu": 2,
               "train.total_kimg": 0.048, **extra}
    cfg = load_config(None, toy_overrides(shards_dir, tmp / "runs", **options))
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def start_ranks(script: list[str], args: list[str], world: int = 2) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen([PY, *script, *args], cwd=ROOT, env=rank_env(r, world, port),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in range(world)]


def finish(procs: list[subprocess.Popen], timeout: float = 400) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        out.append((p.returncode, text))
    return out


def train_ranks(args: list[str], script=None, world=2) -> list[tuple[int, str]]:
    results = finish(start_ranks(script or ["launchers/train.py"], args, world))
    for code, text in results:
        assert code == 0, text[-3000:]
    return results


def final_checkpoint(run: Path) -> Path:
    return CheckpointManager(run, 3).latest()


def rank_ema(ckpt: Path, rank: int) -> dict:
    return {k: v for k, v in load_file(str(ckpt / f"rank{rank:05d}.safetensors")).items()
            if k.startswith("ema.")}


def test_deepspeed_config_follows_our_config_and_checks_user_json(tmp_path):
    cfg = load_config(None, ["train.batch=64", "train.batch_per_gpu=8", "train.precision=bf16",
                             "optimizer.grad_clip=1.0", "distributed.zero_stage=3"])
    ds = deepspeed_config(cfg, world_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"]) == (64, 8, 4)
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == 1.0 and ds["data_types"]["grad_accum_dtype"] == "fp32"
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    cfg.distributed.deepspeed_config = str(user)
    with pytest.raises(Exception, match="train_batch_size = 32"):
        deepspeed_config(cfg, world_size=2)
    user.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 2}}))
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 64 and ds["zero_optimization"] == {"stage": 2}


def test_shipped_deepspeed_json_files_are_valid_for_our_batch_keys():
    cfg = load_config(None, ["train.batch=64"])
    for path in sorted((ROOT / "configs" / "deepspeed").glob("*.json")):
        cfg.distributed.deepspeed_config = str(path)
        ds = deepspeed_config(cfg, world_size=2)
        assert ds["train_micro_batch_size_per_gpu"] == 32, path


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_two_ranks_bf16_zero_stage_trains_and_the_ema_follows_the_fp32_masters(pixel_shards, tmp_path,  # noqa: F811
                                                                              stage):
    # Under bf16 DeepSpeed's module holds bf16 working copies and its optimizer the fp32
    # master weights, flattened and split over the ranks. The EMA must average the masters
    # (each rank its slice): with a zero half-life it is the masters, bit for bit, as
    # DeepSpeed's optimizer holds them -- which bf16 could not represent.
    config = write_config(tmp_path, pixel_shards, **{"train.precision": "bf16", "distributed.zero_stage": stage,
                                               "train.total_kimg": 0.096, "optimizer.lr": 3e-3,
                                               "train.ema_halflife_kimg": 0.0})
    train_ranks(["--config", str(config), "name=zero"])
    run = tmp_path / "runs" / "zero"
    ckpt = final_checkpoint(run)
    assert json.loads((ckpt / "meta.json").read_text())["images_seen"] == 96
    # The logged loss is the whole global batch's (both ranks), one value per 16 images: a
    # single interval is noisy (random sigma per sample), so compare halves of the run.
    losses = torch.tensor([e.value for e in EventAccumulator(str(run)).Reload().Scalars("loss/all")])
    assert len(losses) == 6 and torch.isfinite(losses).all()
    assert losses[3:].mean() < losses[:3].mean()
    exported = load_file(str(run / "ema.safetensors"))
    covered = {}
    for rank in (0, 1):
        # DeepSpeed's optimizer file: this rank's flat fp32 partition and, per parameter, the
        # (start, numel) of its fragment there. The EMA slice must be that fragment exactly.
        (optim_file,) = (ckpt / "deepspeed").glob(f"*zero_pp_rank_{rank}_*optim_states.pt")
        optim = torch.load(optim_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        (flat,), (where,) = optim["single_partition_of_fp32_groups"], optim["param_slice_mappings"]
        ema = rank_ema(ckpt, rank)
        for name, address in where.items():
            master = flat.narrow(0, address.start, address.numel)
            assert torch.equal(ema[f"ema.{name}"], master), (rank, name)
            covered[name] = covered.get(name, 0) + address.numel
    # Together the ranks' slices are each parameter once, and the export assembles them.
    assert len(covered) > 20 and all(covered[k] == exported[k].numel() for k in covered)
    assert any(not torch.equal(w, w.bfloat16().float()) for k, w in exported.items() if k in covered)
    assert (run / "samples.png").is_file() and (run / "memorization.json").is_file()
    assert (ckpt / "deepspeed").is_dir()  # DeepSpeed's own checkpoint, for its tooling


@pytest.mark.slow
def test_deepspeed_ema_equals_the_plain_engine_ema(pixel_shards, tmp_path):  # noqa: F811
    # One rank, fp32, ZeRO-1: the same steps as the plain engine, so the EMA of the fp32
    # master slices must be the plain engine's EMA up to fp32 rounding (DeepSpeed clips and
    # reduces gradients in its own order).
    config = write_config(tmp_path, pixel_shards, **{"distributed.zero_stage": 1,
                                               "train.ema_halflife_kimg": 0.02})
    train_ranks(["--config", str(config), "name=ds"], world=1)
    single = {k: v for k, v in rank_env(0, 1, 0).items()
              if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    plain = subprocess.run([PY, "launchers/train.py", "--config", str(config), "name=plain",
                            "distributed.engine=none"], cwd=ROOT, env=single,
                           capture_output=True, text=True, timeout=400)
    assert plain.returncode == 0, plain.stderr[-3000:]
    ds = load_file(str(tmp_path / "runs" / "ds" / "ema.safetensors"))
    plain = load_file(str(tmp_path / "runs" / "plain" / "ema.safetensors"))
    assert ds.keys() == plain.keys()
    for name, weight in plain.items():
        assert torch.allclose(ds[name], weight, rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
def test_sigterm_checkpoints_every_rank_and_resume_equals_uninterrupted(pixel_shards, tmp_path):  # noqa: F811
    config = write_config(tmp_path, pixel_shards, **{"distributed.zero_stage": 2, "train.total_kimg": 0.4})
    train_ranks(["--config", str(config), "name=straight"])

    procs = start_ranks(["launchers/train.py"], ["--config", str(config), "name=stopped"])
    latest = tmp_path / "runs" / "stopped" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGTERM)  # a preemption reaches every rank
    for code, text in finish(procs):
        assert code == 0, text[-3000:]
    stopped_at = json.loads((final_checkpoint(tmp_path / "runs" / "stopped") / "meta.json").read_text())
    assert 24 <= stopped_at["images_seen"] < 400, "the signal came too late to test a resume"

    train_ranks(["--config", str(config), "name=stopped", "--resume", "auto"])
    a = final_checkpoint(tmp_path / "runs" / "straight")
    b = final_checkpoint(tmp_path / "runs" / "stopped")
    assert a.name == b.name == "ckpt-000000000400"
    for rank in (0, 1):
        ema_a, ema_b = rank_ema(a, rank), rank_ema(b, rank)
        assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert load_file(str(tmp_path / "runs" / "straight" / "ema.safetensors")).keys() == \
        load_file(str(tmp_path / "runs" / "stopped" / "ema.safetensors")).keys()


@pytest.mark.slow
def test_a_checkpoint_of_the_earlier_layout_still_resumes_exactly(pixel_shards, tmp_path):  # noqa: F811
    # Until the EMA followed the fp32 master slices, every ZeRO 1-2 rank kept the EMA of the
    # whole model, and configs had no `task`. Rewrite a checkpoint into that layout: resuming
    # it must give, bit for bit, the run that was never interrupted.
    from safetensors.torch import save_file
    config = write_config(tmp_path, pixel_shards, **{"distributed.zero_stage": 2, "train.total_kimg": 0.096,
                                               "train.checkpoint_every_kimg": 0.048,
                                               "train.keep_checkpoints": 3})
    train_ranks(["--config", str(config), "name=straight"])
    straight, old = tmp_path / "runs" / "straight", tmp_path / "runs" / "old"
    shutil.copytree(straight, old)
    shutil.rmtree(old / "checkpoints" / "ckpt-000000000096")
    (old / "checkpoints" / "latest").write_text("ckpt-000000000048")
    ckpt = old / "checkpoints" / "ckpt-000000000048"
    shapes = {k: v.shape for k, v in load_file(str(straight / "ema.safetensors")).items()}
    parts = [load_file(str(ckpt / f"rank{r:05d}.safetensors")) for r in (0, 1)]
    rewritten = 0
    for rank in (0, 1):
        earlier = dict(parts[rank])
        for key, value in parts[rank].items():
            if key.startswith("ema.") and value.shape != shapes[key[4:]]:
                # Two ranks: rank 0 holds the front of the flat weights, rank 1 the rest.
                whole = torch.cat([parts[0][key].reshape(-1), parts[1][key].reshape(-1)])
                earlier[key] = whole.view(shapes[key[4:]])
                rewritten += 1
        save_file(earlier, str(ckpt / f"rank{rank:05d}.safetensors"))
    assert rewritten > 20
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["config"]["task"]
    (ckpt / "meta.json").write_text(json.dumps(meta))

    train_ranks(["--config", str(config), "name=old", "--resume", "auto"])
    a, b = load_file(str(straight / "ema.safetensors")), load_file(str(old / "ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_zero3_partitioned_ema_gathers_to_the_consolidated_weights(pixel_shards, tmp_path):  # noqa: F811
    # Under ZeRO-3 each rank averages only its partition of every parameter, and the
    # partitions are gathered for the export. With a zero half-life the EMA is exactly the
    # current fp32 weights, so the export must equal, bit for bit, the weights DeepSpeed's
    # own zero_to_fp32 tooling consolidates from the same checkpoint.
    # The real (toy-sized) DDPM++ runs here: its levels pass their skip connections in a
    # SkipStack, which ZeRO-3's hooks leave alone (a plain list would be copied and lost).
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    # Geometric augmentation is on too: its labels condition a partitioned embedding.
    config = write_config(tmp_path, pixel_shards, **{"distributed.zero_stage": 3,
                                               "train.ema_halflife_kimg": 0.0,
                                               "augment.p": 0.5, "network.augment_dim": 8})
    train_ranks(["--config", str(config), "name=z3"])
    run = tmp_path / "runs" / "z3"
    ckpt = final_checkpoint(run)
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))  # tag from its `latest`
    exported = load_file(str(run / "ema.safetensors"))
    assert consolidated.keys() <= exported.keys() and len(consolidated) > 20
    assert "unet.map_augment.weight" in consolidated
    for name, weight in consolidated.items():
        assert torch.equal(exported[name], weight.float()), name
    biggest = max(consolidated, key=lambda k: consolidated[k].numel())
    part = rank_ema(ckpt, 1)[f"ema.{biggest}"]
    assert part.numel() < exported[biggest].numel()  # rank 1 holds only its share


@pytest.mark.slow
def test_deepspeeds_zero_to_fp32_script_recovers_the_weights_the_standard_way(pixel_shards, tmp_path):  # noqa: F811
    # The README's command, exactly: the script DeepSpeed wrote into the checkpoint, given
    # only the checkpoint directory and an output directory -- no --tag. It reads the tag
    # from the `latest` file in that directory and merges the ranks' ZeRO-2 partitions of
    # the fp32 master weights. With a zero EMA half-life our ema.safetensors export is the
    # live fp32 weights, which the consolidated ones must equal.
    config = write_config(tmp_path, pixel_shards, **{"distributed.zero_stage": 2,
                                               "train.ema_halflife_kimg": 0.0})
    train_ranks(["--config", str(config), "name=fp32"])
    run = tmp_path / "runs" / "fp32"
    ckpt = final_checkpoint(run)
    assert ckpt.name == "ckpt-000000000048" and (ckpt / "zero_to_fp32.py").is_file()
    out = tmp_path / "consolidated"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([PY, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(out)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    recovered = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    ours = load_file(str(run / "ema.safetensors"))
    assert recovered.keys() == ours.keys()
    for name, weight in ours.items():
        assert recovered[name].dtype == torch.float32, name
        assert torch.allclose(recovered[name], weight), name


# Every zero_stage x precision pair our generated DeepSpeed config can ask for: each either
# trains or is refused by config validation, never left to fail inside DeepSpeed.
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_and_precision_trains_or_is_refused_up_front(pixel_shards, tmp_path, stage,  # noqa: F811
                                                                      precision):
    options = {"distributed.zero_stage": stage, "train.precision": precision,
               "train.total_kimg": 0.016, "train.checkpoint_every_kimg": 0.016}
    if (stage, precision) == (0, "bf16"):  # DeepSpeed has no fp32 gradient accumulation there
        with pytest.raises(ConfigError, match=r"^distributed\.zero_stage: 0 cannot be combined"):
            write_config(tmp_path, pixel_shards, **options)
        return
    config = write_config(tmp_path, pixel_shards, **options)
    train_ranks(["--config", str(config), "name=pair"])
    ckpt = final_checkpoint(tmp_path / "runs" / "pair")
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (meta["images_seen"], meta["bad_steps"]) == (16, 0)  # two steps, both applied
    ema = rank_ema(ckpt, 0)
    assert ema and all(torch.isfinite(v).all() for v in ema.values())


@pytest.mark.slow
def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(pixel_shards, tmp_path):  # noqa: F811
    worker = tmp_path / "worker.py"
    worker.write_text(NAN_WORKER)
    config = write_config(tmp_path, pixel_shards, **{"distributed.zero_stage": 2, "train.precision": "bf16"})
    train_ranks(["--config", str(config), "name=nan"], script=[str(worker)])
    ckpt = final_checkpoint(tmp_path / "runs" / "nan")
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["bad_steps"] == 1 and meta["images_seen"] == 48
    # Each rank averages its own slice of the weights: had either rank taken the NaN step, its
    # slice (and the assembled export) would not be finite.
    for rank in (0, 1):
        assert all(torch.isfinite(v).all() for v in rank_ema(ckpt, rank).values())
    exported = load_file(str(tmp_path / "runs" / "nan" / "ema.safetensors"))
    assert all(torch.isfinite(v).all() for v in exported.values())


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_instead_of_hanging(pixel_shards, tmp_path):  # noqa: F811
    config = write_config(tmp_path, pixel_shards, **{"train.total_kimg": 100, "distributed.timeout_s": 60})
    procs = start_ranks(["launchers/train.py"], ["--config", str(config), "name=dead"])
    run = tmp_path / "runs" / "dead"
    deadline = time.time() + 300
    while not list(run.glob("events.out.tfevents.*")) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # well into the training loop
    procs[1].kill()
    killed_at = time.time()
    code, text = finish(procs[:1], timeout=120)[0]
    finish(procs[1:])
    assert code != 0
    assert time.time() - killed_at < 90
    assert "rank 0 of 2 failed" in text


@pytest.mark.slow
def test_torchrun_deepspeed_mpirun_and_openmpi_hostfile_launchers(pixel_shards, tmp_path):  # noqa: F811
    config = write_config(tmp_path, pixel_shards, **{"train.total_kimg": 0.016, "distributed.zero_stage": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    launches = {
        "torchrun": [str(Path(PY).parent / "torchrun"), "--nproc_per_node", "2",
                     "--master_addr", "127.0.0.1", "--master_port", str(free_port())],
        "deepspeed": [str(Path(PY).parent / "deepspeed"), "--num_gpus", "2",
                      "--master_addr", "127.0.0.1", "--master_port", str(free_port())],
    }
    if shutil.which("mpirun"):
        launches["mpirun"] = ["mpirun", "-n", "2", "--oversubscribe", "--allow-run-as-root",
                              "--mca", "btl_tcp_if_include", "lo", "-x", "OMP_NUM_THREADS",
                              "-x", "DS_ACCELERATOR", "-x", "PYTHONPATH", "-x", "MASTER_PORT", PY]
        # DeepSpeed's multi-node code path (its Open MPI runner reading a hostfile), forced on
        # a hostfile of localhost slots. The ssh check is skipped: there is no sshd here, and
        # Open MPI starts local ranks without one.
        hosts = tmp_path / "hostfile"
        hosts.write_text("localhost slots=2\n")
        launches["deepspeed-openmpi"] = [
            str(Path(PY).parent / "deepspeed"), "--force_multi", "--launcher", "openmpi",
            "--hostfile", str(hosts), "--no_ssh_check", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "--launcher_args",
            "--allow-run-as-root --oversubscribe --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo"]
    for name, prefix in launches.items():
        env["MASTER_PORT"] = str(free_port())
        result = subprocess.run([*prefix, "launchers/train.py", "--config", str(config), f"name={name}"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{name}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        meta = json.loads((final_checkpoint(tmp_path / "runs" / name) / "meta.json").read_text())
        assert meta["world_size"] == 2 and meta["images_seen"] == 16, name
