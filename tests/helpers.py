"""Plain helpers shared by several test files (fixtures live in tests/conftest.py): builders,
writers of real source formats, constants and small functions. Test files import from here,
never from each other.

Importable as `helpers` because pytest puts tests/ on sys.path; spawned worker processes
inherit that path, so functions used there may come from here too.
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import random
import socket
import struct
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from ambient_dist.config import load_config, save_config
from ambient_dist.data import make_shards, open_source
from ambient_dist.models import build_network

ROOT = Path(__file__).resolve().parent.parent


def load_launcher(name: str):
    """Import launchers/<name>.py as a module (launchers/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"launcher_{name}", ROOT / "launchers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def poison_loss(trainer) -> None:
    """From now on the trainer's loss is NaN (every step non-finite: skipped by the trainer)."""
    real_loss = trainer.task.loss_fn

    def poisoned(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out
    trainer.task.loss_fn = poisoned


def perturb(net: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Give zero/near-zero-initialised layers real weights, so the network output is not ~0.

    EDM initialises the last layer to zero, which would make D = c_skip x at init.
    """
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


def write_toy_run(cfg, run: Path, seed: int) -> Path:
    """A run directory as training leaves it (config + EMA weights) for a seeded, perturbed
    network built from `cfg`, without training: enough for the sampling/evaluation launchers."""
    save_config(cfg, run)
    torch.manual_seed(seed)
    net = perturb(build_network(cfg))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(run / "ema.safetensors"))
    return run


def random_grey_shards(root: Path, count: int, side: int, opts) -> Path:
    """`count` random side x side grey images (seed 0) saved as root/source.npz and made into
    shards under root/shards with the ShardOptions `opts`; returns the shard directory."""
    images = (np.random.default_rng(0).random((count, side, side)) * 255).astype(np.uint8)
    np.savez(root / "source.npz", images=images)
    make_shards(open_source(str(root / "source.npz")), root / "shards", opts, progress=False)
    return root / "shards"


def global_random_states() -> tuple:
    """torch's (CPU), numpy's and Python's global RNG states, as a tuple that compares with ==
    (what a loader must leave as it found it)."""
    kind, keys, pos, *_ = np.random.get_state()
    return torch.get_rng_state().numpy().tobytes(), (kind, keys.tobytes(), pos), random.getstate()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Pixel training at toy size (test_engine_trainer.py, test_engine_deepspeed_backend.py)
# --------------------------------------------------------------------------------------------

def toy_overrides(shards: Path, run_root: Path, **extra) -> list[str]:
    options = {
        "data.shards": str(shards), "data.resolution": 16, "data.channels": 1, "data.subset": 32,
        "network.model_channels": 8, "network.channel_mult": "[1,2]", "network.num_blocks": 1,
        "network.attn_resolutions": "[8]", "network.dropout": 0.1,
        "optimizer.lr": 1e-3, "optimizer.lr_rampup_kimg": 0.016,
        "train.batch": 8, "train.total_kimg": 0.048, "train.log_every_kimg": 0.016,
        "train.checkpoint_every_kimg": 0.024, "train.sample_every_kimg": 1000,
        "train.ema_halflife_kimg": 0.05, "train.run_root": str(run_root),
        "sampling.steps": 3, "sampling.num_images": 4,
        "evaluation.memorization_features": "pixels", "evaluation.heldout_images": 8,
    }
    options.update(extra)
    return [f"{k}={v}" for k, v in options.items()]


# --------------------------------------------------------------------------------------------
# Writers of the real source formats (the readers are tested in test_data_sources.py)
# --------------------------------------------------------------------------------------------

def random_images(n, h, w, c, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """LeCun's idx: 0, 0, type code 0x08 (ubyte), ndim, big-endian uint32 dims, raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = Path(str(path) + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_mnist_dir(root: Path, n_train=40, n_test=10, gz=True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), gz)
    return root


def write_cifar10_dir(root: Path, per_batch=6) -> Path:
    """cifar-10-batches-py: data_batch_1..5, test_batch, batches.meta (Python-2 style pickles)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": [int(x) for x in rng.integers(0, 10, per_batch)],
                 b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"img_{k}.png".encode() for k in range(per_batch)]}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"class{k}".encode() for k in range(10)], b"num_cases_per_batch": per_batch}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def write_cifar100_tgz(path: Path, n=12) -> Path:
    rng = np.random.default_rng(3)
    with tarfile.open(path, "w:gz") as tar:
        for name in ("train", "test"):
            batch = {b"fine_labels": [int(x) for x in rng.integers(0, 100, n)],
                     b"coarse_labels": [0] * n, b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
            data = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        data = pickle.dumps({b"fine_label_names": [f"c{k}".encode() for k in range(100)]}, protocol=2)
        info = tarfile.TarInfo("cifar-100-python/meta")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def write_folder(root: Path, per_class=3, size=(20, 24), classes=("cat", "dog")) -> Path:
    rng = np.random.default_rng(4)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            img = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
            img.save(root / c / f"{c}.{k}.{'png' if k % 2 == 0 else 'jpg'}")
    return root


def write_img2dataset(root: Path, n=8, per_shard=5) -> Path:
    """Shards as img2dataset writes them, written with webdataset's own TarWriter."""
    import webdataset as wds
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for shard in range((n + per_shard - 1) // per_shard):
        with wds.TarWriter(str(root / f"{shard:05d}.tar")) as sink:
            for k in range(shard * per_shard, min(n, (shard + 1) * per_shard)):
                buf = io.BytesIO()
                fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][k % 3]
                Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(buf, format=fmt)
                key = f"{shard:05d}{k:04d}"
                sink.write({"__key__": key, ext: buf.getvalue(), "txt": f"caption {k}",
                            "json": {"key": key, "url": f"http://127.0.0.1/{k}.jpg", "status": "success",
                                     "width": 30, "height": 40, "label": k % 2}})
    return root


def jpeg_bytes(seed: int, size=(40, 30)) -> bytes:
    """A random RGB JPEG of `size` (H, W), different for each seed."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_wds_tar(path: Path, samples: list[dict], stats: int | None = None) -> Path:
    """A WebDataset tar of `samples` ({"__key__", ext: bytes or str}) in that order, written
    with webdataset's own TarWriter (a key may repeat, as after a restarted download); with
    `stats`, also img2dataset's <shard>_stats.json recording that many successes."""
    import json
    import webdataset as wds
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    if stats is not None:
        Path(str(path)[:-4] + "_stats.json").write_text(json.dumps(
            {"count": stats + 1, "successes": stats, "failed_to_download": 1, "failed_to_resize": 0}))
    return path


def cut_tar_after(path: Path, members: int) -> int:
    """Cut the tar at `path` after its first `members` members, at a member boundary (what a
    killed copy leaves: no end-of-archive blocks); return the new length in bytes."""
    with tarfile.open(path) as tar:
        infos = tar.getmembers()
    cut = infos[members].offset
    path.write_bytes(path.read_bytes()[:cut])
    return cut


# --------------------------------------------------------------------------------------------
# Text-conditional (latent) data at toy size
# --------------------------------------------------------------------------------------------

RES = 32  # pixels; latents are 4 x 4 x 4


def latent_config(shards, model, *overrides):
    return load_config(None, [f"data.shards={shards}", "objective.form=latent_v", "objective.sigma_tn=1",
                              "objective.t_n=50", f"data.resolution={RES}", "data.xflip=false",
                              "train.batch=4", f"text.model_path={model}", *overrides])


# --------------------------------------------------------------------------------------------
# A stand-in preconditioned network and data for the objective (also run in a child process)
# --------------------------------------------------------------------------------------------

SD = 0.5


def edm_scalings(sigma, sd=SD):
    return sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt(), \
        1 / (sigma ** 2 + sd ** 2).sqrt(), sigma.log() / 4


class FakePrecond(nn.Module):
    """A Precond stand-in: EDM scalings around a tiny conv (the real ones live in models/)."""
    sigma_data = SD

    def __init__(self, channels=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.calls = []

    def scalings(self, sigma):
        return edm_scalings(sigma)

    def raw(self, net_in, c_noise, labels=None):
        self.calls.append((net_in.shape, labels))
        return self.conv(net_in) * (1 + c_noise.reshape(-1, 1, 1, 1))

    def forward(self, x, sigma, labels=None):
        c_skip, c_out, c_in, c_noise = self.scalings(sigma.reshape(-1, 1, 1, 1))
        return c_skip * x + c_out * self.raw(c_in * x, c_noise.flatten(), labels)


def images(n=16, c=3, r=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, c, r, r, generator=g) * 2 - 1
    return x0, torch.randn(n, c, r, r, generator=g)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Studies and processes (test_study*.py, test_engine_run.py)
# --------------------------------------------------------------------------------------------

# A toy study (tests/test_study*.py): 8 px Fashion-MNIST, a few dozen images, a 96-image run.
TOY_STUDY = {
    "name": "toy",
    "base": str(ROOT / "configs" / "fashion-mnist-300.yaml"),
    "subset_sizes": [12],
    "seeds": [0],
    "overrides": ["data.resolution=8", "network.attn_resolutions=[]", "network.model_channels=8",
                  "train.total_kimg=0.096", "train.batch=16", "train.log_every_kimg=0.048",
                  "train.checkpoint_every_kimg=0.048", "optimizer.lr_rampup_kimg=0",
                  "sampling.steps=3"],
    "data": {"source": "fashion-mnist", "heldout": 24},
    "runs": [{"name": "ddpm", "sigma_tn": 0.0}, {"name": "ambient-0.5", "sigma_tn": 0.5}],
    "evaluation": {"num_samples": 8, "calibration_images": 12, "quality_reference": 20,
                   "attraction_images": 6, "attraction_sigmas": [1.0, 2.0], "figure_sigma": 2.0,
                   "figure_rows": 2, "batch": 32},
}


def write_study(directory: Path, study: dict, name: str = "study.yaml") -> Path:
    """Write a study file (yaml) into `directory`; returns its path."""
    import yaml
    path = Path(directory) / name
    path.write_text(yaml.safe_dump(study))
    return path


class StandInInception(nn.Module):
    """A tiny CNN with Inception's interface (images [N, 3, H, W] -> features [N, 8]): saved
    as TorchScript and given as evaluation.inception_path / --inception-path, it goes through
    the real loading path at a fraction of Inception's cost."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 9, stride=8)

    def forward(self, x):
        return self.conv(x).tanh().mean((2, 3))


def write_standin_inception(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.jit.script(StandInInception().eval()).save(str(path))
    return path


def toy_study(**changes) -> dict:
    """TOY_STUDY with some keys replaced; `total_kimg` replaces the training length. Pixel
    memorization only by default (evaluation.features []): the process tests need no Inception."""
    study = {**TOY_STUDY, "evaluation": {**TOY_STUDY["evaluation"], "features": []},
             **{k: v for k, v in changes.items() if k != "total_kimg"}}
    if "total_kimg" in changes:
        study["overrides"] = [o for o in study["overrides"] if not o.startswith("train.total_kimg=")]
        study["overrides"].append(f"train.total_kimg={changes['total_kimg']}")
    return study


def wait_for(predicate, timeout_s: float = 300.0, what: str = "condition", poll_s: float = 0.1):
    """Poll predicate() until it is true; fail the test (AssertionError) after timeout_s. A
    guard against a hung test, not a timing assertion."""
    import time
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


def descendants(pid: int) -> list[int]:
    """Every living descendant of process `pid` (read from /proc: Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    """Is `pid` a running process (not a zombie)?"""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
