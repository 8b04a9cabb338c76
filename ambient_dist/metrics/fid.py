"""Frechet Inception Distance: feature statistics, a cache of reference statistics, the distance.

    FID = ||mu_g - mu_r||^2 + tr(S_g + S_r - 2 (S_g S_r)^(1/2))

Statistics are streamed (`FeatureMoments`: running sum and sum of outer products in float64,
all-reduced over ranks), so 50k x 2048 features never need to be held at once. Reference
statistics (the FULL dataset, objective.md section 6) are computed once per (extractor,
dataset) and cached as .npz files named by the extractor and the dataset hash.

tr((S_g S_r)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
symmetric matrix S_r^(1/2) S_g S_r^(1/2) (same spectrum as S_g S_r, but symmetric, so the
eigensolver is the stable one and the eigenvalues are real).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from ambient_dist import distributed as ranks
from ambient_dist.errors import UserError
from ambient_dist.fileio import atomic_path


class StatisticsError(UserError, ValueError):
    """FID statistics that cannot be compared (feature sizes differ) or read (keys, shapes)."""


class FeatureMoments:
    """Running first and second moments of feature vectors (float64), mergeable over ranks."""

    def __init__(self, dim: int):
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> None:
        f = features.detach().cpu().double()
        self.count += len(f)
        self.total += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self) -> None:
        """Sum the moments of every rank (each rank saw a different slice of the images)."""
        packed = ranks.sum_over_ranks(torch.cat([torch.tensor([float(self.count)], dtype=torch.float64),
                                                 self.total, self.outer.flatten()]))
        d = len(self.total)
        self.count = int(round(packed[0].item()))
        self.total = packed[1:1 + d].clone()
        self.outer = packed[1 + d:].reshape(d, d).clone()

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean [D], unbiased covariance [D, D]) as float64 numpy arrays."""
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.count}")
        mu = self.total / self.count
        cov = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.numpy(), cov.numpy()


def feature_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    moments = FeatureMoments(features.shape[1])
    moments.update(features)
    return moments.statistics()


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64 throughout)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise StatisticsError(f"FID statistics of different feature sizes: {mu1.shape} vs {mu2.shape}")
    root = _sqrt_psd(sigma2)
    middle = root @ sigma1 @ root
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


# --------------------------------------------------------------------------------------
# Cached reference statistics
# --------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def stats_cache_path(cache_dir: str | os.PathLike, extractor_key: str, dataset_hash: str) -> Path:
    """extractor_key: the extractor's cache_key (its name and weights digest)."""
    return Path(cache_dir) / f"fidstats-{_slug(extractor_key)}-{dataset_hash[:16]}.npz"


def save_statistics(path: Path, mu: np.ndarray, sigma: np.ndarray, count: int,
                    image_shape: Optional[list[int]] = None) -> None:
    """image_shape: [C, H, W] of the images (recorded so that a later --fid-reference of this
    file can be checked against the samples' shape)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if image_shape is None else {"image_shape": np.asarray(image_shape, np.int64)}
    with atomic_path(path, suffix=".npz") as tmp:  # np.savez appends .npz to other names
        np.savez(tmp, mu=mu, sigma=sigma, count=np.int64(count), **extra)


def load_statistics(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, count) from our cache files, or from EDM / StyleGAN reference files
    (same `mu` and `sigma` keys, no count: reported as 0)."""
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f or "sigma" not in f:
            raise StatisticsError(f"FID statistics {path}: needs arrays 'mu' and 'sigma', has {sorted(f.files)}")
        mu, sigma = f["mu"], f["sigma"]
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise StatisticsError(f"FID statistics {path}: mu {list(mu.shape)} and sigma "
                                  f"{list(sigma.shape)} are not a mean [D] and covariance [D, D]")
        return mu, sigma, int(f["count"]) if "count" in f else 0


def recorded_image_shape(path: Path) -> Optional[list[int]]:
    """[C, H, W] of the images a statistics file was computed from, if it records it (ours
    do; EDM / StyleGAN reference files do not)."""
    with np.load(path, allow_pickle=False) as f:
        return [int(v) for v in f["image_shape"]] if "image_shape" in f else None


def streamed_statistics(extractor, batches: Iterable[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, count) of the features of every rank's `batches` (this rank's share)."""
    moments = None
    for batch in batches:
        f = extractor(batch).cpu()
        moments = moments or FeatureMoments(f.shape[1])
        moments.update(f)
    moments = moments or FeatureMoments(extractor.dim)
    moments.all_reduce()
    mu, sigma = moments.statistics()
    return mu, sigma, moments.count


def reference_statistics(extractor, batches: Iterable[torch.Tensor], dataset_hash: str,
                         cache_dir: Optional[str | os.PathLike] = None,
                         image_shape: Optional[list[int]] = None
                         ) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, count) of the reference set, from the cache if present.

    `batches` yields this rank's image batches (only consumed on a cache miss); rank 0
    writes the cache file. Every rank must see the same cache state (a shared directory)."""
    path = stats_cache_path(cache_dir, extractor.cache_key, dataset_hash) if cache_dir else None
    if path is not None and path.is_file():
        return load_statistics(path)
    mu, sigma, count = streamed_statistics(extractor, batches)
    rank, _ = ranks.rank_and_world()
    if path is not None and rank == 0:
        save_statistics(path, mu, sigma, count, image_shape)
    return mu, sigma, count


def fid_against(extractor, batches: Iterable[torch.Tensor], reference: tuple) -> float:
    """FID of the images in `batches` (this rank's share) against reference (mu, sigma, ...)."""
    mu, sigma, _ = streamed_statistics(extractor, batches)
    return frechet_distance(mu, sigma, reference[0], reference[1])
