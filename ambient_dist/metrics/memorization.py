"""Memorization: how close each generated image is to its nearest training image.

objective.md section 6, in a pluggable feature space (named in every summary):

    score(x)      = max over training images y of cos(f(x), f(y))          (the paper's metric)
    fraction      = share of generated images with score above each threshold
    calibration   = the same for held-out real images (never trained on) against the training
                    set: a threshold means little until you know how often distinct real
                    images exceed it (raw pixels: most of them do)
    Carlini       = d(x, nearest) < 1/3 * mean d(x, its 50 nearest), with d the L2 distance
                    between normalised features: a copy is much closer to one training image
                    than to the rest of its neighbourhood, whatever the space's scale

Nearest neighbours: cosine similarities come from chunked matrix products (queries x keys in
blocks that fit memory) with a running top-k, so 50k x 1M is a stream of GEMMs on one GPU.
With a process group up, the training set is split over ranks, each finds its local top-k,
and the candidates are gathered and merged: the answer equals the brute-force one.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ambient_dist import distributed as ranks
from ambient_dist.metrics.features import build_extractor, check_same_shape, extract, reference_features
from ambient_dist.noise import check_image_range

CARLINI_NEIGHBOURS = 50
CARLINI_RATIO = 1.0 / 3.0
# Thresholds were calibrated in DINOv2 space (objective.md section 6); anywhere else they are
# only a reference point and the held-out calibration is what to read.
CALIBRATED_SPACE = "dinov2"


def _fits_on_device(t: torch.Tensor, device: torch.device) -> bool:
    """Whether `t` can live on a CUDA device with room to spare (half its free memory)."""
    if device.type != "cuda" or t.device == device:
        return t.device == device
    free, _ = torch.cuda.mem_get_info(device)
    return t.numel() * t.element_size() < free // 2


@torch.no_grad()
def local_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, offset: int = 0,
               query_chunk: int = 4096, key_chunk: int = 16384, device="cpu"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k inner products of each query against `keys` -> (values [Q, k'], indices [Q, k'])
    with k' = min(k, len(keys)), values descending, indices offset by `offset`.

    Blocks of key_chunk keys are multiplied at a time and merged into the running top-k, so
    memory is O(query_chunk * (key_chunk + k)) whatever the number of keys."""
    device = torch.device(device)
    k = min(k, len(keys))
    if _fits_on_device(keys, device):
        keys = keys.to(device)  # once, instead of once per query chunk
    out_v = torch.empty(len(queries), k)
    out_i = torch.empty(len(queries), k, dtype=torch.long)
    for q0 in range(0, len(queries), query_chunk):
        q = queries[q0:q0 + query_chunk].to(device)
        best_v = torch.full((len(q), 0), -math.inf, device=device)
        best_i = torch.zeros((len(q), 0), dtype=torch.long, device=device)
        for k0 in range(0, len(keys), key_chunk):
            block = keys[k0:k0 + key_chunk].to(device)
            sims = q @ block.T
            ids = torch.arange(k0, k0 + len(block), device=device).expand(len(q), -1)
            cand_v = torch.cat([best_v, sims], 1)
            cand_i = torch.cat([best_i, ids], 1)
            best_v, pos = cand_v.topk(min(k, cand_v.shape[1]), dim=1)
            best_i = cand_i.gather(1, pos)
        out_v[q0:q0 + len(q)] = best_v.cpu()
        out_i[q0:q0 + len(q)] = best_i.cpu() + offset
    return out_v, out_i


