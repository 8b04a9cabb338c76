"""The shard format: writing it (with the one fixed noisy copy per image), checking it, reading it.

A shard directory holds

    train-000000.tar, ...   WebDataset tars; per sample `<key>.png` (lossless clean image),
                            `<key>.noisy.npy` (float16 [C, H, W] noisy copy, never clipped) and
                            `<key>.json` ({"key", "label", "caption", "meta"})
    train-000000.idx, ...   DALI's webdataset index (v1.2) of each tar: member offsets, so any
                            sample can be read without scanning (used by all our loaders too)
    heldout.npz             optional: images of the same source never trained on (keys, images
                            uint8 [K, H, W, C], labels), for memorization calibration
    masks.npz               optional (--mask-corruption P, the masking baseline): each training
                            image's ONE fixed inpainting mask, keyed like the noisy copies
                            (keys, bit-packed bool masks [N, C, H, W], True = kept)
    manifest.json           format version, sigma_tn, form, seeds, geometry, class count,
                            counts, per-file sha256 and size, the source description, the
                            duplicates left out, the plan hash, and its seal (a digest of
                            each field, so that an edit is refused naming the field)

Writing (`make_shards`) is resumable: each shard goes to a temporary name and is renamed when
complete, the manifest is rewritten (atomically) after every shard, and a re-run with the same
plan skips shards whose sha256 still matches. Tars are byte-for-byte reproducible (fixed
member metadata), so a checksum mismatch always means damage, never a harmless rewrite.

The mechanics of writing are public and shared with the latent writer (text.latents):
`ShardWriter` (the shard plan and its hash, fitted source samples, the held-out file, the
resume check) and `ShardTar` (one tar written under a temporary name, published with its
index and manifest entry); `tar_member` adds one member with fixed metadata.

Reading (`ShardSet`) checks the manifest's seal, each tar's size (and sha256), loads the
indexes, checks what the manifest says against the data (counts, image shape, the noisy
copies' measured noise level), and decodes any sample by index, checking its tar header, its
noisy copy's shape and dtype, and naming shard and key in every error. `load_images` reads a whole split; `check_manifest` compares a manifest to a config.
"""
from __future__ import annotations

import concurrent.futures as futures
import hashlib
import io
import json
import mmap
import multiprocessing
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image

from ambient_dist.config import ConfigError, ExperimentConfig
from ambient_dist.errors import UserError
from ambient_dist.fileio import atomic_path, atomic_write_bytes, atomic_write_json, sha256_file
from ambient_dist.images import encode_png
from ambient_dist.noise import keyed_mask, make_noisy_copy, vp_alpha_sigma
from ambient_dist.progress import progress as progress_bar

from .augment import to_model_units
from .order import position_random_state
from .sources import (DUPLICATE_POLICIES, FIT_MODES, Source, SourceError, choose_subset, fit_image,
                      resolve_duplicates, tar_end_problem, webdataset_members)

FORMAT_NAME = "ambient_dist.shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
HELDOUT_NAME = "heldout.npz"
MASKS_NAME = "masks.npz"
INDEX_VERSION = "v1.2"  # DALI's webdataset index format
CLEAN_EXT, NOISY_EXT, META_EXT = "png", "noisy.npy", "json"
PIXEL_FORMS = ("edm", "vp")


class ShardError(UserError):
    """Damaged, incomplete or mismatched shards; the message names the file and key."""


# ----------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------

