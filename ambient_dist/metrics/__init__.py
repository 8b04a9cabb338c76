"""Evaluation metrics: feature extractors, FID, memorization, CLIP score, reports.

    features.py       extractors loaded from local files (Inception, DINOv2, SSCD, pixels),
                      batched and rank-split extraction, the reference-feature cache
    fid.py            feature statistics (streamed, rank-reduced), cached reference statistics,
                      the Frechet distance
    memorization.py   chunked top-k nearest neighbours (rank-split), memorization_summary
    clip_score.py     CLIP score of images against their prompts (local CLIP directory)
    report.py         report.json / report.md and the figures
    samples.py        sampling at scale: model loading, rank split, resumable PNG / shard store
    assess.py         the one evaluation path: memorization per space, KID + FID against
                      held-out images, attraction (the end of a training run, ambient-evaluate
                      and ambient-study all call it)
    evaluation.py     one evaluation, samples -> report (what ambient-evaluate runs)

Rank, slice and gather helpers live in ambient_dist.distributed (shared with the engine).
The end of a training run, ambient-evaluate and the study's evaluate stage go through
`assess.assess`; ambient-evaluate uses everything.
"""
from ambient_dist.metrics.features import FeatureError, build_extractor, extract  # noqa: F401
from ambient_dist.metrics.memorization import (  # noqa: F401
    ATTRACTION_SIGMAS, denoiser_attraction, memorization_summary, nearest_neighbours, network_attraction)
