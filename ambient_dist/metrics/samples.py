"""Sampling at scale: load a trained denoiser, split N images over ranks, store them resumably.

The sampler itself is `ambient_dist.sampling.edm_sample` (image n has its own seed, so the
output does not depend on the batch size or on which rank draws it). This module does what
is around it for ambient-sample and ambient-evaluate:

    load_denoiser(...)       config.yaml + EMA weights (a run directory, an exported
                             .safetensors file, or a checkpoints/ckpt-* directory)
    SampleStore              the output directory, in one of two layouts:
                               png: <out>/000000/000123.png  (1000 images per folder)
                               wds: <out>/samples-000000.tar (WebDataset shards of
                                    `shard_size` consecutive images: <n>.png [+ <n>.cls])
                             plus samples.json (what made them). Work is cut in blocks of
                             consecutive indices; block b belongs to rank b % world. A PNG is
                             written via temp file + rename and a shard only when complete,
                             so an interrupted run resumes by skipping what exists.
    generate(...)            the loop: this rank's pending images, batch by batch, with tqdm
    sample_run(...)          samples.json check + generate (what both launchers call)
    read_samples(path)       images back as uint8 [N, C, H, W] (either layout, or any
                             image folder, through data.sources.FolderSource)
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ambient_dist import sampling
from ambient_dist.config import ExperimentConfig, load_config
from ambient_dist.data.loader import data_differences, data_identity
from ambient_dist.data.shards import read_manifest, tar_member
from ambient_dist.data.sources import IMAGE_EXTENSIONS, FolderSource, decode_image_bytes, tar_end_problem
from ambient_dist.errors import UserError
from ambient_dist.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from ambient_dist.images import encode_png, to_uint8
from ambient_dist.progress import progress as progress_bar
from ambient_dist.provenance import provenance

META_NAME = "samples.json"
PNG_PER_FOLDER = 1000


class SampleStoreError(UserError):
    """The output directory holds something else, or cannot be read; names the path."""


# --------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------

def resolve_weights(run_dir: Optional[str | os.PathLike], checkpoint: Optional[str | os.PathLike],
                    ema: Optional[str | os.PathLike] = None) -> Path:
    """The EMA weights file to sample from.

    --ema is a weights file in ema.safetensors' layout (a post-hoc EMA of ambient-posthoc-ema).
    --checkpoint may be an exported .safetensors file or a checkpoints/ckpt-* directory (its
    ema.safetensors). A run directory gives its exported ema.safetensors, else the EMA of the
    checkpoint named by checkpoints/latest."""
    if ema:
        if not Path(ema).is_file():
            raise SampleStoreError(f"--ema {ema}: no such weights file (make one with "
                                   "ambient-posthoc-ema RUN_DIR --sigma-rel S)")
        return Path(ema)
    if checkpoint:
        path = Path(checkpoint)
        if path.is_dir():
            path = path / "ema.safetensors"
        if not path.is_file():
            raise SampleStoreError(f"--checkpoint {checkpoint}: no weights file {path}")
        return path
    if not run_dir:
        raise SampleStoreError("give a run directory or --checkpoint")
    run = Path(run_dir)
    if (run / "ema.safetensors").is_file():
        return run / "ema.safetensors"
    latest = run / "checkpoints" / "latest"
    if latest.is_file():
        path = run / "checkpoints" / latest.read_text().strip() / "ema.safetensors"
        if path.is_file():
            return path
    raise SampleStoreError(f"run directory {run}: neither ema.safetensors nor a checkpoint "
                           "(train it first, or pass --checkpoint)")


def load_denoiser(run_dir=None, checkpoint=None, config=None, device="cpu", overrides=None,
                  ema=None) -> tuple[torch.nn.Module, ExperimentConfig, Path]:
    """(network in eval mode on `device`, its config with the `section.key=value` overrides
    applied, the weights file it was loaded from: `resolve_weights(run_dir, checkpoint, ema)`)."""
    from safetensors.torch import load_file

    from ambient_dist.models import build_network
    config_path = Path(config) if config else (Path(run_dir) / "config.yaml" if run_dir else None)
    if config_path is None or not config_path.is_file():
        raise SampleStoreError(f"config {config_path}: not found (give a run directory or --config)")
    cfg = load_config(config_path, overrides)
    weights = resolve_weights(run_dir, checkpoint, ema)
    net = build_network(cfg)
    try:
        net.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise SampleStoreError(f"{weights}: weights do not fit the network of {config_path} ({e})") from None
    return net.eval().requires_grad_(False).to(device), cfg, weights


class TrainingDataError(UserError):
    """Shards given as a run's training set are not the data the run was trained on."""