def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def scan_tar(path: str | os.PathLike) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {ext: (data offset, size)})] of a WebDataset tar, in stored order."""
    samples: list = []
    try:
        with tarfile.open(path, "r:") as tar:
            for key, ext, m in webdataset_members(tar):
                if not samples or samples[-1][0] != key or ext in samples[-1][1]:
                    samples.append((key, {}))
                samples[-1][1][ext] = (m.offset_data, m.size)
            problem = tar_end_problem(tar)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{path}: corrupt or truncated tar ({type(e).__name__}: {e})") from None
    if problem:
        last = f", the last {samples[-1][0]}" if samples else ""
        raise ShardError(f"{path}: {problem}; {len(samples)} samples read{last}, the rest are "
                         "missing: re-run make_shards to rewrite it")
    return samples


def write_index(samples: list, path: Path) -> None:
    """DALI's webdataset index: 'v1.2 N' then per sample 'ext offset size name' per member."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for key, comps in samples:
        lines.append(" ".join(f"{ext} {off} {size} {key}.{ext}" for ext, (off, size) in comps.items()))
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def read_index(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    try:
        lines = path.read_text().splitlines()
        version, count = lines[0].split()
        if version != INDEX_VERSION:
            raise ValueError(f"index version {version}, expected {INDEX_VERSION}")
        samples = []
        for line in lines[1: 1 + int(count)]:
            parts = line.split()
            if len(parts) % 4:
                raise ValueError(f"line {line!r} is not 'ext offset size name' groups")
            comps, key = {}, None
            for j in range(0, len(parts), 4):
                ext, off, size, name = parts[j: j + 4]
                comps[ext] = (int(off), int(size))
                key = name[: len(name) - len(ext) - 1]
            samples.append((key, comps))
        if len(samples) != int(count):
            raise ValueError(f"header says {count} samples, file lists {len(samples)}")
    except (OSError, ValueError, IndexError) as e:
        raise ShardError(f"{path}: unreadable DALI index ({e}); delete it to rebuild from the tar") from None
    return samples


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------

@dataclass
class ShardOptions:
    """Everything that decides the content of a shard directory (besides the source)."""

    resolution: int = 32
    channels: int = 0                # 0 = the source's own (1 for idx, else 3)
    fit: str = "auto"                # see sources.fit_image
    sigma_tn: float = 0.5
    form: str = "edm"
    noise_seed: int = 0
    count: int = 0                   # training images; 0 = all not held out
    per_class: int = 0               # or: this many per class
    subset_seed: int = 0
    heldout: int = 0
    samples_per_shard: int = 1000
    # Masking baseline: erase each pixel of each image's fixed mask with this probability
    # (0 = no masks.npz).
    mask_corruption: float = 0.0
    # Source samples that repeat an earlier one (sources.find_duplicates): "error" refuses
    # them, "keep-first" keeps the first and lists the others in the manifest.
    duplicates: str = "error"
    # Not part of the content (duplicates decides which keys are written; those are hashed):
    workers: int = 1
    skip_bad: bool = False

    def content(self) -> dict:
        d = asdict(self)
        for k in ("workers", "skip_bad", "duplicates"):
            d.pop(k)
        if not d["mask_corruption"]:  # shards made before masks existed keep their plan hash
            d.pop("mask_corruption")
        return d


def _check_options(opts: ShardOptions) -> None:
    def bad(flag, msg):
        raise ShardError(f"{flag}: {msg}")
    if opts.form not in PIXEL_FORMS:
        bad("--form", f"{opts.form!r} not supported for pixel shards (choose {', '.join(PIXEL_FORMS)}; "
            "latent shards need a VAE and are not written by make_shards)")
    if opts.sigma_tn < 0:
        bad("--sigma-tn", f"must be >= 0, got {opts.sigma_tn}")
    if opts.resolution < 8:
        bad("--resolution", f"must be >= 8, got {opts.resolution}")
    if opts.channels not in (0, 1, 3):
        bad("--channels", f"must be 1, 3 or 0 (the source's own), got {opts.channels}")
    if opts.fit not in FIT_MODES:
        bad("--fit", f"expected one of {', '.join(FIT_MODES)}, got {opts.fit!r}")
    if opts.samples_per_shard < 1:
        bad("--samples-per-shard", f"must be >= 1, got {opts.samples_per_shard}")
    for name in ("count", "per_class", "heldout"):
        if getattr(opts, name) < 0:
            bad(f"--{name.replace('_', '-')}", "must be >= 0")
    if opts.duplicates not in DUPLICATE_POLICIES:
        bad("--duplicates", f"expected one of {', '.join(DUPLICATE_POLICIES)}, got {opts.duplicates!r}")
    if not 0 <= opts.mask_corruption < 1:
        bad("--mask-corruption", f"must be in [0, 1) (0 = no masks), got {opts.mask_corruption}")


# The mechanics both shard writers share (this pixel writer and text.latents' latent writer)

class SourceSample(NamedTuple):
    """One source image fitted to the shard geometry."""
    key: str
    image: np.ndarray          # uint8 [H, W, C]
    label: Optional[int]
    caption: Optional[str]
    meta: dict


@dataclass
class ShardJob:
    """One numbered tar of a plan: its file name and the source indices it holds, in order."""
    name: str
    indices: list[int]


def tar_member(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o444) -> None:
    """Append `data` as member `name` with fixed metadata (no mtime, owner or machine mode),
    so that the same content always gives the same tar bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, mode, 0, 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardTar:
    """One shard tar being written: members go to a temporary file beside `path`, which
    becomes `path` when the `with` block ends normally (and is removed when it raises).
    `publish` then writes the DALI index and returns the shard's manifest entry.

        with ShardTar(out_dir / "train-000000.tar") as shard:
            shard.add(f"{key}.png", png_bytes)
        entry = shard.publish(skipped, converted)
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._target = None
        self._tar: Optional[tarfile.TarFile] = None

    def __enter__(self) -> "ShardTar":
        self._target = atomic_path(self.path)
        tmp = self._target.__enter__()
        self._tar = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT)
        return self

    def add(self, name: str, data: bytes) -> None:
        tar_member(self._tar, name, data)

    def __exit__(self, *exc) -> bool:
        self._tar.close()
        self._tar = None
        return bool(self._target.__exit__(*exc))

    def publish(self, skipped: list, converted: Optional[dict] = None) -> dict:
        """Index the finished tar; return its manifest entry (name, index, samples, bytes,
        sha256, skipped images, counted decode conversions)."""
        if self._tar is not None or not self.path.is_file():
            raise RuntimeError(f"{self.path}: publish() needs the finished tar (after the with block)")
        samples = scan_tar(self.path)
        index = self.path.with_suffix(".idx")
        write_index(samples, index)
        return {"name": self.path.name, "index": index.name, "samples": len(samples),
                "bytes": self.path.stat().st_size, "sha256": sha256_file(self.path),
                "skipped": skipped, "converted": converted or {}}


