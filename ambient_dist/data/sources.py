"""Readers for the image collections users bring, behind one small `Source` interface.

Supported: an image folder (optionally one sub-folder per class), CIFAR-10/100 python batches
(directory or the original .tar.gz), MNIST / Fashion-MNIST idx files (.gz or plain), an .npz of
arrays, and img2dataset-style WebDataset shards (jpg/png/webp + txt caption + json metadata).
`open_source("fashion-mnist")` names the copy Debian's dataset-fashion-mnist package installs.

A `Source` lists its samples cheaply (keys and labels, for subset selection) and decodes one
on request (`load(i)`), so the shard writer can pick a subset first and decode in parallel
workers. Keys are stable: derived from the file name or the position in the source file, never
from the order in which we happen to process them, because the noisy copy of an image is
seeded by its key. This module also holds the geometry step (`fit_image`: resize + centre-crop,
or pad), the duplicate check (`find_duplicates`: one key or one whole sample twice) and the
seeded subset choice (`choose_subset`), and the end-of-archive check of tars (`tar_end_problem`).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import re
import struct
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from ambient_dist.errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Named shortcuts for data that ships with the system image.
NAMED_SOURCES = {
    "fashion-mnist": (FASHION_MNIST_DIR, "train"),
    "fashion-mnist-test": (FASHION_MNIST_DIR, "test"),
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class SourceError(UserError):
    """A problem with the source data; the message names the file (and key) at fault."""


@dataclass
class Record:
    """One decoded source sample: uint8 image [H, W, C] plus what travels with it."""

    key: str
    image: np.ndarray
    label: Optional[int] = None
    caption: Optional[str] = None
    meta: dict = field(default_factory=dict)


def safe_key(name: str) -> str:
    """A shard key from a source name: WebDataset splits member names at the first dot and
    DALI at '/', so keep only [A-Za-z0-9_-] (collisions are caught by the writer)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


# PIL modes stored as they are, and the documented conversion of every other mode we accept
# (each converted image is counted in the shard manifest under its conversion).
_GREY_16 = ("I;16", "I;16L", "I;16B", "I;16N")
CONVERSIONS = {
    "1": "1-bit -> 8-bit grey (0 / 255)",
    **{m: "16-bit grey -> 8-bit (value / 257, rounded)" for m in _GREY_16},
    "F": "float [0, 1] grey -> 8-bit (value x 255, rounded)",
    "P": "palette -> RGB (exact colours)",
    "PA": "palette + alpha -> RGB (alpha channel dropped)",
    "LA": "grey + alpha -> grey (alpha channel dropped)",
    "RGBA": "RGBA -> RGB (alpha channel dropped)",
    "RGBa": "RGBa -> RGB (alpha channel dropped)",
    "CMYK": "CMYK -> RGB (PIL's conversion)",
    "YCbCr": "YCbCr -> RGB (PIL's conversion)",
    "LAB": "LAB -> RGB (PIL's conversion)",
    "HSV": "HSV -> RGB (PIL's conversion)",
}