@torch.no_grad()
def nearest_neighbours(queries: torch.Tensor, keys: torch.Tensor, k: int = 1,
                       device="cpu", **chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k inner products of queries [Q, D] against keys [K, D] (both normalised for cosine)
    -> (values [Q, min(k, K)] descending, indices into keys).

    Under a process group every rank passes the same queries and keys; rank r searches its
    contiguous slice of the keys and the per-rank candidates are merged (all_gather + top-k)."""
    rank, world = ranks.rank_and_world()
    if world == 1:
        return local_topk(queries, keys, k, device=device, **chunks)
    k = min(k, len(keys))
    lo, hi = ranks.slice_bounds(len(keys), rank, world)
    vals, idx = local_topk(queries, keys[lo:hi], k, offset=lo, device=device, **chunks)
    # A slice shorter than k pads with -inf so every rank sends the same shape.
    pad = k - vals.shape[1]
    if pad:
        vals = torch.cat([vals, torch.full((len(queries), pad), -math.inf)], 1)
        idx = torch.cat([idx, torch.full((len(queries), pad), -1, dtype=torch.long)], 1)
    dev = ranks.collective_device()
    all_v = [torch.empty_like(vals, device=dev) for _ in range(world)]
    all_i = [torch.empty_like(idx, device=dev) for _ in range(world)]
    dist.all_gather(all_v, vals.to(dev))
    dist.all_gather(all_i, idx.to(dev))
    cand_v, cand_i = torch.cat(all_v, 1).cpu(), torch.cat(all_i, 1).cpu()
    best_v, pos = cand_v.topk(k, dim=1)
    return best_v, cand_i.gather(1, pos)


def similarity_statistics(max_sim: torch.Tensor, nearest: torch.Tensor, carlini_ratio: torch.Tensor,
                          thresholds: list[float]) -> dict:
    """Summary of one set's nearest-neighbour similarities; the whole distribution is kept."""
    s = max_sim.double().numpy()
    flagged = carlini_ratio < CARLINI_RATIO
    return {
        "count": int(len(s)),
        "mean": float(s.mean()), "median": float(np.median(s)),
        "p95": float(np.percentile(s, 95)), "min": float(s.min()), "max": float(s.max()),
        "fraction_above": {f"{t:g}": float((s > t).mean()) for t in thresholds},
        "carlini_fraction": float(flagged.float().mean()),
        "max_similarity": [float(v) for v in s],
        "nearest_index": [int(i) for i in nearest],
        "carlini_ratio": [float(r) for r in carlini_ratio],
    }


def neighbour_statistics(queries: torch.Tensor, train: torch.Tensor, thresholds: list[float],
                         device="cpu") -> dict:
    """Nearest training neighbours of normalised query features -> similarity_statistics."""
    k = min(CARLINI_NEIGHBOURS, len(train))
    sims, idx = nearest_neighbours(queries, train, k=k, device=device)
    # On the unit sphere ||a - b||^2 = 2 - 2 cos: the top-k by cosine are the k nearest in L2.
    dists = (2 - 2 * sims.double()).clamp_min(0).sqrt()
    carlini = dists[:, 0] / dists.mean(1).clamp_min(1e-12)
    return similarity_statistics(sims[:, 0], idx[:, 0], carlini.float(), thresholds)


def normalised(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.float(), dim=1)


def memorization_summary(generated: torch.Tensor, train_images: torch.Tensor,
                         heldout_images: Optional[torch.Tensor], eval_cfg, device="cpu",
                         batch_size: int = 50, progress: bool = False,
                         train_features: Optional[torch.Tensor] = None,
                         generated_features: Optional[torch.Tensor] = None) -> dict:
    """Nearest-training-image similarity of generated images, calibrated by held-out images.

    generated / train_images / heldout_images: float [N, C, H, W] in [-1, 1] (or uint8; float
    sets in [0, 1] or 0..255 raise ImageRangeError);
    heldout_images may be None (the summary then says there is no calibration).
    eval_cfg: an `EvaluationConfig` (feature space, model paths, thresholds).
    train_features: already-extracted training features (evaluate.py passes them); otherwise
    they come from the per-process cache, so repeated calls embed the training set once.
    generated_features: the generated images' features in this space, if already extracted
    (the study reuses its Inception features for KID).
    Every set must have the same [C, H, W] (ImageShapeError otherwise, features.check_same_shape).
    Returns a JSON-ready dict: feature space, thresholds, per-set statistics (fractions above
    each threshold, Carlini fraction, the full per-image distribution and nearest indices).
    """
    if generated.is_floating_point():
        # Sampler output overshoots [-1, 1]: score the images as they are saved (to_uint8
        # clamps), so these numbers match an evaluation of the PNGs.
        generated = generated.clamp(-1.0, 1.0)
    for images, what in ((generated, "generated"), (train_images, "train_images"),
                         (heldout_images, "heldout_images")):
        if images is not None and images.is_floating_point():
            check_image_range(images, f"memorization_summary({what})")  # [0, 1] or 0..255: refused
    # Before any maths (evaluate.py names the paths first; this catches every other caller).
    check_same_shape(("train_images", train_images), ("generated", generated),
                     ("heldout_images", heldout_images))
    kind = eval_cfg.memorization_features
    path = {"inception": eval_cfg.inception_path, "dinov2": eval_cfg.dinov2_path,
            "sscd": getattr(eval_cfg, "sscd_path", "")}.get(kind, "")
    extractor = build_extractor(kind, path, reference=train_images, device=device)
    opts = dict(batch_size=batch_size, progress=progress)
    if train_features is None:
        train_features = reference_features.get(extractor, train_images, desc="train features", **opts)
    train = normalised(train_features)
    thresholds = [float(t) for t in eval_cfg.thresholds]
    if generated_features is None:
        generated_features = extract(extractor, generated, desc="generated features", **opts)
    gen = normalised(generated_features)
    summary = {
        "feature_space": extractor.name,
        "similarity": "cosine of L2-normalised features",
        "thresholds": thresholds,
        "thresholds_calibrated": kind == CALIBRATED_SPACE,
        "carlini": {"neighbours": min(CARLINI_NEIGHBOURS, len(train)), "ratio": CARLINI_RATIO},
        "num_train": int(len(train)),
        "generated": neighbour_statistics(gen, train, thresholds, device),
        "heldout": None,
    }
    if kind != CALIBRATED_SPACE:
        summary["note"] = (f"thresholds are calibrated for DINOv2; in {extractor.name} space "
                           "compare the generated fractions with the held-out ones")
    if heldout_images is not None and len(heldout_images):
        held = normalised(reference_features.get(extractor, heldout_images,
                                                 desc="held-out features", **opts))
        summary["heldout"] = neighbour_statistics(held, train, thresholds, device)
    return summary


# --------------------------------------------------------------------------------------
# Denoiser attraction (the paper's Figure 3, as a number)
# --------------------------------------------------------------------------------------

# Noise levels (data units, images in [-1, 1]) where a denoiser decides which image it is
# looking at; at much higher sigma every denoiser returns about the data mean.
ATTRACTION_SIGMAS = (0.5, 1.0, 2.0)


@torch.no_grad()
def denoiser_attraction(denoise, heldout: torch.Tensor, train: torch.Tensor,
                        sigmas=ATTRACTION_SIGMAS, seed: int = 0, batch: int = 256,
                        keep_outputs: bool = False) -> dict:
    """How strongly the denoiser pulls a noised held-out image towards a training image.

    For each held-out image y (never trained on) and each sigma: x = y + sigma eps (eps from a
    generator seeded by (seed, image index), the same for every model), out = denoise(x, sigma),
    and in pixel space (L2 in [-1, 1] units)

        ratio = ||out - nearest training image of out|| / ||out - y||

    A denoiser that has memorized its data snaps to a training image at high sigma (ratio near
    0); one that generalizes returns a blurry estimate about as close to y as to any training
    image (ratio near or above 1). No sampling is needed, so this is cheap.

    denoise(x [B, C, H, W] float32, sigma float) -> x0 estimate; heldout, train: float32
    [N, C, H, W] in [-1, 1]. Returns per sigma: mean and median ratio and the fraction with
    ratio < 1 (closer to a training image than to the original); with keep_outputs also the
    outputs (float32, CPU) and their nearest training indices, for figures.
    """
    _check_units(heldout, "held-out images")
    _check_units(train, "training images")
    flat_train = train.flatten(1).double()
    out = {"sigmas": [float(s) for s in sigmas], "count": int(len(heldout)),
           "distance": "L2 in [-1, 1] pixel units", "per_sigma": {}}
    for sigma in sigmas:
        outputs, ratios, nearest = [], [], []
        for start in range(0, len(heldout), batch):
            y = heldout[start:start + batch].float()
            eps = torch.stack([attraction_noise(y.shape[1:], seed, start + j) for j in range(len(y))])
            den = denoise(y + sigma * eps.to(y.device), float(sigma)).float().cpu()
            d_train = torch.cdist(den.flatten(1).double(), flat_train)
            best, idx = d_train.min(dim=1)
            d_orig = (den - y.cpu()).flatten(1).double().norm(dim=1)
            ratios.append(best / d_orig.clamp_min(1e-12))
            nearest.append(idx)
            if keep_outputs:
                outputs.append(den)
        r = torch.cat(ratios)
        entry = {"mean_ratio": float(r.mean()), "median_ratio": float(r.median()),
                 "fraction_closer_to_train": float((r < 1).double().mean())}
        if keep_outputs:
            entry["outputs"] = torch.cat(outputs)
            entry["nearest_index"] = torch.cat(nearest).tolist()
        out["per_sigma"][f"{sigma:g}"] = entry
    return out


@torch.no_grad()
def network_attraction(net, settings, heldout: torch.Tensor, train: torch.Tensor, sigmas,
                       device="cpu", keep_outputs: bool = False) -> dict:
    """denoiser_attraction of a trained network as its method samples with it
    (sampling.method_denoiser: the masking baseline's fixed masks, one per held-out image);
    sigmas below settings.sigma_min (noise-only: sigma_tn, never learned) are left out."""
    from ambient_dist import sampling
    denoiser = sampling.method_denoiser(net, settings, range(len(heldout)), tuple(heldout.shape[1:]),
                                        0, device)

    def denoise(x, sigma):
        return denoiser(x.to(device), torch.full((len(x),), sigma, device=device), None)
    # One batch: the masked denoiser holds one mask per held-out image.
    return denoiser_attraction(denoise, heldout, train, [s for s in sigmas if s >= settings.sigma_min],
                               batch=len(heldout), keep_outputs=keep_outputs)


def attraction_noise(shape, seed: int, index: int) -> torch.Tensor:
    """The noise added to held-out image `index` by denoiser_attraction (the same for every model)."""
    from ambient_dist.noise import key_seed
    g = torch.Generator(device="cpu").manual_seed(key_seed(seed, f"attraction/{index}"))
    return torch.randn(tuple(shape), generator=g)


def _check_units(images: torch.Tensor, what: str) -> None:
    """Float images must be in [-1, 1]; [0, 1] input would pass silently otherwise."""
    check_image_range(images.float(), what)