class ShardWriter:
    """What writing any shard directory takes, for one source, directory and geometry:

        choose(...)                    the subset, without duplicates (policy), keys checked
        jobs(train, per_shard)         the numbered tars train-000000.tar, ... of a subset
        plan_hash(jobs, heldout, ...)  the hash that identifies the directory's content
        check_unique_keys(indices)     refuse two images with one key
        finished(entry)                whether an earlier run's shard is intact (resume)
        sample(i)                      source image i fitted to resolution x resolution x channels
        shard(name)                    a ShardTar for one tar of the plan
        write_heldout(indices)         heldout.npz and its manifest entry

    Picklable (the pixel writer hands it to its worker processes).
    """

    def __init__(self, source: Source, out_dir: Path, resolution: int, channels: int, fit: str):
        self.source, self.out_dir = source, Path(out_dir)
        self.resolution, self.channels, self.fit = resolution, channels, fit

    @staticmethod
    def jobs(train: list[int], samples_per_shard: int) -> list[ShardJob]:
        per = samples_per_shard
        return [ShardJob(f"train-{n:06d}.tar", train[s: s + per])
                for n, s in enumerate(range(0, len(train), per))]

    def plan_hash(self, jobs: list[ShardJob], heldout: list[int], options: dict,
                  source_desc: dict) -> str:
        """sha256 of everything that decides the directory's bytes: the source description,
        the content options, each tar's keys in order and the held-out keys."""
        key = self.source.key
        blob = json.dumps({"source": source_desc, "options": options,
                           "shards": [[j.name, [key(i) for i in j.indices]] for j in jobs],
                           "heldout": [key(i) for i in heldout]}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def choose(self, count: int, per_class: int, heldout: int, seed: int, duplicates: str
               ) -> tuple[list[int], list[int], list[dict]]:
        """(training indices, held-out indices, duplicates left out): the seeded subset
        (sources.choose_subset) of the source's samples that repeat no earlier one, after the
        `duplicates` policy (sources.resolve_duplicates: "error" raises SourceError naming
        the first duplicate). Each duplicate is {"key", "where", "first", "reason"}."""
        dups = resolve_duplicates(self.source, duplicates)
        train, held = choose_subset(self.source, count, per_class, heldout, seed,
                                    exclude=frozenset(d["index"] for d in dups))
        self.check_unique_keys(train + held)
        return train, held, [{k: v for k, v in d.items() if k != "index"} for d in dups]

    def check_unique_keys(self, indices: list[int]) -> None:
        """ShardError naming the first image whose key another of `indices` already has
        (samples, noise and masks are all keyed by it)."""
        seen = set()
        for i in indices:
            key = self.source.key(i)
            if key in seen:
                raise ShardError(f"{self.source.where(i)}: key {key!r} is used by two source "
                                 "images (keys keep only [A-Za-z0-9_-]); rename one of them")
            seen.add(key)

    def finished(self, entry: dict) -> bool:
        """True if the shard of a manifest `entry` and its index exist and the tar's sha256
        still matches (so a resumed run keeps it)."""
        path = self.out_dir / entry["name"]
        return (path.exists() and (self.out_dir / entry["index"]).exists()
                and sha256_file(path) == entry["sha256"])

    def sample(self, i: int) -> SourceSample:
        """Source image i, fitted; raises SourceError for an undecodable image."""
        rec = self.source.load(i)
        image = fit_image(rec.image, self.resolution, self.channels, self.fit, self.source.where(i))
        return SourceSample(rec.key, image, rec.label, rec.caption, rec.meta)

    def shard(self, name: str) -> ShardTar:
        return ShardTar(self.out_dir / name)

    def write_heldout(self, indices: list[int]) -> dict:
        """heldout.npz (keys, uint8 images [K, H, W, C], labels, -1 for none); its entry."""
        keys, images, labels = [], [], []
        for i in indices:
            s = self.sample(i)
            keys.append(s.key)
            images.append(s.image)
            labels.append(-1 if s.label is None else s.label)
        empty = np.zeros((0, self.resolution, self.resolution, self.channels), np.uint8)
        buf = io.BytesIO()
        np.savez(buf, keys=np.array(keys, dtype=str), images=np.stack(images) if images else empty,
                 labels=np.array(labels, dtype=np.int64))
        path = self.out_dir / HELDOUT_NAME
        atomic_write_bytes(path, buf.getvalue())
        return {"name": HELDOUT_NAME, "samples": len(keys), "sha256": sha256_file(path)}


def _write_shard(writer: ShardWriter, job: ShardJob, opts: ShardOptions) -> dict:
    """Write one tar of pixel samples (temp name, then rename) and its index; return its
    manifest entry."""
    source = writer.source
    skipped, converted = [], {}
    with writer.shard(job.name) as shard:
        for i in job.indices:
            try:
                key, image, label, caption, meta = writer.sample(i)
            except SourceError as e:
                if not opts.skip_bad:
                    raise
                skipped.append({"key": source.key(i), "where": source.where(i), "error": str(e)})
                continue
            # to_model_units is the one uint8 -> [-1, 1] conversion (tested exactly in
            # tests/test_data_augment.py); no statistic of the images is checked here, so a
            # shard of bright images is as valid as any other.
            clean = to_model_units(torch.from_numpy(image).permute(2, 0, 1))
            noisy = make_noisy_copy(clean, opts.sigma_tn, opts.noise_seed, key, opts.form)
            shard.add(f"{key}.{CLEAN_EXT}", encode_png(image))
            shard.add(f"{key}.{NOISY_EXT}",
                      encode_npy(finite_array(noisy.numpy().astype(np.float16), source.where(i), "noisy copy")))
            record = {"key": key, "label": label, "caption": caption, "meta": meta}
            shard.add(f"{key}.{META_EXT}", json.dumps(record, sort_keys=True).encode())
            count_conversion(converted, meta)
    return shard.publish(skipped, converted)


def count_conversion(counts: dict, meta: dict) -> None:
    """Count a sample's documented decode conversion (sources put it in meta["converted"])."""
    if meta.get("converted"):
        counts[meta["converted"]] = counts.get(meta["converted"], 0) + 1


def finite_array(array: np.ndarray, where: str, what: str) -> np.ndarray:
    """`array` unchanged if every value is finite; else ShardError naming where and what
    (a NaN written into a shard would silently skip every training step that reads it)."""
    bad = ~np.isfinite(array)
    if bad.any():
        raise ShardError(f"{where}: the {what} has {int(bad.sum())} non-finite values (NaN or inf)")
    return array


def merge_conversions(entries: list) -> dict:
    """{conversion: number of images} over shard entries."""
    total: dict = {}
    for e in entries:
        for conversion, n in e.get("converted", {}).items():
            total[conversion] = total.get(conversion, 0) + n
    return total


_WORKER_STATE: dict = {}


def _worker_init(writer: ShardWriter, opts: ShardOptions):
    torch.set_num_threads(1)  # one decode per process; the pool provides the parallelism
    _WORKER_STATE.update(writer=writer, opts=opts)


def _worker_write(job: ShardJob) -> dict:
    return _write_shard(_WORKER_STATE["writer"], job, _WORKER_STATE["opts"])


def make_shards(source: Source, out_dir: str | os.PathLike, opts: ShardOptions,
                overwrite: bool = False, progress: bool = True) -> dict:
    """Choose the subset, write (or finish writing) the shards and the manifest; return it."""
    _check_options(opts)
    out_dir = Path(out_dir)
    channels = opts.channels or (1 if source.kind == "idx" else 3)
    writer = ShardWriter(source, out_dir, opts.resolution, channels, opts.fit)
    train, heldout, duplicates = writer.choose(opts.count, opts.per_class, opts.heldout,
                                               opts.subset_seed, opts.duplicates)
    jobs = writer.jobs(train, opts.samples_per_shard)
    desc = source.describe()
    plan = writer.plan_hash(jobs, heldout, opts.content(), desc)

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST_NAME
    done: dict[str, dict] = {}
    if manifest_path.exists() and not overwrite:
        # Unsealed (older) manifests are fine here: every field is rebuilt from the options
        # and only shards whose checksum holds are kept; this run seals the manifest.
        old = read_manifest(out_dir, require_complete=False, require_seal=False)
        if old.get("plan") != plan:
            raise ShardError(f"{manifest_path}: this directory holds shards made from a different "
                             "source or options; choose another --out or pass --overwrite")
        done = {entry["name"]: entry for entry in old.get("shards", []) if writer.finished(entry)}
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "complete": False, "plan": plan,
        "sigma_tn": opts.sigma_tn, "form": opts.form, "noise_seed": opts.noise_seed,
        "subset_seed": opts.subset_seed, "resolution": opts.resolution, "channels": channels,
        "num_classes": source.num_classes, "class_names": list(source.class_names),
        "fit": opts.fit, "selection": {"count": opts.count, "per_class": opts.per_class,
                                       "heldout": opts.heldout},
        "source": desc, "counts": {}, "shards": [], "heldout": None, "skipped": [],
        "duplicates": duplicates, "duplicates_policy": opts.duplicates,
        "members": {"clean": CLEAN_EXT, "noisy": NOISY_EXT, "meta": META_EXT,
                    "noisy_dtype": "float16", "noisy_layout": "CHW"},
    }

    def save(entries: dict) -> None:
        manifest["shards"] = [entries[j.name] for j in jobs if j.name in entries]
        manifest["skipped"] = [s for e in manifest["shards"] for s in e.get("skipped", [])]
        manifest["converted"] = merge_conversions(manifest["shards"])
        write_manifest(out_dir, manifest)

    todo = [j for j in jobs if j.name not in done]
    save(done)
    bar = progress_bar(total=len(train), unit="img", desc=f"shards -> {out_dir}", disable=not progress)
    bar.update(sum(len(j.indices) for j in jobs if j.name in done))
    if opts.workers > 1 and len(todo) > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with futures.ProcessPoolExecutor(min(opts.workers, len(todo)), mp_context=ctx,
                                         initializer=_worker_init,
                                         initargs=(writer, opts)) as pool:
            pending = {pool.submit(_worker_write, j): j for j in todo}
            try:
                for fut in futures.as_completed(pending):
                    done[pending[fut].name] = fut.result()
                    save(done)
                    bar.update(len(pending[fut].indices))
            except BaseException:
                # Report the first error now; finished shards are in the manifest for a re-run.
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    else:
        for j in todo:
            done[j.name] = _write_shard(writer, j, opts)
            save(done)
            bar.update(len(j.indices))
    bar.close()
    if heldout:
        manifest["heldout"] = writer.write_heldout(heldout)
    if opts.mask_corruption:
        keys = [key for e in manifest["shards"] for key, _ in scan_tar(out_dir / e["name"])]
        manifest["masks"] = _write_masks(keys, out_dir, opts, channels)
    train_count = sum(e["samples"] for e in manifest["shards"])
    manifest["counts"] = {"train": train_count, "heldout": len(heldout),
                          "skipped": len(manifest["skipped"]), "duplicates": len(duplicates),
                          "converted": sum(manifest["converted"].values())}
    manifest["complete"] = True
    write_manifest(out_dir, manifest)
    return manifest