def _pixels(im: Image.Image, where: str) -> tuple[np.ndarray, Optional[str]]:
    """uint8 [H, W] or [H, W, 3] of a decoded image and the conversion applied (None if none).

    A conversion that would lose the image (PIL's convert("L") clips 16-bit values at 255) is
    never used; modes without a defined white (32-bit integers) and float images outside
    [0, 1] are refused, naming the file."""
    mode = im.mode
    if mode in ("L", "RGB"):
        return np.asarray(im, dtype=np.uint8), None
    if mode in _GREY_16:
        a = np.asarray(im).astype(np.float64)
        return np.rint(a / 257.0).astype(np.uint8), CONVERSIONS[mode]
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise SourceError(f"{where}: float image holds NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 1:
            raise SourceError(f"{where}: float image with values in [{lo:g}, {hi:g}]; float images "
                              "must be in [0, 1] (save it as 8- or 16-bit, or rescale it)")
        return np.rint(a * 255.0).astype(np.uint8), CONVERSIONS[mode]
    if mode in ("I", "I;32", "I;32B", "I;32L"):
        raise SourceError(f"{where}: 32-bit integer image (PIL mode {mode}): which value is white "
                          "is not defined; save it as an 8- or 16-bit image")
    if mode in ("1", "LA"):
        return np.asarray(im.convert("L"), dtype=np.uint8), CONVERSIONS[mode]
    if mode in CONVERSIONS:
        return np.asarray(im.convert("RGB"), dtype=np.uint8), CONVERSIONS[mode]
    raise SourceError(f"{where}: unsupported image mode {mode!r}")


def decode_image_bytes(data: bytes, where: str, conversions: Optional[list] = None) -> np.ndarray:
    """Decode an encoded image to uint8 [H, W, C] (C = 1 for grey, 3 otherwise).

    8-bit grey and RGB are kept as stored; other modes follow CONVERSIONS (16-bit grey is
    scaled by 1/257, not clipped), and the conversion applied is appended to `conversions`.
    Raises SourceError naming `where` for undecodable or unusable images."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            arr, conversion = _pixels(im, where)
    except SourceError:
        raise
    except Exception as e:  # PIL raises many types for bad data
        raise SourceError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None
    if conversion is not None and conversions is not None:
        conversions.append(conversion)
    return arr[:, :, None] if arr.ndim == 2 else arr


class Source:
    """Base class: `len`, `key(i)`, `label(i)`, `load(i) -> Record`, plus a description."""

    kind = "source"
    num_classes = 0
    class_names: list[str] = []

    def __len__(self) -> int:
        raise NotImplementedError

    def key(self, i: int) -> str:
        raise NotImplementedError

    def label(self, i: int) -> Optional[int]:
        return None

    def where(self, i: int) -> str:
        """Human-readable location of sample i, for error messages."""
        return f"{self.path} (key {self.key(i)})"

    def load(self, i: int) -> Record:
        raise NotImplementedError

    def content_size(self, i: int) -> Optional[int]:
        """Bytes of sample i's stored image, known without reading it; None where it is not
        (then `find_duplicates` compares keys only). Samples of different sizes differ, so
        only samples of equal size are hashed."""
        return None

    def content_digest(self, i: int) -> str:
        """sha256 of sample i as stored: its image bytes and what travels with it (label,
        caption), so that two digests agree only for the same sample written twice."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "samples": len(self),
                "num_classes": self.num_classes}


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:  # length-prefixed, so that ("ab", "c") and ("a", "bc") differ
        data = part if isinstance(part, bytes) else repr(part).encode()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


class ArraySource(Source):
    """Samples held in one uint8 array [N, H, W, C] (idx, CIFAR and npz all end up here)."""

    def __init__(self, path, images: np.ndarray, labels: Optional[np.ndarray], keys: list[str],
                 num_classes: int, kind: str, extra: Optional[dict] = None):
        self.path, self.images, self.labels, self.keys = path, images, labels, keys
        self.num_classes, self.kind, self.extra = num_classes, kind, extra or {}

    def __len__(self):
        return len(self.images)

    def key(self, i):
        return self.keys[i]

    def label(self, i):
        return None if self.labels is None else int(self.labels[i])

    def load(self, i):
        return Record(self.keys[i], np.ascontiguousarray(self.images[i]), self.label(i))

    def content_size(self, i):
        return int(self.images[i].nbytes)  # in memory: hashing every image is cheap

    def content_digest(self, i):
        return _digest(np.ascontiguousarray(self.images[i]).tobytes(), self.label(i))

    def describe(self):
        return {**super().describe(), **self.extra}


