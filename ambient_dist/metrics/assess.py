"""One assessment of generated images: the single path every evaluation goes through.

    assess(generated, train, calibration, eval_cfg, spaces=..., quality=..., attraction=...)

returns {"memorization": {space: memorization_summary}, "quality": {...} or None,
"attraction": {...} or None}. Its callers only choose the inputs and lay out the output:

    engine.run.finish        the end of a training run (its configured space + pixels, the
                             task's attraction; memorization.json)
    metrics.evaluation       ambient-evaluate (one space; KID + FID against held-out images
                             with --quality-reference heldout; attraction with
                             --attraction-sigmas)
    study.stages             the study's evaluate stage (pixels + the study's feature spaces,
                             KID + FID against `quality_reference` held-out images, attraction)

so a study's row for a run is what ambient-evaluate reports for it with the same settings.
Units: images are uint8 [N, C, H, W] or float [N, C, H, W] in [-1, 1] (every extractor
converts with as_model_units, so both give the same numbers).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ambient_dist.metrics import fid as fidlib
from ambient_dist.metrics.features import build_extractor, extract, images_digest
from ambient_dist.metrics.kid import kernel_inception_distance
from ambient_dist.metrics.memorization import memorization_summary


@dataclass
class QualityReference:
    """The real images KID and FID are measured against (Inception pool3 features).

    images: uint8 or float [-1, 1] [N, C, H, W]; name: how the report describes them;
    cache_dir: where their features are kept between processes (None: not kept)."""
    images: torch.Tensor
    name: str
    cache_dir: Optional[str | os.PathLike] = None


def reference_features(extractor, ref: QualityReference, batch: int, progress: bool = False
                       ) -> torch.Tensor:
    """Inception features float32 [N, 2048] of the reference images, from ref.cache_dir when
    they were extracted before (keyed by the extractor's weights and the images' digest)."""
    path = None
    if ref.cache_dir is not None:
        key = f"{extractor.cache_key}-{images_digest(ref.images)[:16]}"
        path = Path(ref.cache_dir) / f"quality-{''.join(c if c.isalnum() else '_' for c in key)}.pt"
        if path.is_file():
            return torch.load(path)
    feats = extract(extractor, ref.images, batch, progress=progress, desc="reference features")
    if path is not None:
        from ambient_dist import distributed as ranks
        from ambient_dist.fileio import atomic_path
        if ranks.rank_and_world()[0] == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:  # runs evaluated at once may share the cache
                torch.save(feats, tmp)
    return feats


def assess(generated: torch.Tensor, train: torch.Tensor, calibration: Optional[torch.Tensor],
           eval_cfg, *, spaces: Sequence[str] = (), quality: Optional[QualityReference] = None,
           attraction: Optional[Callable[[], Optional[dict]]] = None, device="cpu",
           batch: int = 50, progress: bool = False, train_features: Optional[dict] = None) -> dict:
    """Memorization in each of `spaces` (default: eval_cfg.memorization_features), quality and
    the denoiser attraction of one set of generated images.

    generated [M, C, H, W], train [N, ...] (the images trained on), calibration (held-out
    images never trained on, or None): uint8 or float [-1, 1]. eval_cfg: an EvaluationConfig
    (thresholds, extractor paths; its memorization_features is replaced per space).
    quality: KID (with its standard error) and FID against these real images, on Inception
    features shared with an "inception" memorization space. attraction: called once, its
    result reported as is (the task knows its network and sampler). train_features: already
    extracted training features per space. Every rank must call it (extraction splits over
    ranks). Returns {"memorization": {space: summary}, "quality": {"kid": {value, stderr,
    blocks, num_samples, num_reference}, "fid": float, "reference": name, "extractor": name}
    or None, "attraction": dict or None}. Raises FeatureError for an extractor that cannot be
    built, ImageRangeError for images in the wrong units."""
    spaces = list(spaces) or [eval_cfg.memorization_features]
    inception_feats = None
    inception = None
    if quality is not None or "inception" in spaces:
        inception = build_extractor("inception", eval_cfg.inception_path, device=device)
    if quality is not None:
        inception_feats = extract(inception, generated, batch, progress=progress,
                                  desc="sample features")
    memorization = {}
    for space in spaces:
        ecfg = dataclasses.replace(eval_cfg, memorization_features=space)
        memorization[space] = memorization_summary(
            generated, train, calibration, ecfg, device, batch_size=batch, progress=progress,
            train_features=(train_features or {}).get(space),
            generated_features=inception_feats if space == "inception" else None)
    result = {"memorization": memorization, "quality": None, "attraction": None}
    if quality is not None:
        ref_feats = reference_features(inception, quality, batch, progress)
        mu_g, s_g = fidlib.feature_statistics(inception_feats)
        mu_r, s_r = fidlib.feature_statistics(ref_feats)
        result["quality"] = {"kid": kernel_inception_distance(inception_feats, ref_feats),
                             "fid": fidlib.frechet_distance(mu_g, s_g, mu_r, s_r),
                             "reference": quality.name, "extractor": inception.name}
    if attraction is not None:
        result["attraction"] = attraction()
    return result