def _write_masks(keys: list[str], out_dir: Path, opts: ShardOptions, channels: int) -> dict:
    """masks.npz: the fixed inpainting mask of every training key (stored order)."""
    shape = (channels, opts.resolution, opts.resolution)
    masks = np.stack([keyed_mask(shape, opts.noise_seed, k, opts.mask_corruption).numpy()
                      for k in keys])
    buf = io.BytesIO()
    np.savez(buf, keys=np.array(keys), packed=np.packbits(masks.reshape(len(keys), -1), axis=1),
             shape=np.array(shape))
    path = out_dir / MASKS_NAME
    atomic_write_bytes(path, buf.getvalue())
    return {"name": MASKS_NAME, "sha256": sha256_file(path), "count": len(keys),
            "corruption": opts.mask_corruption, "kept_fraction": float(masks.mean())}


def read_masks(shards_dir: str | os.PathLike, keys: list[str]) -> np.ndarray:
    """The fixed inpainting masks of `keys` (bool [N, C, H, W], True = kept), checked against
    the manifest's checksum; a key without a mask is an error naming it."""
    shards_dir = Path(shards_dir)
    entry = read_manifest(shards_dir).get("masks")
    if not entry:
        raise ShardError(f"{shards_dir}: no inpainting masks (objective.method=masking needs "
                         "shards made with make_shards --mask-corruption P)")
    path = shards_dir / entry["name"]
    if not path.is_file():
        raise ShardError(f"{path}: listed in the manifest but missing")
    if sha256_file(path) != entry["sha256"]:
        raise ShardError(f"{path}: checksum mismatch; re-run make_shards to rewrite it")
    with np.load(path, allow_pickle=False) as npz:
        stored_keys, packed, shape = [str(k) for k in npz["keys"]], npz["packed"], tuple(npz["shape"])
    row = {k: i for i, k in enumerate(stored_keys)}
    missing = [k for k in keys if k not in row]
    if missing:
        raise ShardError(f"{path}: no mask for key {missing[0]!r} ({len(missing)} keys missing)")
    size = int(np.prod(shape))
    bits = np.unpackbits(packed[[row[k] for k in keys]], axis=1, count=size)
    masks = bits.reshape(len(keys), *shape).astype(bool)
    # The manifest's corruption against the masks themselves (each pixel is erased with that
    # probability): a tolerance of 6 standard errors of the measured fraction, + 0.01.
    p, n = float(entry["corruption"]), masks.size
    erased = 1.0 - float(masks.mean()) if n else p
    if abs(erased - p) > 6 * np.sqrt(max(p * (1 - p), 1e-4) / max(n, 1)) + 0.01:
        raise ShardError(f"{shards_dir / MANIFEST_NAME}: field masks.corruption says {p}, but the "
                         f"stored masks erase {erased:.4f} of the pixels ({len(keys)} masks): the "
                         "manifest does not describe these shards; remake them")
    return masks