def recorded_training_data(run_dir: str | os.PathLike) -> Optional[tuple[Path, dict]]:
    """(checkpoint, what it records of the data it was trained on: data.loader.data_identity
    plus the loader position) of a run's latest checkpoint, or None when the run has no
    checkpoint (a bare exported model). Read from meta.json, or from state.pt for
    checkpoints written before meta.json held it (those also record it, with the loader)."""
    run = Path(run_dir)
    latest = run / "checkpoints" / "latest"
    ckpt = run / "checkpoints" / latest.read_text().strip() if latest.is_file() else None
    if ckpt is None or not (ckpt / "meta.json").is_file():
        return None
    meta = json.loads((ckpt / "meta.json").read_text())
    if "data" in meta:
        return ckpt, meta["data"]
    state = ckpt / "state.pt"
    if state.is_file():
        saved = torch.load(state, map_location="cpu", weights_only=True, mmap=True).get("loader")
        if saved and "manifest_plan" in saved:
            return ckpt, saved
    return None


def check_training_data(run_dir: str | os.PathLike, shards: str | os.PathLike, option: str) -> None:
    """Refuse `shards` as the training set of the run in `run_dir` unless they hold the data
    its latest checkpoint was trained on: the check resume makes (data.loader.data_differences
    on the manifest's plan hash), made before evaluating against them too. `option` names
    where the shards came from (e.g. "data.shards of RUN/config.yaml", "--shards"). Runs
    without a checkpoint are not checked (nothing records their data). Pixel and latent
    shards alike (both manifests hold the plan hash)."""
    recorded = recorded_training_data(run_dir)
    if recorded is None:
        return
    ckpt, saved = recorded
    now = data_identity(read_manifest(shards), shards)
    diffs = data_differences(saved, now)
    if diffs:
        raise TrainingDataError(
            f"{option} ({shards}) is not the data run {run_dir} was trained on (checkpoint "
            f"{ckpt.name} records {saved.get('shards', 'other shards')}): {'; '.join(diffs)}. "
            "Give the run's own shards (--shards, or data.shards=...), or evaluate the samples "
            "with --samples and --shards without the run")


# --------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------

@dataclass
class SampleMeta:
    """What made the images; a resumed run must match it (or it would mix two sample sets)."""
    num: int
    seed: int
    image_shape: list[int]
    weights_sha: str          # sha256 of the weights file, first 16 hex digits
    sampler: dict
    layout: str
    shard_size: int
    labels: str               # "none", "cycle" (n % classes) or "class=<k>"
    # Not part of what makes the sample set (a set recorded without them is the same set):
    # what was changed of the settings asked for (SamplerSettings.notes), in words, and what
    # made the images (package version and revision, library versions: ambient_dist.provenance).
    notes: list = field(default_factory=list)
    provenance: dict = field(default_factory=provenance)


# The fields of samples.json that describe, rather than define, the sample set.
DESCRIPTIVE = ("num", "notes", "provenance")


def recorded_meta(root: str | os.PathLike) -> Optional[dict]:
    """The samples.json of a sample folder (what made its images), or None without one."""
    path = Path(root) / META_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def file_digest(path: Path) -> str:
    return sha256_file(path)[:16]


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


