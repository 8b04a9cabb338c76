"""One evaluation: samples (+ training shards) -> report.json, report.md, figures.

`evaluate(opts)` is what ambient-evaluate runs:

    1. the generated images: a sample folder / shards, or a run directory (its samples/,
       generated first with `samples.generate` when missing)
    2. the training images (data.load_pixel_images(shards, "train"), the run's data.subset prefix)
       and the held-out images, if the shards have them
    3. metrics.assess (the one path the training run's end and ambient-study also use):
       memorization in the chosen feature space (features split over ranks); with
       quality_reference, KID + FID against the shards' first N held-out images; with
       attraction_sigmas, the run's denoiser attraction of held-out images
    4. FID against the reference set's cached statistics (default: every training-shard
       image, not just the subset -- objective.md section 6 wants the full dataset)
    5. CLIP score when prompts and a CLIP directory are given
    6. figures and the report; with --compare, the FID-vs-memorization plot across runs

Only rank 0 writes files; every rank takes part in the feature extraction.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from ambient_dist.config import ConfigError, EvaluationConfig, ExperimentConfig, load_config
from ambient_dist import data
from ambient_dist import distributed as ranks
from ambient_dist.metrics import fid as fidlib
from ambient_dist.metrics import report as rep
from ambient_dist.metrics import samples as S
from ambient_dist.errors import UserError
from ambient_dist.metrics.assess import QualityReference, assess
from ambient_dist.metrics.features import ImageShapeError, build_extractor, check_same_shape, images_digest
from ambient_dist.progress import progress as progress_bar
from ambient_dist.provenance import provenance


@dataclass
class EvalOptions:
    samples: Optional[str] = None          # sample folder / shards
    run_dir: Optional[str] = None          # a training run (config.yaml, samples/)
    shards: Optional[str] = None           # training shards (default: the run's data.shards)
    out: Optional[str] = None              # report directory
    num: int = 0                           # use (or generate) this many samples; 0 = all / 50000
    resample: bool = False                 # replace a run's samples made from other weights
    ema: Optional[str] = None              # a post-hoc EMA file of the run (instead of ema.safetensors)
    features: Optional[str] = None         # memorization space (default: config's)
    inception_path: str = ""
    dinov2_path: str = ""
    sscd_path: str = ""
    thresholds: Optional[list[float]] = None
    fid: bool = True
    fid_reference: Optional[str] = None    # shard dir (all its images), image folder, or stats .npz
    cache_dir: Optional[str] = None
    prompts: Optional[str] = None          # text file, one prompt per sample index
    clip_path: Optional[str] = None
    baseline: Optional[str] = None         # another evaluation's report dir
    # KID + FID (Inception) against the first N held-out images of the shards (0 = none):
    # what the study reports as quality (evaluation.quality_reference).
    quality_reference: int = 0
    # Denoiser attraction of the first attraction_images held-out images at these sigmas
    # (a run directory only; None = none): the study's evaluation.attraction_sigmas.
    attraction_sigmas: Optional[list[float]] = None
    attraction_images: int = 128
    compare: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # section.key=value over the run's config.yaml
    batch: int = 64
    device: str = "cpu"
    progress: bool = True


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ambient_dist" / "fid"


def _run_config(opts: EvalOptions) -> Optional[ExperimentConfig]:
    """The run's config.yaml with the overrides, or None when no run directory is given."""
    if not opts.run_dir:
        return None
    path = Path(opts.run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"config {path}: not found (give a training run directory, or --samples "
                          "and --shards)")
    return load_config(path, opts.overrides)


def _recorded_count(path: Path) -> int:
    """How many samples samples.json says the set holds (0 without one)."""
    return int((S.recorded_meta(path) or {}).get("num", 0))


def _generated(opts: EvalOptions, cfg: Optional[ExperimentConfig]) -> tuple[Path, torch.Tensor]:
    """Where the samples are, and the images themselves (uint8 [N, C, H, W]).

    Nothing is trusted unchecked: a run's samples are (re)made from the run's current EMA
    weights (missing images are filled in; a set made from other weights is refused unless
    --resample), and a sample folder must hold as many images as its samples.json records."""
    if opts.samples:
        path = Path(opts.samples)
        wanted = opts.num or _recorded_count(path)
    elif opts.run_dir:
        path = Path(opts.run_dir) / _with_ema("samples", opts)
        wanted = opts.num or _recorded_count(path) or 50000
        _generate_for_run(opts, path, wanted)
    else:
        raise S.SampleStoreError("give --samples or a run directory")
    _, images, _ = S.read_samples(path, limit=wanted)
    if wanted and len(images) < wanted:
        raise S.SampleStoreError(
            f"{path}: {len(images)} samples there, but {wanted} were asked for or recorded in "
            f"{S.META_NAME}; re-run ambient-sample with the same options to fill in the "
            "missing ones (it continues where it stopped), or pass --num")
    return path, images