# ----------------------------------------------------------------------------------------
# Manifest checks
# ----------------------------------------------------------------------------------------

SEAL_FIELD = "seal"


def _seal_fields(obj, prefix: str = "") -> dict[str, str]:
    """{dotted field name: sha256 (16 hex digits) of its JSON} for every leaf of a manifest;
    objects are descended into (counts.train, masks.corruption), lists and values are leaves."""
    if isinstance(obj, dict) and obj:
        out: dict[str, str] = {}
        for k, v in obj.items():
            if not prefix and k == SEAL_FIELD:
                continue
            out.update(_seal_fields(v, f"{prefix}{k}."))
        return out
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return {prefix[:-1]: hashlib.sha256(blob.encode()).hexdigest()[:16]}


def manifest_seal(manifest: dict) -> dict:
    """The seal of a manifest: a digest of each field's value as written. make_shards stores
    it in the manifest (field "seal"); readers recompute it, so a field edited afterwards (say
    sigma_tn 0.5 -> 1.0 while the stored copies have std 0.5) is refused by name. Beside the
    per-file sha256 that the manifest lists, this binds what it says to the data it lists."""
    return {"algorithm": "sha256 of each field's JSON, 16 hex digits",
            "fields": _seal_fields(json.loads(json.dumps(manifest, default=str)))}


def write_manifest(shards_dir: str | os.PathLike, manifest: dict) -> None:
    """Seal `manifest` (manifest_seal, in place) and write it atomically as manifest.json:
    the one way a shard writer publishes a manifest."""
    manifest[SEAL_FIELD] = manifest_seal(manifest)
    atomic_write_json(Path(shards_dir) / MANIFEST_NAME, manifest)


def check_seal(manifest: dict, path: str | os.PathLike, require_seal: bool = True) -> None:
    """ShardError naming every field of `manifest` (read from `path`) whose value is not what
    its writer sealed, or naming the missing seal when `require_seal`.

    Older manifests carry no seal: readers refuse them (an edit of them could not be told
    from the truth), and re-running the make_shards command that made them seals them
    without rewriting any shard whose checksum holds."""
    seal = manifest.get(SEAL_FIELD)
    if seal is None:
        if require_seal:
            raise ShardError(f"{path}: the manifest carries no seal (written before manifests were "
                             "sealed, or by another tool), so an edit of it could not be detected; "
                             "re-run the ambient-make-shards command that made these shards: it "
                             "keeps every shard whose checksum holds and seals the manifest")
        return
    recorded = seal.get("fields") if isinstance(seal, dict) else None
    if not isinstance(recorded, dict):
        raise ShardError(f"{path}: the manifest's seal is unreadable; remake the shards")
    now = manifest_seal(manifest)["fields"]
    changed = sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise ShardError(f"{path}: manifest field{'s' if len(changed) > 1 else ''} {shown} "
                         f"{'differ' if len(changed) > 1 else 'differs'} from what make_shards "
                         "wrote (the manifest's seal): it was edited after the shards were "
                         "written, and the data do not follow an edit. Restore the value, or "
                         "remake the shards with the settings you want (--overwrite)")


def read_manifest(shards_dir: str | os.PathLike, require_complete: bool = True,
                  require_seal: bool = True) -> dict:
    """The manifest of a shard directory, its format and seal checked (check_seal): ShardError
    for a missing, unreadable, foreign, edited or (with `require_complete`) unfinished one.
    `require_seal=False` accepts an older, unsealed manifest (only the writer does)."""
    path = Path(shards_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(f"{path}: not found; make shards with ambient-make-shards")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format {manifest.get('format')!r} version "
                         f"{manifest.get('format_version')!r}; this code reads {FORMAT_NAME} "
                         f"version {FORMAT_VERSION} (remake the shards)")
    check_seal(manifest, path, require_seal)
    if require_complete and not manifest.get("complete"):
        raise ShardError(f"{path}: shards are incomplete (make_shards was interrupted); "
                         "re-run the same make_shards command to finish them")
    return manifest