class SampleStore:
    def __init__(self, root: str | os.PathLike, layout: str = "png", shard_size: int = 1000):
        if layout not in ("png", "wds"):
            raise SampleStoreError(f"--format must be png or wds, got {layout!r}")
        if shard_size < 1:
            raise SampleStoreError(f"--shard-size must be >= 1, got {shard_size}")
        self.root, self.layout, self.block = Path(root), layout, shard_size

    # layout -------------------------------------------------------------------------
    def png_path(self, n: int) -> Path:
        return self.root / f"{n // PNG_PER_FOLDER:06d}" / f"{n:06d}.png"

    def shard_path(self, b: int) -> Path:
        return self.root / f"samples-{b:06d}.tar"

    def blocks(self, num: int, rank: int = 0, world: int = 1) -> list[range]:
        """This rank's blocks of consecutive image indices (block b goes to rank b % world)."""
        count = -(-num // self.block)
        return [range(b * self.block, min((b + 1) * self.block, num))
                for b in range(rank, count, world)]

    def pending(self, block: range) -> list[int]:
        if self.layout == "wds":
            return [] if self.shard_path(block.start // self.block).is_file() else list(block)
        return [n for n in block if not self.png_path(n).is_file()]

    # metadata -----------------------------------------------------------------------
    def check_meta(self, meta: SampleMeta) -> None:
        """Write samples.json, or check that the one there describes the same sample set.

        The count is not part of what makes a sample set: image n depends only on (weights,
        seed, sampler, n), so a set of 12 serves a request for 6 (its first 6) and one for 20
        (8 more are made, and samples.json records 20)."""
        wanted = asdict(meta)
        have = recorded_meta(self.root)
        if have is not None:
            diff = {k: (have.get(k), v) for k, v in wanted.items()
                    if k not in DESCRIPTIVE and have.get(k) != v}
            if diff:
                raise SampleStoreError(
                    f"{self.root} holds samples made differently ({'; '.join(f'{k}: {a} there, {b} now' for k, (a, b) in diff.items())}); "
                    "choose another --out or delete it")
            if have.get("num", 0) >= meta.num:
                return
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / META_NAME, wanted)

    # writing ------------------------------------------------------------------------
    def write(self, block: range, indices: list[int], pixels: torch.Tensor,
              labels: Optional[torch.Tensor], staged: dict) -> None:
        """Store uint8 images [B, C, H, W] for `indices` (all inside `block`).

        PNGs go straight to disk; shard members are staged until the block is complete."""
        arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
        for j, n in enumerate(indices):
            png = encode_png(arrays[j])
            if self.layout == "png":
                _write_atomic(self.png_path(n), png)
            else:
                staged[n] = (png, None if labels is None else int(labels[j]))
        if self.layout == "wds" and len(staged) == len(block):
            self._write_shard(block, staged)
            staged.clear()

    def _write_shard(self, block: range, staged: dict) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for n in block:
                png, label = staged[n]
                members = [(f"{n:06d}.png", png)]
                if label is not None:
                    members.append((f"{n:06d}.cls", str(label).encode()))
                for name, data in members:
                    tar_member(tar, name, data, mode=0o644)  # reproducible bytes
        _write_atomic(self.shard_path(block.start // self.block), buf.getvalue())


def generate(net, store: SampleStore, num: int, batch: int, seed: int,
             settings: sampling.SamplerSettings, rank: int = 0, world: int = 1,
             fixed_class: Optional[int] = None, autocast_dtype=None, guidance=None,
             device="cpu", progress: bool = True) -> int:
    """Make this rank's missing images; returns how many it made."""
    todo = [(block, store.pending(block)) for block in store.blocks(num, rank, world)]
    total = sum(len(p) for _, p in todo)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    bar = progress_bar(total=total, desc=f"sampling (rank {rank})", unit="img", disable=not progress)
    for block, pending in todo:
        staged: dict = {}
        for start in range(0, len(pending), batch):
            indices = pending[start:start + batch]
            labels = sampling.class_labels(indices, net.label_dim, fixed_class)
            images = sampling.edm_sample(net, indices, shape, seed=seed,
                                         labels=None if labels is None else labels.to(device),
                                         settings=settings, guidance=guidance,
                                         autocast_dtype=autocast_dtype, device=device)
            store.write(block, indices, to_uint8(images), labels, staged)
            bar.update(len(indices))
    bar.close()
    return total


def sample_run(net, weights: Path, out: str | os.PathLike, num: int, seed: int,
               settings: sampling.SamplerSettings, batch: int = 256, layout: str = "png",
               shard_size: int = 1000, fixed_class: Optional[int] = None,
               guidance_scale: Optional[float] = None, autocast_dtype=None,
               rank: int = 0, world: int = 1, device="cpu", progress: bool = True) -> int:
    """Check (or record) samples.json for this sample set, then make this rank's missing
    images; returns how many it made. What ambient-sample and evaluate.py both run."""
    settings.check()
    if fixed_class is not None and not 0 <= fixed_class < max(net.label_dim, 1):
        raise SampleStoreError(f"--class {fixed_class}: the network has {net.label_dim} classes")
    store = SampleStore(out, layout, shard_size)
    labels = ("none" if not net.label_dim else
              f"class={fixed_class}" if fixed_class is not None else "cycle")
    sampler = {k: (str(v) if v == float("inf") else v) for k, v in vars(settings).items() if k != "notes"}
    sampler["guidance"] = guidance_scale
    store.check_meta(SampleMeta(
        num=num, seed=seed, image_shape=[net.img_channels, net.img_resolution, net.img_resolution],
        weights_sha=file_digest(weights), sampler=sampler, layout=layout, shard_size=shard_size,
        labels=labels, notes=list(settings.notes)))
    guidance = sampling.classifier_free_guidance(guidance_scale) if guidance_scale else None
    return generate(net, store, num, batch, seed, settings, rank, world, fixed_class=fixed_class,
                    autocast_dtype=autocast_dtype, guidance=guidance, device=device,
                    progress=progress)


# --------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------

def iter_samples(path: str | os.PathLike, what: str = "samples"
                 ) -> Iterator[tuple[int, np.ndarray, Optional[int]]]:
    """(index, uint8 [H, W, C], label or None) for every stored image, in index order.

    Reads a SampleStore of either layout, or any folder of images: the folder is read by
    `data.sources.FolderSource`, the one image-folder reader (what make_shards reads too:
    PNG, JPEG, WebP, BMP, GIF, TIFF, recursively, sorted by path; samples.json and other
    files are ignored). A file named by a number keeps it as its index, others get their
    position. `what` names the input in errors (e.g. "--fid-reference")."""
    root = Path(path)
    shards = sorted(root.glob("samples-*.tar")) if root.is_dir() else [root]
    if shards and all(p.suffix == ".tar" for p in shards):
        for shard in shards:
            groups: dict[str, dict[str, bytes]] = {}
            try:
                with tarfile.open(shard) as tar:
                    for m in tar.getmembers():
                        if m.isfile():
                            stem, _, ext = m.name.rpartition(".")
                            group = groups.setdefault(stem, {})
                            if ext in group:  # we write each member once: never let one replace another
                                raise SampleStoreError(f"{what} {shard}: member {m.name} is there twice")
                            group[ext] = tar.extractfile(m).read()
                    # The store writes whole tars atomically, so a cut one comes from a copy
                    # killed between two members: refused, not read as fewer samples.
                    problem = tar_end_problem(tar)
            except tarfile.TarError as e:
                raise SampleStoreError(f"{what} {shard}: not a readable tar ({e})") from None
            if problem:
                raise SampleStoreError(f"{what} {shard}: {problem}; {len(groups)} samples read, the "
                                       "rest are missing (copy the sample set again, or delete "
                                       "that shard and re-run ambient-sample: it remakes it)")
            for stem in sorted(groups):
                g = groups[stem]
                if "png" not in g:
                    raise SampleStoreError(f"{shard}: sample {stem} has no .png member")
                label = int(g["cls"]) if "cls" in g else None
                yield int(stem.rsplit("/", 1)[-1]), decode_image_bytes(g["png"], f"{shard}:{stem}"), label
        return
    if not root.is_dir():
        raise SampleStoreError(f"{what} {root}: neither a directory nor a .tar shard")
    if not any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in root.rglob("*")):
        raise SampleStoreError(f"{what} {root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) "
                               "and no samples-*.tar shards")
    folder = FolderSource(root)
    for i in range(len(folder)):
        stem = Path(folder.files[i]).stem
        yield int(stem) if stem.isdigit() else i, folder.load(i).image, None


def read_samples(path: str | os.PathLike, limit: int = 0, what: str = "samples"
                 ) -> tuple[list[int], torch.Tensor, Optional[torch.Tensor]]:
    """(indices, uint8 [N, C, H, W], labels [N] or None) of stored samples or an image folder
    (`iter_samples`); images of different shapes raise SampleStoreError naming `what`."""
    indices, images, labels = [], [], []
    for n, img, label in iter_samples(path, what):
        indices.append(n)
        images.append(img)
        labels.append(label)
        if limit and len(indices) >= limit:
            break
    first: dict[tuple, int] = {}
    for n, im in zip(indices, images):
        first.setdefault(im.shape, n)
    if len(first) != 1:  # name an image of each shape, so the odd ones can be found
        listed = ", ".join(f"[H, W, C] = {list(s)} (first: image {n})" for s, n in sorted(first.items()))
        raise SampleStoreError(f"{what} {path}: images of different shapes: {listed}")
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    has_labels = all(lab is not None for lab in labels)
    return indices, pixels, (torch.tensor(labels) if has_labels else None)