# ----------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST idx files
# ----------------------------------------------------------------------------------------

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (LeCun's format: 2 zero bytes, type code, ndim, big-endian dims)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise SourceError(f"{path}: cannot read idx file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise SourceError(f"{path}: not an idx file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise SourceError(f"{path}: unknown idx element type 0x{data[2]:02x}")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(dtypes[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != expected:
        raise SourceError(f"{path}: idx header says {dims} ({expected} bytes) but file holds "
                          f"{len(body)} bytes (truncated or corrupt)")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _find_idx(directory: Path, prefix: str, stem: str) -> Path:
    for name in (f"{prefix}-{stem}", f"{prefix}-{stem}.gz",
                 f"{prefix}-{stem.replace('-idx', '.idx')}", f"{prefix}-{stem.replace('-idx', '.idx')}.gz"):
        if (directory / name).is_file():
            return directory / name
    raise SourceError(f"{directory}: no {prefix}-{stem}[.gz] file (MNIST idx layout expected)")


def open_idx(path: Path, split: str) -> ArraySource:
    """MNIST-style directory (train-/t10k- images and labels) or a path to an images file."""
    if path.is_dir():
        prefix = {"train": "train", "test": "t10k"}[split]
        images_path = _find_idx(path, prefix, "images-idx3-ubyte")
        labels_path = _find_idx(path, prefix, "labels-idx1-ubyte")
    else:
        images_path = path
        labels_path = Path(str(path).replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1"))
        prefix = path.name.split("-")[0]
        if not labels_path.is_file():
            labels_path = None
    images = read_idx(images_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise SourceError(f"{images_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    labels = None
    if labels_path is not None:
        labels = read_idx(labels_path).astype(np.int64)
        if labels.shape != (len(images),):
            raise SourceError(f"{labels_path}: {labels.shape[0]} labels for {len(images)} images")
    keys = [f"{prefix}-{i:05d}" for i in range(len(images))]
    num_classes = int(labels.max()) + 1 if labels is not None else 0
    return ArraySource(images_path, images[:, :, :, None], labels, keys, num_classes, "idx",
                       {"split": split, "labels_file": str(labels_path) if labels_path else None})


# ----------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python batches
# ----------------------------------------------------------------------------------------

class _ArrayOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what a numpy array and plain containers need,
    so a doctored file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_cifar_pickle(data: bytes, where: str, needs: bytes = b"data") -> dict:
    try:
        batch = _ArrayOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise SourceError(f"{where}: not a CIFAR python batch ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict) or needs not in batch:
        raise SourceError(f"{where}: not a CIFAR python batch (no {needs!r} entry)")
    return batch


def open_cifar(path: Path, split: str) -> ArraySource:
    """CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test), as the directory
    `cifar-10-batches-py` / `cifar-100-python` or the original .tar.gz."""
    files: dict[str, bytes] = {}
    if path.is_dir():
        for p in sorted(path.iterdir()):
            if p.is_file():
                files[p.name] = p.read_bytes()
    elif tarfile.is_tarfile(path):
        try:
            with tarfile.open(path) as tar:
                for m in tar:
                    if m.isfile():
                        files[Path(m.name).name] = tar.extractfile(m).read()
                problem = tar_end_problem(tar)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise SourceError(f"{path}: corrupt or truncated archive ({type(e).__name__}: {e})") from None
        if problem:
            raise SourceError(f"{path}: {problem}; it holds {sorted(files)}: download it again")
    else:
        raise SourceError(f"{path}: expected a CIFAR batch directory or its .tar.gz")
    if "data_batch_1" in files:  # CIFAR-10
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, meta_name, names_key = b"labels", "batches.meta", b"label_names"
    elif "train" in files:  # CIFAR-100
        names = [split]
        label_key, meta_name, names_key = b"fine_labels", "meta", b"fine_label_names"
    else:
        raise SourceError(f"{path}: no CIFAR-10 data_batch_1 or CIFAR-100 train file found")
    images, labels, keys = [], [], []
    for name in names:
        if name not in files:
            raise SourceError(f"{path}: CIFAR batch {name} is missing")
        batch = _load_cifar_pickle(files[name], f"{path}/{name}")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise SourceError(f"{path}/{name}: expected data [N, 3072] uint8, got {data.shape}")
        # Rows are the R, G, B planes of a 32x32 image, one after another.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
        keys += [f"{name}-{i:05d}" for i in range(len(data))]
    class_names = []
    if meta_name in files:
        meta = _load_cifar_pickle(files[meta_name], f"{path}/{meta_name}", needs=names_key)
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    labels_all = np.concatenate(labels)
    num_classes = len(class_names) or int(labels_all.max()) + 1
    src = ArraySource(path, np.concatenate(images), labels_all, keys, num_classes, "cifar",
                      {"split": split, "batches": names})
    src.class_names = class_names
    return src


# ----------------------------------------------------------------------------------------
# .npz of arrays
# ----------------------------------------------------------------------------------------

def open_npz(path: Path) -> ArraySource:
    """An .npz with `images` (or `x`): uint8 [N, H, W], [N, H, W, C] or [N, C, H, W] (C <= 4),
    optional `labels` (or `y`) and `keys` (strings)."""
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:
        raise SourceError(f"{path}: cannot read .npz ({e})") from None
    name = next((n for n in ("images", "x", "arr_0") if n in npz.files), None)
    if name is None:
        raise SourceError(f"{path}: no 'images' (or 'x') array; holds {npz.files}")
    images = npz[name]
    if images.dtype != np.uint8:
        raise SourceError(f"{path}: '{name}' must be uint8 in [0, 255], got {images.dtype}")
    if images.ndim == 3:
        images = images[:, :, :, None]
    elif images.ndim == 4 and images.shape[1] in (1, 3, 4) and images.shape[3] not in (1, 3, 4):
        images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if images.ndim != 4 or images.shape[3] not in (1, 3, 4):
        raise SourceError(f"{path}: '{name}' must be [N, H, W(, C)], got {images.shape}")
    if images.shape[3] == 4:
        images = images[..., :3]
    label_name = next((n for n in ("labels", "y") if n in npz.files), None)
    labels = npz[label_name].astype(np.int64) if label_name else None
    if labels is not None and labels.shape != (len(images),):
        raise SourceError(f"{path}: '{label_name}' has shape {labels.shape}, expected ({len(images)},)")
    keys = [safe_key(str(k)) for k in npz["keys"]] if "keys" in npz.files else \
        [f"{i:07d}" for i in range(len(images))]
    num_classes = int(labels.max()) + 1 if labels is not None and len(labels) else 0
    return ArraySource(path, images, labels, keys, num_classes, "npz", {"array": name})


# ----------------------------------------------------------------------------------------
# Image folder
# ----------------------------------------------------------------------------------------

class FolderSource(Source):
    """Every image file under a directory (recursively), in sorted path order. With
    `class_from_folder`, the label is the index of the sorted top-level sub-folder name."""

    kind = "folder"

    def __init__(self, path: Path, class_from_folder: bool = False):
        self.path = path
        self.files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise SourceError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
        self.class_from_folder = class_from_folder
        self.labels = None
        if class_from_folder:
            tops = [f.split("/")[0] if "/" in f else None for f in self.files]
            loose = [f for f, t in zip(self.files, tops) if t is None]
            if loose:
                raise SourceError(f"{path}: class_from_folder needs every image inside a class "
                                  f"sub-folder; {loose[0]} is not")
            self.class_names = sorted(set(tops))
            index = {name: i for i, name in enumerate(self.class_names)}
            self.labels = [index[t] for t in tops]
            self.num_classes = len(self.class_names)
        self.keys = [safe_key(os.path.splitext(f)[0]) for f in self.files]

    def __len__(self):
        return len(self.files)

    def key(self, i):
        return self.keys[i]

    def label(self, i):
        return None if self.labels is None else self.labels[i]

    def where(self, i):
        return str(self.path / self.files[i])

    def load(self, i):
        where = self.where(i)
        try:
            data = (self.path / self.files[i]).read_bytes()
        except OSError as e:
            raise SourceError(f"{where}: cannot read ({e})") from None
        conversions: list = []
        image = decode_image_bytes(data, where, conversions)
        meta = {"file": self.files[i]}
        if conversions:  # recorded in the sample's json and counted in the manifest
            meta["converted"] = conversions[0]
        return Record(self.keys[i], image, self.label(i), meta=meta)

    def content_size(self, i):
        try:
            return (self.path / self.files[i]).stat().st_size
        except OSError:
            return None  # unreadable: load() names it

    def content_digest(self, i):
        return _digest((self.path / self.files[i]).read_bytes(), self.label(i))

    def describe(self):
        return {**super().describe(), "class_from_folder": self.class_from_folder,
                "class_names": self.class_names}


# ----------------------------------------------------------------------------------------
# img2dataset-style WebDataset shards
# ----------------------------------------------------------------------------------------

def webdataset_members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, ext, member) for each sample file of an open WebDataset tar, in stored order.

    The key is the path up to the first dot of the file name (WebDataset's rule), the ext
    what follows that dot; directories, hidden files and names without a dot are no sample's.
    """
    for m in tar:
        if not m.isfile():
            continue
        base = m.name.rsplit("/", 1)[-1]
        if base.startswith(".") or "." not in base:
            continue
        stem, ext = base.split(".", 1)
        yield m.name[: len(m.name) - len(base)] + stem, ext, m


TAR_BLOCK = 512


def tar_end_problem(tar: tarfile.TarFile) -> Optional[str]:
    """Why an open tar, iterated to its last member, is not whole; None when it is.

    A tar ends with the end-of-archive marker, two 512-byte blocks of zeros, after its last
    member. A copy or download killed between two members leaves a file that tarfile reads
    without complaint as a shorter archive, so the marker is looked for explicitly (a file
    cut inside a member is refused by tarfile itself)."""
    end = tar.offset  # after iteration: where the header after the last member starts
    tar.fileobj.seek(end)
    tail = tar.fileobj.read(2 * TAR_BLOCK)
    if len(tail) < 2 * TAR_BLOCK or tail.count(0) != len(tail):
        return (f"the tar ends early: no end-of-archive marker (two zero blocks) after its last "
                f"member, at byte {end} (a copy or download cut between two members)")
    return None


def img2dataset_stats(tar_path: str | os.PathLike) -> tuple[Optional[Path], Optional[int]]:
    """(path, samples written) from img2dataset's `<shard>_stats.json` beside `<shard>.tar`
    ("successes"), or (None, None) where there is none."""
    path = Path(str(tar_path)[: -len(".tar")] + "_stats.json")
    if not str(tar_path).endswith(".tar") or not path.is_file():
        return None, None
    try:
        stats = json.loads(path.read_text())
        return path, int(stats["successes"])
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise SourceError(f"{path}: unreadable img2dataset stats ({type(e).__name__}: {e})") from None


class WebDatasetSource(Source):
    """Tar shards as img2dataset writes them: `<key>.jpg|png|webp`, `<key>.txt` (caption),
    `<key>.json` (metadata). The tars are scanned once for member offsets so that any sample
    can then be read directly (parallel workers read only their own samples).

    A sample is a run of consecutive members with one key (WebDataset's rule); a member whose
    extension the current sample already has starts a new sample, so a sample written twice
    is two samples (`find_duplicates` finds them) and no member replaces another. Each tar must
    end with the end-of-archive marker and hold as many samples as img2dataset's
    `<shard>_stats.json` records where there is one; otherwise it is refused, named, with
    what is missing."""

    kind = "webdataset"
    IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

    def __init__(self, path: Path, label_field: str = ""):
        self.path = path
        tars = sorted(path.glob("*.tar")) if path.is_dir() else [path]
        if not tars:
            raise SourceError(f"{path}: no .tar shards found")
        self.tars = [str(t) for t in tars]
        self.label_field = label_field
        # Per sample: (tar index, {ext: (offset, size)}, key, position in its tar if the key
        # is there twice, else None)
        self.samples: list[tuple[int, dict, str, int]] = []
        for t_i, tar_path in enumerate(self.tars):
            self.samples += self._scan(t_i, tar_path)
        if not self.samples:
            raise SourceError(f"{path}: the shards hold no samples with an image")
        self.keys = [safe_key(s[2]) for s in self.samples]
        self.labels = None
        if label_field:
            self.labels = [self._read_label(i) for i in range(len(self.samples))]
            self.num_classes = max(self.labels) + 1

    def _scan(self, t_i: int, tar_path: str) -> list:
        groups: list[tuple[str, dict]] = []
        try:
            with tarfile.open(tar_path) as tar:
                for key, ext, m in webdataset_members(tar):
                    ext = ext.lower()
                    if not groups or groups[-1][0] != key or ext in groups[-1][1]:
                        groups.append((key, {}))
                    groups[-1][1][ext] = (m.offset_data, m.size)
                problem = tar_end_problem(tar)
        except (tarfile.TarError, OSError, EOFError) as e:
            # Cut inside a member (the usual end of a killed download): the samples before the
            # cut are known, say what is lost as for a cut between members.
            problem = f"corrupt or truncated tar ({e})"
            groups = groups[:-1]  # the last run of members may be the one cut short
        out = [(t_i, comps, key) for key, comps in groups if any(e in comps for e in self.IMAGE_EXTS)]
        # A run of members without an image would vanish here: a key written again with only
        # its caption or metadata (a restarted download) would silently lose them, and a
        # caption without its image is not a sample. Both are named and refused, never dropped.
        imageless = [(key, comps) for key, comps in groups if not any(e in comps for e in self.IMAGE_EXTS)]
        if imageless and not problem:
            with_image = {s[2] for s in out}
            key, comps = imageless[0]
            what = ("the key's sample is there with an image too: the key was written again "
                    "without it (a restarted download?)" if key in with_image else
                    "no member of that key has an image")
            raise SourceError(
                f"{tar_path}: member(s) {', '.join(f'{key}.{e}' for e in sorted(comps))} hold no "
                f"image ({'/'.join(self.IMAGE_EXTS)}): {what}; {len(imageless)} such run(s) of "
                f"members in this tar (first shown). They would be lost without a word: remove "
                "them from the tar, or write the tar again")
        # The position in the tar tells apart the samples of a key written twice (where()).
        times = Counter(s[2] for s in out)
        out = [(*s, n if times[s[2]] > 1 else None) for n, s in enumerate(out)]
        stats_path, recorded = img2dataset_stats(tar_path)
        missing = (f"; {stats_path.name} records {recorded} samples: {max(recorded - len(out), 0)} "
                   "are missing" if recorded is not None else "; the samples after it are missing")
        if problem:
            last = f", the last {out[-1][2]}" if out else ""
            raise SourceError(f"{tar_path}: {problem}; {len(out)} samples read{last}{missing}. "
                              "Download or copy this tar again, or move it out of the source")
        if recorded is not None and recorded != len(out):
            raise SourceError(f"{tar_path}: holds {len(out)} samples with an image but "
                              f"{stats_path.name} records {recorded} successful downloads "
                              f"({abs(recorded - len(out))} {'missing' if recorded > len(out) else 'more than recorded'}); "
                              "download this shard again, or move it out of the source")
        return out

    def _read(self, i: int, ext: str) -> Optional[bytes]:
        t_i, comps = self.samples[i][:2]
        if ext not in comps:
            return None
        offset, size = comps[ext]
        with open(self.tars[t_i], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise SourceError(f"{self.tars[t_i]}: truncated at sample {self.samples[i][2]}")
        return data

    def _meta(self, i: int) -> dict:
        raw = self._read(i, "json")
        if raw is None:
            return {}
        try:
            meta = json.loads(raw)
        except ValueError as e:
            raise SourceError(f"{self.where(i)}: bad json metadata ({e})") from None
        return meta if isinstance(meta, dict) else {"value": meta}

    def _read_label(self, i: int) -> int:
        meta = self._meta(i)
        if self.label_field not in meta:
            raise SourceError(f"{self.where(i)}: json metadata has no '{self.label_field}' label")
        return int(meta[self.label_field])

    def __len__(self):
        return len(self.samples)

    def key(self, i):
        return self.keys[i]

    def label(self, i):
        return None if self.labels is None else self.labels[i]

    def where(self, i):
        t_i, _, key, n = self.samples[i]
        return f"{self.tars[t_i]} (sample {key}{'' if n is None else f', #{n + 1} in the tar'})"

    def content_size(self, i):
        comps = self.samples[i][1]
        return comps[next(e for e in self.IMAGE_EXTS if e in comps)][1]

    def content_digest(self, i):
        comps = self.samples[i][1]
        ext = next(e for e in self.IMAGE_EXTS if e in comps)
        return _digest(self._read(i, ext), self._read(i, "txt"), self.label(i))

    def load(self, i):
        comps = self.samples[i][1]
        ext = next(e for e in self.IMAGE_EXTS if e in comps)
        conversions: list = []
        image = decode_image_bytes(self._read(i, ext), self.where(i), conversions)
        caption = self._read(i, "txt")
        meta = self._meta(i)
        # Keep the metadata small and JSON-safe: it is copied into every shard sample.
        meta = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, type(None)))}
        if conversions:  # recorded in the sample's json and counted in the manifest
            meta["converted"] = conversions[0]
        return Record(self.keys[i], image, self.label(i),
                      caption.decode("utf-8", "replace") if caption is not None else None, meta)

    def describe(self):
        return {**super().describe(), "tars": len(self.tars), "label_field": self.label_field}


# ----------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------

SOURCE_FORMATS = ("auto", "folder", "cifar", "idx", "npz", "webdataset")


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if path.is_file():
        if name.endswith(".npz"):
            return "npz"
        if "idx3" in name or "idx1" in name:
            return "idx"
        if name.endswith((".tar.gz", ".tgz")) and "cifar" in name:
            return "cifar"
        if name.endswith(".tar"):
            return "webdataset"
        raise SourceError(f"{path}: cannot tell the source format; pass --format")
    if not path.is_dir():
        raise SourceError(f"{path}: no such file or directory")
    entries = {p.name for p in path.iterdir()}
    if "data_batch_1" in entries or ({"train", "meta"} <= entries):
        return "cifar"
    if any("idx3-ubyte" in e for e in entries):
        return "idx"
    if any(e.endswith(".tar") for e in entries):
        return "webdataset"
    return "folder"


# Format names accepted by `--source NAME --path PATH`.
FORMAT_NAMES = {"cifar10": "cifar", "cifar100": "cifar", "cifar": "cifar", "mnist": "idx",
                "fashion-mnist": "idx", "idx": "idx", "folder": "folder", "images": "folder",
                "npz": "npz", "webdataset": "webdataset", "img2dataset": "webdataset",
                "auto": "auto"}


def open_named_source(source: str, path: Optional[str] = None, fmt: str = "auto",
                      split: str = "train", class_from_folder: bool = False,
                      label_field: str = "") -> Source:
    """make_shards' `--source X [--path P]`: X is a path or a named source, or, with a path,
    a format name (FORMAT_NAMES) for that path."""
    if path:
        fmt = FORMAT_NAMES.get(source.lower())
        if fmt is None:
            raise SourceError(f"--source {source!r} with --path: expected a format name, "
                              f"one of {', '.join(sorted(FORMAT_NAMES))}")
        source = path
    return open_source(source, fmt, split, class_from_folder, label_field)


def open_source(spec: str, fmt: str = "auto", split: str = "train",
                class_from_folder: bool = False, label_field: str = "") -> Source:
    """Open a source by path (or a name from NAMED_SOURCES, e.g. 'fashion-mnist')."""
    if spec in NAMED_SOURCES:
        directory, split = NAMED_SOURCES[spec]
        if not Path(directory).is_dir():
            raise SourceError(f"source {spec!r}: {directory} is missing "
                              "(install Debian's dataset-fashion-mnist package)")
        source = open_idx(Path(directory), split)
        source.class_names = list(FASHION_MNIST_CLASSES)
        source.extra["name"] = spec
        return source
    else:
        path = Path(spec)
    if fmt not in SOURCE_FORMATS:
        raise SourceError(f"--format {fmt!r}: expected one of {', '.join(SOURCE_FORMATS)}")
    if split not in ("train", "test"):
        raise SourceError(f"--split {split!r}: expected 'train' or 'test'")
    if fmt == "auto":
        fmt = detect_format(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    if fmt == "idx":
        return open_idx(path, split)
    if fmt == "cifar":
        return open_cifar(path, split)
    if fmt == "npz":
        return open_npz(path)
    if fmt == "webdataset":
        return WebDatasetSource(path, label_field)
    return FolderSource(path, class_from_folder)


# ----------------------------------------------------------------------------------------
# Geometry and subset choice
# ----------------------------------------------------------------------------------------

FIT_MODES = ("auto", "crop", "pad")


def fit_image(image: np.ndarray, resolution: int, channels: int, mode: str = "auto",
              where: str = "") -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [resolution, resolution, channels].

    "crop": resize the shorter side to `resolution` (Lanczos), then centre-crop.
    "pad": centre the image on a background of 0 (= -1 in model units); never resamples, so
    Fashion-MNIST's 28x28 digits keep their exact pixels in a 32x32 frame.
    "auto": pad when the image fits, otherwise crop.
    """
    h, w, c = image.shape
    if channels not in (1, 3):
        raise SourceError(f"channels must be 1 or 3, got {channels}")
    if c != channels:
        if channels == 3:
            image = np.repeat(image[:, :, :1], 3, axis=2)
        else:  # ITU-R 601 luma, as PIL's convert("L")
            image = np.array(Image.fromarray(image[:, :, :3]).convert("L"))[:, :, None]
    if mode == "auto":
        mode = "pad" if h <= resolution and w <= resolution else "crop"
    if mode == "pad":
        if h > resolution or w > resolution:
            raise SourceError(f"{where}: image {h}x{w} is larger than {resolution}; use --fit crop")
        out = np.zeros((resolution, resolution, channels), dtype=np.uint8)
        top, left = (resolution - h) // 2, (resolution - w) // 2
        out[top:top + h, left:left + w] = image
        return out
    if mode != "crop":
        raise SourceError(f"--fit {mode!r}: expected one of {', '.join(FIT_MODES)}")
    if (h, w) == (resolution, resolution):
        return np.ascontiguousarray(image)
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    pil = Image.fromarray(image[:, :, 0] if channels == 1 else image)
    pil = pil.resize((nw, nh), Image.LANCZOS)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    out = np.array(pil.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


DUPLICATE_POLICIES = ("error", "keep-first")


def find_duplicates(source: Source) -> list[dict]:
    """The samples of `source` that repeat an earlier one (source order), each as
    {"index", "key", "where", "first", "reason"}: the same key (a sample written twice, two
    shards that overlap, a.png beside a.jpg, names that differ only in characters keys drop),
    or, without the same key, the same sample written under another key (same image bytes,
    label and caption: compared where the source knows sizes cheaply, hashing only samples
    of equal size). "first" is where the earlier one is; "reason" says which and whether
    the two images are the same."""
    first_of_key: dict[str, int] = {}
    first_of_size: dict[int, int] = {}   # -1 once the first of that size has been hashed
    by_digest: dict[str, int] = {}
    digests: dict[int, Optional[str]] = {}

    def digest(i: int) -> Optional[str]:
        if i not in digests:
            try:
                digests[i] = source.content_digest(i)
            except (NotImplementedError, OSError):
                digests[i] = None  # unreadable: the writer names it when it loads the sample
        return digests[i]

    out = []
    for i in range(len(source)):
        key = source.key(i)
        size = source.content_size(i)
        if key in first_of_key:
            j = first_of_key[key]
            same = size is not None and size == source.content_size(j) and digest(i) == digest(j)                 and digest(i) is not None
            out.append({"index": i, "key": key, "where": source.where(i), "first": source.where(j),
                        "reason": "same key, same sample" if same else "same key, another image"})
            continue
        first_of_key[key] = i
        if size is None:
            continue
        if size not in first_of_size:  # the only one of its size so far: not hashed (yet)
            first_of_size[size] = i
            continue
        j = first_of_size[size]
        if j >= 0:  # a second sample of this size: now the first is hashed too
            if digest(j) is not None:
                by_digest.setdefault(digest(j), j)
            first_of_size[size] = -1
        d = digest(i)
        if d is not None and d in by_digest:
            out.append({"index": i, "key": key, "where": source.where(i),
                        "first": source.where(by_digest[d]), "reason": "same sample under another key"})
        elif d is not None:
            by_digest[d] = i
    return out


def resolve_duplicates(source: Source, policy: str = "error") -> list[dict]:
    """Apply a `--duplicates` policy to `find_duplicates(source)`; return the samples left out.

    "error" (the default) refuses any duplicate, naming the first and both places: two
    samples under one key are usually two different pictures (a.png beside a.jpg, two
    downloads of one shard), and which one is meant is the user's call. "keep-first" keeps
    the first in source order and returns the rest, for the manifest and the screen."""
    if policy not in DUPLICATE_POLICIES:
        raise SourceError(f"--duplicates {policy!r}: expected one of {', '.join(DUPLICATE_POLICIES)}")
    dups = find_duplicates(source)
    if dups and policy == "error":
        d = dups[0]
        raise SourceError(f"{d['where']}: repeats {d['first']} ({d['reason']}, key {d['key']!r}); "
                          f"{len(dups)} duplicate samples in {source.path} in all. Pass "
                          "--duplicates keep-first to keep the first of each (the others are "
                          "listed in the manifest), or remove them from the source")
    return dups


def choose_subset(source: Source, count: int = 0, per_class: int = 0, heldout: int = 0,
                  seed: int = 0, exclude: frozenset = frozenset()) -> tuple[list[int], list[int]]:
    """Seeded choice of (training indices, held-out indices), disjoint.

    The training list comes out in a seeded random order, so that any prefix of it (what
    `data.subset` takes at training time) is itself a random subset. `count` = 0 and
    `per_class` = 0 take every image not held out. Indices in `exclude` (duplicates left
    out) are never chosen; the others keep the order they have without it.
    """
    perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x53554253]))).permutation(len(source))
    if exclude:
        perm = np.array([i for i in perm if int(i) not in exclude], dtype=np.int64)
    n = len(perm)
    if count and per_class:
        raise SourceError("choose either --count or --per-class, not both")
    if per_class:
        if source.num_classes == 0:
            raise SourceError(f"--per-class needs labelled data; {source.path} has no labels")
        taken: dict[int, int] = {}
        train, rest = [], []
        for i in perm:
            lab = source.label(int(i))
            if taken.get(lab, 0) < per_class:
                taken[lab] = taken.get(lab, 0) + 1
                train.append(int(i))
            else:
                rest.append(int(i))
        short = {c: k for c, k in taken.items() if k < per_class}
        missing = [c for c in range(source.num_classes) if c not in taken]
        if short or missing:
            raise SourceError(f"--per-class {per_class}: classes {sorted(short) + missing} have "
                              "fewer images than that")
        if heldout > len(rest):
            raise SourceError(f"--heldout {heldout}: only {len(rest)} images remain")
        return train, rest[:heldout]
    if count + heldout > n:
        raise SourceError(f"--count {count} + --heldout {heldout} exceeds the {n} images in "
                          f"{source.path}")
    if count == 0:
        count = n - heldout
    return [int(i) for i in perm[:count]], [int(i) for i in perm[count:count + heldout]]