def check_manifest(manifest: dict, cfg: ExperimentConfig) -> None:
    """Refuse shards that were made for another objective or geometry than `cfg` trains."""
    where = f"data.shards ({cfg.data.shards})"
    problems = []
    if cfg.objective.form not in PIXEL_FORMS:
        problems.append(f"objective.form is {cfg.objective.form!r} but the shards hold pixels "
                        f"(made for form {manifest['form']!r})")
    elif manifest["form"] != cfg.objective.form:
        problems.append(f"objective.form is {cfg.objective.form!r}, shards were made for {manifest['form']!r}")
    if not np.isclose(manifest["sigma_tn"], cfg.objective.sigma_tn, rtol=1e-6, atol=1e-9):
        problems.append(f"objective.sigma_tn is {cfg.objective.sigma_tn}, the shards' noisy copies "
                        f"have sigma_tn {manifest['sigma_tn']} (remake them with --sigma-tn "
                        f"{cfg.objective.sigma_tn}, or set objective.sigma_tn={manifest['sigma_tn']})")
    if manifest["resolution"] != cfg.data.resolution:
        problems.append(f"data.resolution is {cfg.data.resolution}, shards are {manifest['resolution']} px")
    if manifest["channels"] != cfg.data.channels:
        problems.append(f"data.channels is {cfg.data.channels}, shards have {manifest['channels']}")
    if cfg.data.num_classes and manifest["num_classes"] != cfg.data.num_classes:
        problems.append(f"data.num_classes is {cfg.data.num_classes}, shards have "
                        f"{manifest['num_classes']} classes")
    o = cfg.objective
    if o.method == "masking":
        masks = manifest.get("masks")
        if not masks:
            problems.append("objective.method is 'masking' but the shards hold no inpainting masks "
                            f"(remake them with --mask-corruption {o.mask_corruption})")
        elif not np.isclose(masks["corruption"], o.mask_corruption, rtol=1e-6, atol=1e-9):
            problems.append(f"objective.mask_corruption is {o.mask_corruption}, the shards' masks "
                            f"erase {masks['corruption']} (set objective.mask_corruption="
                            f"{masks['corruption']} or remake the shards)")
    total = manifest["counts"]["train"]
    if cfg.data.subset > total:
        problems.append(f"data.subset is {cfg.data.subset} but the shards hold only {total} images")
    if problems:
        raise ConfigError(f"{where} do not match the config: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------

@dataclass
class Sample:
    key: str
    clean: np.ndarray        # uint8 [C, H, W]
    noisy: np.ndarray        # float16 [C, H, W]
    label: int               # -1 when the sample has none


class ShardSet:
    """The training samples of a shard directory, addressable by index 0..N-1 (stored order).

    Picklable: memory maps are opened lazily in each process (DataLoader workers included).
    `verify` checks the sha256 of every tar; `verify_share=(rank, world_size)` checks only
    every world_size-th one from `rank`, so that the ranks of a job split the reading (on a
    shared file system every rank would otherwise read the whole dataset at start-up).
    """

    def __init__(self, shards_dir: str | os.PathLike, verify: bool = True,
                 verify_share: tuple[int, int] = (0, 1)):
        self.dir = Path(shards_dir)
        self.manifest = read_manifest(self.dir)
        entries = self.manifest["shards"]
        if not entries:
            raise ShardError(f"{self.dir / MANIFEST_NAME}: the shard list is empty "
                             "(no training samples were written)")
        self.paths = [str(self.dir / e["name"]) for e in entries]
        part, parts = verify_share
        for s, (entry, path) in enumerate(zip(entries, self.paths)):
            if not os.path.isfile(path):
                raise ShardError(f"{path}: listed in the manifest but missing")
            size = os.path.getsize(path)
            if "bytes" in entry and size != entry["bytes"]:  # cheap, on every rank, verify or not
                raise ShardError(f"{path}: {size} bytes, the manifest says {entry['bytes']} "
                                 f"({'cut short: a copy that ended early' if size < entry['bytes'] else 'longer than written'}); "
                                 "copy it again or re-run make_shards to rewrite it")
            if verify and s % parts == part:
                got = sha256_file(path)
                if got != entry["sha256"]:
                    raise ShardError(f"{path}: checksum mismatch (sha256 {got[:16]}..., manifest "
                                     f"says {entry['sha256'][:16]}...): the file is damaged or was "
                                     "replaced; re-run make_shards to rewrite it")
        C, R = self.manifest["channels"], self.manifest["resolution"]
        self.shape = (C, R, R)
        # Latent shards (ambient_dist.text.latents) store a noisy latent of another shape
        # beside the clean image; pixel shards store a copy of the image's own shape.
        self.noisy_shape = tuple(self.manifest.get("noisy_shape") or self.shape)
        self.keys: list[str] = []
        shard_of, table = [], []
        for s, (entry, path) in enumerate(zip(entries, self.paths)):
            index_path = self.dir / entry.get("index", Path(entry["name"]).with_suffix(".idx").name)
            samples = read_index(index_path) if index_path.is_file() else scan_tar(path)
            if len(samples) != entry["samples"]:
                raise ShardError(f"{path}: holds {len(samples)} samples, manifest says {entry['samples']}")
            for key, comps in samples:
                for ext, what in ((CLEAN_EXT, "clean image"), (NOISY_EXT, "noisy copy"), (META_EXT, "json")):
                    if ext not in comps:
                        raise ShardError(f"{path}, key {key}: no {what} (.{ext}) in the sample")
                self.keys.append(key)
                shard_of.append(s)
                table.append([*comps[CLEAN_EXT], *comps[NOISY_EXT], *comps[META_EXT]])
        self.shard_of = np.asarray(shard_of, dtype=np.int64)
        self.table = np.asarray(table, dtype=np.int64).reshape(-1, 6)
        self._maps: dict[int, mmap.mmap] = {}
        self._pid = os.getpid()
        self.check_against_data()

    # The manifest's word is checked against the data it describes, on a few samples spread
    # over the set (the seal catches any edit; these catch a manifest that was never true).
    CHECK_SAMPLES = 8

    def _refuse(self, field: str, says, found: str) -> None:
        raise ShardError(f"{self.dir / MANIFEST_NAME}: field {field} says {says}, but {found}: the "
                         "manifest does not describe these shards; remake them (or restore the "
                         "manifest they were written with)")

    def check_samples(self) -> list[int]:
        n = len(self)
        return sorted({int(i) for i in np.linspace(0, n - 1, min(self.CHECK_SAMPLES, n))})

    def check_against_data(self) -> None:
        """ShardError naming the manifest field that the stored data contradict: counts.train
        (the tars' sample count), resolution / channels (the stored images' shape) and the
        noise level of pixel shards (sigma_tn against the measured std of noisy - clean)."""
        m = self.manifest
        counts = m.get("counts", {})
        if "train" in counts and counts["train"] != len(self):
            self._refuse("counts.train", counts["train"], f"the tars hold {len(self)} samples")
        idx = self.check_samples()
        for i in idx[:1]:
            t = self.table[i]
            try:  # the PNG header only: a clean image that does not decode is named when read
                with Image.open(io.BytesIO(self._member(i, int(t[0]), int(t[1])))) as im:
                    w, h = im.size
                    c = len(im.getbands())
            except (ShardError, OSError, ValueError):
                break
            if (h, w) != self.shape[1:]:
                self._refuse("resolution", m["resolution"], f"the stored images are {h}x{w} px "
                             f"(key {self.keys[i]})")
            if c != self.shape[0]:
                self._refuse("channels", m["channels"], f"the stored images have {c} (key {self.keys[i]})")
        if m.get("form") not in PIXEL_FORMS:
            return  # latent shards: text.latents.LatentShardSet measures the latent noise
        # Under a fixed random state that is put back afterwards: the check reads through the
        # same decode as training, and whatever a decode may draw must not move the caller's
        # RNGs (exact resume: a resumed run opens the shards again where a fresh one did not).
        with position_random_state(0, -1):
            samples = self._readable(self.sample, idx)
        if not samples:
            return
        clean = torch.from_numpy(np.stack([smp.clean for smp in samples]))
        noisy = torch.from_numpy(np.stack([smp.noisy for smp in samples])).float()
        alpha, expected = ((1.0, float(m["sigma_tn"])) if m["form"] == "edm"
                           else vp_alpha_sigma(float(m["sigma_tn"])))
        self.check_noise_level(noisy - float(alpha) * to_model_units(clean), float(expected),
                               "sigma_tn", m["sigma_tn"])

    @staticmethod
    def _readable(read, indices: list[int]) -> list:
        """read(i) for each index whose sample decodes: a damaged sample is named with its key
        when it is read for training, as it always was; the manifest checks use the others."""
        out = []
        for i in indices:
            try:
                out.append(read(i))
            except ShardError:
                continue
        return out

    def check_noise_level(self, residual: torch.Tensor, expected: float, field: str, says) -> None:
        """Refuse `field` when the std of `residual` (the noise of the stored copies, float
        [N, ...]) is not `expected`, allowing for the estimate's spread and float16 rounding."""
        n = residual.numel()
        measured = float(residual.double().std(unbiased=False)) if n else expected
        tolerance = max(0.1, 6 / np.sqrt(2 * max(n, 1))) * expected + 2e-3
        if abs(measured - expected) > tolerance:
            self._refuse(field, says, f"the stored noisy copies have noise std {measured:.4g} "
                         f"(expected {expected:.4g}; measured on {residual.shape[0]} samples)")

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def _map(self, s: int) -> mmap.mmap:
        if self._pid != os.getpid():  # forked: maps of the parent are not ours to share
            self._maps, self._pid = {}, os.getpid()
        if s not in self._maps:
            with open(self.paths[s], "rb") as f:
                self._maps[s] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[s]

    def _member(self, i: int, offset: int, size: int) -> bytes:
        s = int(self.shard_of[i])
        m = self._map(s)
        where = f"{self.paths[s]}, key {self.keys[i]}"
        if offset < 512 or offset + size > len(m):
            raise ShardError(f"{where}: member at byte {offset} (+{size}) lies beyond the end of "
                             f"the {len(m)}-byte tar (truncated file)")
        try:  # The 512-byte tar header before the data must be intact and agree on the size.
            header = tarfile.TarInfo.frombuf(m[offset - 512: offset], "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise ShardError(f"{where}: corrupt tar header at byte {offset - 512} ({e})") from None
        if header.size != size:
            raise ShardError(f"{where}: tar header says {header.size} bytes, index says {size} "
                             "(index out of date or tar corrupt)")
        return m[offset: offset + size]

    def raw(self, i: int) -> tuple[bytes, bytes, bytes]:
        """(png bytes, npy bytes, json bytes) of sample i."""
        t = self.table[i]
        return (self._member(i, int(t[0]), int(t[1])), self._member(i, int(t[2]), int(t[3])),
                self._member(i, int(t[4]), int(t[5])))

    def decode_noisy(self, i: int, data: bytes) -> np.ndarray:
        where = f"{self.paths[int(self.shard_of[i])]}, key {self.keys[i]}"
        try:
            noisy = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:
            raise ShardError(f"{where}: noisy copy is not a readable .npy ({e})") from None
        if noisy.dtype != np.float16 or noisy.shape != self.noisy_shape:
            raise ShardError(f"{where}: noisy copy is {noisy.dtype} {list(noisy.shape)}, expected "
                             f"float16 {list(self.noisy_shape)}")
        bad = ~np.isfinite(noisy)
        if bad.any():  # refused here, where the key is known, not later as a skipped step
            raise ShardError(f"{where}: noisy copy holds {int(bad.sum())} non-finite values (NaN "
                             "or inf); the shard was written by something else or damaged: remake "
                             "it with make_shards")
        return noisy

    def decode_label(self, i: int, data: bytes) -> int:
        try:
            label = json.loads(data).get("label")
        except (ValueError, AttributeError) as e:
            raise ShardError(f"{self.paths[int(self.shard_of[i])]}, key {self.keys[i]}: "
                             f"bad json ({e})") from None
        return -1 if label is None else int(label)

    def decode_clean(self, i: int, data: bytes) -> np.ndarray:
        where = f"{self.paths[int(self.shard_of[i])]}, key {self.keys[i]}"
        try:
            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im)
        except Exception as e:
            raise ShardError(f"{where}: clean image does not decode ({e})") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if arr.dtype != np.uint8 or arr.shape != self.shape:
            raise ShardError(f"{where}: clean image is {arr.dtype} {list(arr.shape)}, expected "
                             f"uint8 {list(self.shape)}")
        return np.ascontiguousarray(arr)

    def label(self, i: int) -> int:
        """Label of sample i (-1 if none), reading only its json member."""
        t = self.table[i]
        return self.decode_label(i, self._member(i, int(t[4]), int(t[5])))

    def sample(self, i: int) -> Sample:
        png, npy, meta = self.raw(i)
        return Sample(self.keys[i], self.decode_clean(i, png), self.decode_noisy(i, npy),
                      self.decode_label(i, meta))


def load_pixel_images(shards_dir: str | os.PathLike, split: str = "train", limit: int = 0) -> torch.Tensor:
    """The first `limit` (0 = all) images of a split as uint8 [N, C, H, W] (the training
    images in stored order, whose prefix is data.subset; or the held-out ones). A quarter of
    the memory of `load_model_images`: metrics convert batch by batch. ShardError as
    `load_images`."""
    _, images, _ = load_images(shards_dir, split)
    return torch.from_numpy(images[: limit or len(images)]).permute(0, 3, 1, 2).contiguous()


def load_model_images(shards_dir: str | os.PathLike, split: str = "train", limit: int = 0) -> torch.Tensor:
    """`load_pixel_images` in model units: float32 [N, C, H, W] in [-1, 1]."""
    return to_model_units(load_pixel_images(shards_dir, split, limit))


def load_images(shards_dir: str | os.PathLike, split: str = "train", verify: bool = True
                ) -> tuple[list[str], np.ndarray, Optional[np.ndarray]]:
    """All images of a split: (keys, uint8 [N, H, W, C], int64 labels [N] or None).

    "train" reads the shards (stored order); "heldout" the held-out images make_shards set
    aside with --heldout. Convert with `augment.to_model_units` for [-1, 1] tensors.
    """
    shards_dir = Path(shards_dir)
    if split == "train":
        shards = ShardSet(shards_dir, verify=verify)
        samples = [shards.sample(i) for i in range(len(shards))]
        images = np.stack([s.clean.transpose(1, 2, 0) for s in samples])
        labels = np.array([s.label for s in samples], dtype=np.int64)
        keys = [s.key for s in samples]
        has_labels = shards.manifest["num_classes"] > 0
    elif split == "heldout":
        manifest = read_manifest(shards_dir)
        entry = manifest.get("heldout")
        if not entry:
            raise ShardError(f"{shards_dir}: no held-out images (make the shards with --heldout K)")
        path = shards_dir / entry["name"]
        if not path.is_file():
            raise ShardError(f"{path}: listed in the manifest but missing")
        if verify and sha256_file(path) != entry["sha256"]:
            raise ShardError(f"{path}: checksum mismatch; re-run make_shards to rewrite it")
        try:  # unverified, a cut file reaches here
            with np.load(path, allow_pickle=False) as npz:
                keys, images, labels = [str(k) for k in npz["keys"]], npz["images"], npz["labels"]
        except Exception as e:
            raise ShardError(f"{path}: unreadable ({type(e).__name__}: {e}); re-run make_shards "
                             "to rewrite it") from None
        R, C = manifest["resolution"], manifest["channels"]
        if images.shape[1:] != (R, R, C):
            raise ShardError(f"{shards_dir / MANIFEST_NAME}: fields resolution / channels say {R} "
                             f"px x {C}, but {HELDOUT_NAME} holds images of shape "
                             f"{list(images.shape[1:])}: the manifest does not describe these shards")
        if len(keys) != manifest["counts"].get("heldout", len(keys)):
            raise ShardError(f"{shards_dir / MANIFEST_NAME}: field counts.heldout says "
                             f"{manifest['counts']['heldout']}, but {HELDOUT_NAME} holds {len(keys)} "
                             "images: the manifest does not describe these shards")
        has_labels = manifest["num_classes"] > 0
    else:
        raise ValueError(f"load_images: split must be 'train' or 'heldout', got {split!r}")
    return keys, images, (labels if has_labels else None)