def _with_ema(name: str, opts: EvalOptions) -> str:
    """A run's samples/ or eval/ folder, or samples-<stem>/ ... for a post-hoc EMA (--ema)."""
    return f"{name}-{Path(opts.ema).stem}" if opts.ema else name


def _generate_for_run(opts: EvalOptions, path: Path, num: int) -> None:
    """Sample the run's EMA into <run>/samples (resumable; what sample.py does with defaults)."""
    import shutil

    from ambient_dist import sampling
    rank, world, _ = ranks.env_rank_world()
    net, cfg, weights = S.load_denoiser(opts.run_dir, device=opts.device, overrides=opts.overrides,
                                        ema=opts.ema)
    if opts.resample and rank == 0 and path.exists():
        shutil.rmtree(path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    meta = S.recorded_meta(path)
    if meta is not None:
        made_from, now = meta.get("weights_sha"), S.file_digest(weights)
        if made_from != now:
            raise S.SampleStoreError(
                f"{path} holds samples of other weights (weights_sha {made_from} there; the run's "
                f"{weights.name} is {now} now: it trained on since): pass --resample to replace "
                f"them with samples of the current weights, or evaluate those samples as they are "
                f"with --samples {path}")
    made = S.sample_run(net, weights, path, num, cfg.sampling.seed,
                        sampling.SamplerSettings.for_run(cfg), batch=opts.batch,
                        rank=rank, world=world, device=opts.device, progress=opts.progress)
    if made and rank == 0:
        print(f"made {made} samples in {path} (missing from its {num})", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _reference_images(shards: str, cfg: Optional[ExperimentConfig], heldout_limit: int):
    """(every training image, the run's data.subset prefix of them, the held-out images or
    None), uint8 [N, C, H, W]; the subset is a view of the first, not a copy."""
    train_all = data.load_pixel_images(shards, "train")
    subset = cfg.data.subset if cfg else 0
    heldout = None
    if data.read_manifest(shards).get("heldout"):
        heldout = data.load_pixel_images(shards, "heldout", heldout_limit)
    return train_all, train_all[: subset or len(train_all)], heldout


def _batches(images: torch.Tensor, batch: int, desc: str = "", progress: bool = False):
    """This rank's share of `images`, in batches (for the streamed FID statistics)."""
    rank, world = ranks.rank_and_world()
    lo, hi = ranks.slice_bounds(len(images), rank, world)
    starts = range(lo, hi, batch)
    for start in progress_bar(starts, desc=desc, unit="batch", disable=not progress or rank != 0):
        yield images[start:min(start + batch, hi)]


def _fid(opts: EvalOptions, eval_cfg: EvaluationConfig, generated: torch.Tensor,
         reference, reference_name: str) -> dict:
    """reference: uint8 images, or (mu, sigma, count) statistics already computed."""
    ex = build_extractor("inception", eval_cfg.inception_path, device=opts.device)
    if isinstance(reference, torch.Tensor):
        cache = opts.cache_dir or default_cache_dir()
        reference = fidlib.reference_statistics(
            ex, _batches(reference, opts.batch, "FID reference", opts.progress),
            images_digest(reference), cache, image_shape=list(reference.shape[1:]))
    try:
        value = fidlib.fid_against(ex, _batches(generated, opts.batch, "FID samples", opts.progress), reference)
    except fidlib.StatisticsError as e:  # name the file: the samples' side is ours
        raise fidlib.StatisticsError(f"--fid-reference {reference_name}: {e} (the samples' "
                                     f"features are those of {ex.name}): statistics of another "
                                     "feature extractor are not comparable") from None
    return {"value": value, "extractor": ex.name, "reference": reference_name,
            "reference_count": int(reference[2]), "num_samples": int(len(generated))}


def _fid_reference(opts: EvalOptions, full_train: torch.Tensor, shards: str,
                   generated: torch.Tensor, sample_path: Path):
    """(images or statistics, description) of the FID reference set, checked to have the
    samples' [C, H, W] (statistics files record it when we wrote them; EDM's do not)."""
    ref = opts.fid_reference
    samples = (f"samples {sample_path}", generated)
    if not ref:
        return full_train, f"all training-shard images of {shards}"
    if ref.endswith(".npz"):
        if not Path(ref).is_file():
            raise FileNotFoundError(f"--fid-reference {ref}: no such statistics file")
        stats = fidlib.load_statistics(Path(ref))
        shape = fidlib.recorded_image_shape(Path(ref))
        if shape is not None and shape != list(generated.shape[1:]):
            raise ImageShapeError(f"--fid-reference {ref}: statistics of images [C, H, W] = "
                                  f"{shape}, but samples {sample_path}: {list(generated.shape[1:])}")
        return stats, os.path.abspath(ref)
    if (Path(ref) / "manifest.json").is_file():
        images = data.load_pixel_images(ref, "train")
    else:
        images = S.read_samples(ref, what="--fid-reference")[1]
    check_same_shape(samples, (f"--fid-reference {ref}", images))
    return images, os.path.abspath(ref)  # report.json names it from any directory


def evaluate(opts: EvalOptions) -> dict:
    cfg = _run_config(opts)
    eval_cfg = cfg.evaluation if cfg else EvaluationConfig()
    changes = {k: v for k, v in (("memorization_features", opts.features),
                                 ("inception_path", opts.inception_path),
                                 ("dinov2_path", opts.dinov2_path),
                                 ("sscd_path", opts.sscd_path),
                                 ("thresholds", opts.thresholds)) if v}
    eval_cfg = replace(eval_cfg, **changes)
    shards = opts.shards or (cfg.data.shards if cfg else "")
    if not shards:
        raise S.SampleStoreError("no training shards: pass --shards (or a run directory whose "
                                 "config names data.shards)")
    if opts.run_dir:
        # What the run was trained on, checked as resume checks it: the run's memorization
        # is measured against data.subset of these shards, and must be of its own data.
        S.check_training_data(opts.run_dir, shards, "--shards" if opts.shards else
                              f"data.shards of {Path(opts.run_dir) / 'config.yaml'}")
    shards = os.path.abspath(shards)  # report.json names it from any directory
    sample_path, generated = _generated(opts, cfg)
    full_train, train, heldout = _reference_images(shards, cfg, eval_cfg.heldout_images)
    # Every mismatch of shape between the inputs is refused here, naming both, before any
    # feature is computed (features.check_same_shape says why feature spaces refuse too).
    shard_option = "--shards" if opts.shards else "data.shards"
    check_same_shape((f"training shards {shards} ({shard_option})", full_train),
                     (f"samples {sample_path}", generated),
                     (f"held-out images of {shards}", heldout))
    if opts.fid:
        reference, ref_name = _fid_reference(opts, full_train, shards, generated, sample_path)
    for what, path in ([("--baseline", opts.baseline)] if opts.baseline else []) + \
            [("--compare", c) for c in opts.compare]:
        shape = rep.read_report(path).get("image_shape")
        if shape is not None and list(shape) != list(generated.shape[1:]):
            raise ReportMismatchError(f"{what} {path} was evaluated on images [C, H, W] = {list(shape)}, "
                                      f"samples {sample_path} are {list(generated.shape[1:])}: "
                                      "similarities of different image shapes are not comparable")
    rank, _ = ranks.rank_and_world()

    assessed = assess(generated, train, heldout, eval_cfg, quality=_quality_reference(opts, shards),
                      attraction=_attraction(opts, shards, train), device=opts.device,
                      batch=opts.batch, progress=opts.progress)
    mem = assessed["memorization"][eval_cfg.memorization_features]
    report: dict = {"run": Path(opts.run_dir).name if opts.run_dir else sample_path.name,
                    "samples": os.path.abspath(sample_path), "num_samples": int(len(generated)),
                    "image_shape": list(generated.shape[1:]), "provenance": provenance(),
                    "shards": str(shards), "sigma_tn": cfg.objective.sigma_tn if cfg else None,
                    "memorization": mem, "fid": None, "clip_score": None, "baseline": None,
                    "quality": assessed["quality"], "attraction": assessed["attraction"]}
    if opts.ema:
        report["ema"] = str(opts.ema)
    if opts.fid:
        report["fid"] = _fid(opts, eval_cfg, generated, reference, ref_name)
    if opts.prompts and opts.clip_path:
        from ambient_dist.metrics.clip_score import clip_score
        texts = Path(opts.prompts).read_text().splitlines()[: len(generated)]
        report["clip_score"] = clip_score(generated[: len(texts)], texts, opts.clip_path,
                                          opts.device, opts.batch)
    if opts.baseline:
        base = rep.read_report(opts.baseline)
        same_space(report, base, f"--baseline {opts.baseline}")
        report["baseline"] = {"name": base.get("run", opts.baseline), "report": os.path.abspath(opts.baseline),
                              **base["memorization"]["generated"]}
    if rank == 0:
        write_outputs(opts, report, generated, train)
    return report


def _quality_reference(opts: EvalOptions, shards: str) -> Optional[QualityReference]:
    """--quality-reference N: the shards' first N held-out images (never trained on)."""
    if not opts.quality_reference:
        return None
    held = data.load_pixel_images(shards, "heldout", opts.quality_reference)
    if len(held) < opts.quality_reference:
        raise S.SampleStoreError(f"--quality-reference {opts.quality_reference}: the shards {shards} "
                                 f"hold only {len(held)} held-out images")
    return QualityReference(held, f"{len(held)} held-out real images (never trained on)",
                            opts.cache_dir or default_cache_dir())


def _attraction(opts: EvalOptions, shards: str, train: torch.Tensor):
    """--attraction-sigmas: the run's denoiser attraction of the first --attraction-images
    held-out images (metrics.network_attraction with the run's sampler settings)."""
    if opts.attraction_sigmas is None:
        return None
    if not opts.run_dir:
        raise S.SampleStoreError("--attraction-sigmas needs a run directory (the denoiser)")
    from ambient_dist import sampling
    from ambient_dist.metrics.features import as_model_units
    from ambient_dist.metrics.memorization import network_attraction
    held = data.load_pixel_images(shards, "heldout", opts.attraction_images)
    net, cfg, _ = S.load_denoiser(opts.run_dir, device=opts.device, overrides=opts.overrides)
    return lambda: network_attraction(net, sampling.SamplerSettings.for_run(cfg), as_model_units(held),
                                      as_model_units(train), opts.attraction_sigmas, opts.device)


class ReportMismatchError(UserError):
    """Reports to be overlaid or compared were made in different spaces; names both."""


def same_space(ours: dict, theirs: dict, what: str, this: str = "this run") -> None:
    """Similarities from different feature spaces, or of images of different shapes, are
    not comparable: refuse to overlay or plot them together. ours / theirs: report dicts
    (report.json); reports written before image_shape was recorded are not shape-checked."""
    a, b = ours["memorization"]["feature_space"], theirs["memorization"]["feature_space"]
    if a != b:
        raise ReportMismatchError(f"{what} was evaluated in {b} space, {this} in {a}: "
                                  "re-evaluate it with the same --features")
    sa, sb = ours.get("image_shape"), theirs.get("image_shape")
    if sa is not None and sb is not None and list(sa) != list(sb):
        raise ReportMismatchError(f"{what} was evaluated on images [C, H, W] = {list(sb)}, "
                                  f"{this} on {list(sa)}: similarities of different image "
                                  "shapes are not comparable")


def write_outputs(opts: EvalOptions, report: dict, generated: torch.Tensor, train: torch.Tensor) -> None:
    out = Path(opts.out or (Path(opts.run_dir) / _with_ema("eval", opts) if opts.run_dir else Path(report["samples"]).parent / "eval"))
    figs = out / "figures"
    mem = report["memorization"]
    gen = mem["generated"]
    rep.sample_grid(generated, figs / "samples.png")
    rep.nearest_pairs_figure(generated, train, gen["max_similarity"], gen["nearest_index"],
                             figs / "nearest_pairs.png", feature_space=mem["feature_space"])
    curves = {"generated": gen["max_similarity"]}
    if mem.get("heldout"):
        curves["held-out real (calibration)"] = mem["heldout"]["max_similarity"]
    if report.get("baseline"):
        curves[f"baseline: {report['baseline']['name']}"] = report["baseline"]["max_similarity"]
    rep.similarity_histogram(curves, mem["thresholds"], figs / "similarity_hist.png", mem["feature_space"])
    report["figures"] = {"grid": "figures/samples.png", "pairs": "figures/nearest_pairs.png",
                         "histogram": "figures/similarity_hist.png"}
    if opts.compare:
        others = {c: rep.read_report(c) for c in opts.compare}
        for c, other in others.items():
            same_space(report, other, f"--compare {c}")
        points = [rep.tradeoff_point(report)] + [rep.tradeoff_point(o) for o in others.values()]
        rep.fid_vs_memorization_figure(points, figs / "fid_vs_memorization.png", points[0]["threshold"])
        report["figures"]["tradeoff"] = "figures/fid_vs_memorization.png"
        report["compare"] = points
    rep.write_report(out, report)
    report["out"] = str(out)


def compare_only(reports: list[str], out: str) -> Path:
    """The FID-vs-memorization figure (+ a small report.md) from existing reports alone."""
    loaded = {r: rep.read_report(r) for r in reports}
    first = next(iter(loaded.values()))
    for r, other in loaded.items():
        same_space(first, other, f"--compare {r}", f"--compare {next(iter(loaded))}")
    points = [rep.tradeoff_point(o) for o in loaded.values()]
    path = rep.fid_vs_memorization_figure(points, Path(out) / "figures" / "fid_vs_memorization.png",
                                          points[0]["threshold"])
    rep.write_report(out, {"run": "comparison", "compare": points,
                           "figures": {"tradeoff": "figures/fid_vs_memorization.png"}})
    return path
