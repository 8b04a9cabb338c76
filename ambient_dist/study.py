"""A memorization study: the paper's Tables 1-2 and Figures 1 and 3 from one study file.

    ambient-study configs/studies/fashion-mnist-cpu.yaml

A study file names a base experiment config, the training-set sizes, the runs (plain DDPM is
`method: ambient, sigma_tn: 0`; Algorithm 1 at several sigma_tn; the noise-only and masking
baselines) and the seeds. For every (run, size, seed) the study

    1. shards    makes the shards the run needs (its sigma_tn's noisy copies, or the fixed
                 masks), with held-out images; the training subset is the same for every run
                 and seed (subset seed fixed), the noise seed is the run's seed
    2. train     ambient-train (python -m ambient_dist.cli.train) as a subprocess (--resume auto: an interrupted run continues)
    3. sample    evaluation.num_samples images from the EMA (resumable sample store)
    4. evaluate  quality (KID with its standard error, and FID, Inception pool3, against a
                 fixed set of held-out real images), memorization in pixel space and each
                 configured feature space (calibrated by held-out images never trained on),
                 and the denoiser attraction of held-out images at high sigma (Figure 3)

and then writes report.md + report.json with the Table 1/2-style table (mean and spread over
seeds), the Figure 1 trade-off plot, the Figure 3 panel and copy galleries. A stage that is
done is skipped on a re-run (each leaves a record naming what it was made from); a run that
fails is reported and the others go on. Every run's config is built and validated before
anything starts, so a bad key or an impossible option is refused up front, naming the key.

Layout of the study directory (`out`, default studies/<name>):
    study.yaml                 the resolved study file
    shards/<tag>/              shard directories, shared by the runs that need the same data
    runs/<run>-n<size>-s<seed>/  training runs (config.yaml, checkpoints, ema.safetensors,
                               samples/, study-train.json, study-eval.json)
    cache/                     reference features (Inception) of the held-out images
    report.md, report.json, figures/
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import yaml

from ambient_dist.config import ConfigError, ExperimentConfig, build_typed, load_config, to_dict
from ambient_dist.errors import UserError
from ambient_dist.metrics.memorization import ATTRACTION_SIGMAS

STAGES = ("shards", "train", "sample", "evaluate")


# --------------------------------------------------------------------------------------
# The study file
# --------------------------------------------------------------------------------------

@dataclass
class StudyRun:
    # Label in the table and the run directory names.
    name: str = ""
    method: Literal["ambient", "noise_only", "masking"] = "ambient"
    # Noise level of the fixed copies (0 with method ambient = plain DDPM / EDM).
    sigma_tn: float = 0.0
    # Extra section.key=value overrides for this run only.
    overrides: list[str] = field(default_factory=list)
    # Seeds of this run; empty = the study's seeds (e.g. fewer seeds for costly baselines).
    seeds: list[int] = field(default_factory=list)


@dataclass
class StudyData:
    # make_shards source: a path, 'fashion-mnist', or a format name with `path`.
    source: str = "fashion-mnist"
    path: str = ""
    # Held-out images set aside (never trained on): memorization calibration and the quality
    # reference set come from them.
    heldout: int = 1000
    subset_seed: int = 0


@dataclass
class StudyEvaluation:
    # Samples per run (the paper: 50,000; a CPU study: a few hundred).
    num_samples: int = 256
    # Memorization feature spaces besides pixels, which are always reported.
    features: list[str] = field(default_factory=lambda: ["inception"])
    # Held-out images compared with the training set beside the samples (calibration).
    calibration_images: int = 256
    # Held-out images that are the reference set of KID and FID.
    quality_reference: int = 1000
    # Denoiser attraction (Figure 3): noise levels and how many held-out images.
    attraction_sigmas: list[float] = field(default_factory=lambda: list(ATTRACTION_SIGMAS))
    attraction_images: int = 128
    # The Figure 3 panel: its noise level (one of attraction_sigmas) and how many rows.
    figure_sigma: float = 1.0
    figure_rows: int = 6
    batch: int = 64


@dataclass
class StudyConfig:
    name: str = "study"
    description: str = ""
    # The experiment config every run starts from (path relative to the study file).
    base: str = ""
    subset_sizes: list[int] = field(default_factory=lambda: [300])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    # section.key=value overrides for every run (applied before each run's own).
    overrides: list[str] = field(default_factory=list)
    data: StudyData = field(default_factory=StudyData)
    runs: list[StudyRun] = field(default_factory=list)
    evaluation: StudyEvaluation = field(default_factory=StudyEvaluation)
    # Output directory; default studies/<name>.
    out: str = ""


@dataclass
class RunSpec:
    """One (run, size, seed): what the study trains and where."""
    run: StudyRun
    size: int
    seed: int
    name: str
    run_dir: Path
    shards: Path
    config: ExperimentConfig

    @property
    def group(self) -> str:
        return f"{self.run.name} (n={self.size})"


class StudyError(UserError):
    """A bad study file or an unusable study directory; the message names the key or path."""


def load_study(path: str | os.PathLike, out: Optional[str] = None,
               check_source: bool = True) -> tuple[StudyConfig, list[RunSpec]]:
    """Read, type-check and validate a study file, and build and validate every run's
    experiment config (ConfigError / StudyError name the key). check_source=False skips
    opening the dataset (to check a study file on a machine without the data)."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {path}: not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        study = build_typed(StudyConfig, raw)
    except yaml.YAMLError as e:
        raise StudyError(f"study file {path}: not valid YAML: {e}") from None
    except ConfigError as e:
        raise StudyError(f"{e} [{path}]") from None

    def bad(key: str, msg: str):
        raise StudyError(f"{key}: {msg} [{path}]")

    if not study.base:
        bad("base", "name the experiment config every run starts from")
    base = Path(study.base) if os.path.isabs(study.base) else path.parent / study.base
    if not base.is_file():
        bad("base", f"config file {base} not found")
    if not study.runs:
        bad("runs", "list at least one run")
    names = [r.name for r in study.runs]
    for i, r in enumerate(study.runs):
        if not r.name:
            bad(f"runs[{i}].name", "every run needs a name")
        if len(set(r.seeds)) != len(r.seeds):
            bad(f"runs[{i}].seeds", f"must be distinct seeds, got {r.seeds}")
    if len(set(names)) != len(names):
        bad("runs", f"run names must be unique, got {names}")
    if not study.subset_sizes or any(n < 2 for n in study.subset_sizes):
        bad("subset_sizes", f"must be a non-empty list of sizes >= 2, got {study.subset_sizes}")
    if not study.seeds or len(set(study.seeds)) != len(study.seeds):
        bad("seeds", f"must be a non-empty list of distinct seeds, got {study.seeds}")
    ev = study.evaluation
    if ev.num_samples < 2:
        bad("evaluation.num_samples", f"must be >= 2, got {ev.num_samples}")
    for k in ("calibration_images", "quality_reference", "attraction_images"):
        if not 2 <= getattr(ev, k) <= study.data.heldout:
            bad(f"evaluation.{k}", f"must be between 2 and data.heldout ({study.data.heldout}), "
                f"got {getattr(ev, k)}")
    if ev.figure_sigma not in ev.attraction_sigmas:
        bad("evaluation.figure_sigma", f"must be one of evaluation.attraction_sigmas {ev.attraction_sigmas}")
    for f in ev.features:
        if f not in ("inception", "dinov2", "sscd"):
            bad("evaluation.features", f"unknown feature space {f!r} (inception, dinov2, sscd; "
                "pixels are always reported)")
    noise_only_tn = [r.sigma_tn for r in study.runs if r.method == "noise_only"]
    if noise_only_tn and min(ev.attraction_sigmas) < max(noise_only_tn):
        bad("evaluation.attraction_sigmas", f"must be >= the noise-only runs' sigma_tn "
            f"({max(noise_only_tn)}): those models never learned lower noise")
    if check_source:
        _check_source(study.data, bad)

    out_dir = Path(out or study.out or Path("studies") / study.name)
    specs = []
    for r in study.runs:
        for size in study.subset_sizes:
            for seed in r.seeds or study.seeds:
                specs.append(_run_spec(study, base, out_dir, r, size, seed))
    return study, specs


def _check_source(data: StudyData, bad) -> None:
    from ambient_dist.data.sources import SourceError
    try:
        _open_source(data)
    except (SourceError, FileNotFoundError, ValueError) as e:
        bad("data.source", f"{data.source!r}: {e}")


def _open_source(data: StudyData):
    from ambient_dist.data.sources import open_named_source
    return open_named_source(data.source, os.path.expanduser(data.path) if data.path else None)


def shard_tag(run: StudyRun, size: int, seed: int, cfg: ExperimentConfig) -> str:
    """Runs that need the same data share a shard directory."""
    mask = f"-mask{cfg.objective.mask_corruption:g}" if run.method == "masking" else ""
    return f"n{size}-tn{run.sigma_tn:g}{mask}-seed{seed}"


def _run_spec(study: StudyConfig, base: Path, out_dir: Path, r: StudyRun, size: int,
              seed: int) -> RunSpec:
    name = f"{r.name}-n{size}-s{seed}"
    run_dir = out_dir / "runs" / name
    overrides = list(study.overrides) + [
        f"objective.method={r.method}", f"objective.sigma_tn={r.sigma_tn}",
        f"data.subset={size}", f"train.seed={seed}", f"data.seed={seed}",
        f"evaluation.heldout_images={study.evaluation.calibration_images}",
        f"sampling.num_images={min(64, study.evaluation.num_samples)}",
        # The end-of-run summary of train.py stays cheap; the study evaluates every space.
        "evaluation.memorization_features=pixels",
    ] + list(r.overrides)
    try:
        cfg = load_config(base, overrides + ["data.shards="], check_paths=False)
    except ConfigError as e:
        raise StudyError(f"runs[{r.name}] of the study file (overrides on {base.name}): {e}") from None
    shards = out_dir / "shards" / shard_tag(r, size, seed, cfg)
    cfg = dataclasses.replace(cfg, name=name, data=dataclasses.replace(cfg.data, shards=str(shards)))
    return RunSpec(r, size, seed, name, run_dir, shards, cfg)


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------

def _write_json(path: Path, obj) -> None:
    from ambient_dist.fileio import atomic_write_json
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


def make_run_shards(study: StudyConfig, spec: RunSpec, progress: bool) -> None:
    from ambient_dist.data.shards import ShardOptions, make_shards, read_manifest
    if (spec.shards / "manifest.json").is_file():
        try:
            if read_manifest(spec.shards).get("complete"):
                return
        except ValueError:
            pass
    o, d = spec.config.objective, spec.config.data
    opts = ShardOptions(resolution=d.resolution, channels=d.channels, sigma_tn=o.sigma_tn,
                        form=o.form, noise_seed=spec.seed, count=spec.size,
                        subset_seed=study.data.subset_seed, heldout=study.data.heldout,
                        mask_corruption=o.mask_corruption if o.method == "masking" else 0.0)
    make_shards(_open_source(study.data), spec.shards, opts, progress=progress)


def train_run(spec: RunSpec, env: dict, log: Path) -> None:
    """ambient-train in a subprocess, continuing an interrupted run (--resume auto)."""
    from ambient_dist.config import save_config
    done = spec.run_dir / "study-train.json"
    if done.is_file() and json.loads(done.read_text()).get("fingerprint") == spec.config.fingerprint():
        return
    cfg_dir = spec.run_dir.parent.parent / "configs"
    cfg_path = save_config(spec.config, cfg_dir / spec.name)
    cmd = [sys.executable, "-m", "ambient_dist.cli.train", "--config", str(cfg_path),
           "--run-dir", str(spec.run_dir), "--resume", "auto"]
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "ab") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"train.py exited with {rc} (log {log}):\n    " + "\n    ".join(tail))
    # train.py also exits 0 when preempted (SIGTERM: checkpoint, then exit): only a run that
    # reached its length is done.
    total = int(round(spec.config.train.total_kimg * 1000))
    from ambient_dist.engine.checkpoint import CheckpointManager
    latest = CheckpointManager(spec.run_dir, spec.config.train.keep_checkpoints).latest()
    seen = json.loads((latest / "meta.json").read_text())["images_seen"] if latest else 0
    if seen < total:
        raise RuntimeError(f"training stopped at {seen} of {total} images (preempted?); run the "
                           "study again to continue it")
    _write_json(done, {"fingerprint": spec.config.fingerprint(), "seconds": time.time() - start,
                       "images": total})


def sample_run(study: StudyConfig, spec: RunSpec, device: str, progress: bool) -> None:
    import shutil

    from ambient_dist import sampling
    from ambient_dist.metrics import samples as S
    net, cfg, weights = S.load_denoiser(spec.run_dir, device=device)
    meta = S.recorded_meta(spec.run_dir / "samples")
    if meta is not None and meta.get("weights_sha") != S.file_digest(weights):
        shutil.rmtree(spec.run_dir / "samples")  # made before the run trained on: the study owns it
    S.sample_run(net, weights, spec.run_dir / "samples", study.evaluation.num_samples,
                 cfg.sampling.seed, sampling.SamplerSettings.for_run(cfg),
                 batch=study.evaluation.batch, device=device, progress=progress)


class _References:
    """Images and Inception features shared by every run of one (size, subset seed)."""

    def __init__(self, study: StudyConfig, out_dir: Path, device: str):
        self.study, self.cache, self.device = study, out_dir / "cache", device
        self._images: dict = {}
        self._inception = None
        self._quality: dict = {}

    def images(self, spec: RunSpec):
        """(train [n], calibration held-out, attraction held-out, quality held-out) float32 [-1, 1]."""
        from ambient_dist.data import load_model_images
        key = str(spec.shards)
        if key not in self._images:  # one shard set's images at a time: runs come in order
            train = load_model_images(spec.shards, "train", spec.size)
            held = load_model_images(spec.shards, "heldout")
            ev = self.study.evaluation
            self._images = {key: (train, held[: ev.calibration_images], held[: ev.attraction_images],
                                  held[: ev.quality_reference])}
        return self._images[key]

    def inception(self):
        if self._inception is None:
            from ambient_dist.metrics.features import build_extractor
            self._inception = build_extractor("inception", "", device=self.device)
        return self._inception

    def quality_features(self, spec: RunSpec) -> torch.Tensor:
        from ambient_dist.metrics.features import extract, images_digest
        quality = self.images(spec)[3]
        digest = images_digest(quality)
        if digest not in self._quality:
            path = self.cache / f"quality-inception-{digest[:16]}.pt"
            if path.is_file():
                self._quality[digest] = torch.load(path)
            else:
                feats = extract(self.inception(), quality, self.study.evaluation.batch,
                                desc="reference features")
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(feats, path)
                self._quality[digest] = feats
        return self._quality[digest]


def evaluate_run(study: StudyConfig, spec: RunSpec, refs: _References, device: str) -> dict:
    """Quality, memorization and attraction of one run -> <run>/study-eval.json (+ .pt)."""
    from ambient_dist import sampling
    from ambient_dist.metrics import fid as fidlib
    from ambient_dist.metrics import samples as S
    from ambient_dist.metrics.features import as_model_units, extract
    from ambient_dist.metrics.kid import kernel_inception_distance
    from ambient_dist.metrics.memorization import memorization_summary, network_attraction

    out_path = spec.run_dir / "study-eval.json"
    weights_sha = S.file_digest(S.resolve_weights(spec.run_dir, None))
    if out_path.is_file():
        old = json.loads(out_path.read_text())
        if old.get("weights_sha") == weights_sha and old.get("num_samples") == study.evaluation.num_samples:
            return old
    net, cfg, _ = S.load_denoiser(spec.run_dir, device=device)
    ev = study.evaluation
    _, generated, _ = S.read_samples(spec.run_dir / "samples")
    if len(generated) != ev.num_samples:
        raise StudyError(f"{spec.run_dir / 'samples'}: {len(generated)} samples, expected {ev.num_samples}")
    generated = as_model_units(generated)
    train, calibration, attraction_held, _ = refs.images(spec)

    gen_feats = extract(refs.inception(), generated, ev.batch, desc="sample features")
    memorization = {}
    for space in ["pixels"] + list(ev.features):
        ecfg = dataclasses.replace(cfg.evaluation, memorization_features=space)
        memorization[space] = memorization_summary(
            generated, train, calibration, ecfg, device, batch_size=ev.batch,
            generated_features=gen_feats if space == "inception" else None)
    ref_feats = refs.quality_features(spec)
    mu_g, s_g = fidlib.feature_statistics(gen_feats)
    mu_r, s_r = fidlib.feature_statistics(ref_feats)
    quality = {"kid": kernel_inception_distance(gen_feats, ref_feats),
               "fid": fidlib.frechet_distance(mu_g, s_g, mu_r, s_r),
               "reference": f"{len(ref_feats)} held-out real images (never trained on)",
               "extractor": refs.inception().name}

    attraction = network_attraction(net, sampling.SamplerSettings.for_run(cfg), attraction_held,
                                    train, ev.attraction_sigmas, device, keep_outputs=True)
    figure = attraction["per_sigma"][f"{ev.figure_sigma:g}"]
    torch.save({"outputs": figure.pop("outputs")[: ev.figure_rows],
                "nearest": figure["nearest_index"][: ev.figure_rows]},
               spec.run_dir / "study-attraction.pt")
    for entry in attraction["per_sigma"].values():
        entry.pop("outputs", None)
        entry.pop("nearest_index", None)
    for space in memorization.values():  # keep the table numbers; per-image lists stay short
        for part in ("generated", "heldout"):
            if space.get(part):
                for k in ("carlini_ratio",):
                    space[part].pop(k, None)
    result = {"run": spec.name, "weights_sha": weights_sha, "num_samples": len(generated),
              "method": spec.run.method, "sigma_tn": spec.run.sigma_tn, "size": spec.size,
              "seed": spec.seed, "quality": quality, "memorization": memorization,
              "attraction": attraction}
    _write_json(out_path, result)
    return result


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------

def _env(threads: Optional[int], device_index: Optional[str]) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if device_index is not None:
        env["CUDA_VISIBLE_DEVICES"] = device_index
    return env


def run_study(path: str | os.PathLike, out: Optional[str] = None, jobs: int = 1,
              device: str = "cpu", only_report: bool = False, progress: bool = True) -> Path:
    """Run every stage that is not done yet, then write the report; returns report.md's path."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from ambient_dist.study_report import write_study_report
    study, specs = load_study(path, out)
    out_dir = specs[0].run_dir.parent.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "study.yaml").write_text(yaml.safe_dump(to_dict(study), sort_keys=False))
    failures: dict[str, str] = {}
    say = (lambda msg: print(f"[study] {msg}", flush=True)) if progress else (lambda msg: None)

    def guarded(spec: RunSpec, stage: str, fn) -> bool:
        if spec.name in failures:
            return False
        try:
            fn()
            return True
        except Exception as e:  # one failed run must not stop the others: record and go on
            failures[spec.name] = f"{stage}: {type(e).__name__}: {e}"
            _write_json(spec.run_dir / "study-failed.json",
                        {"stage": stage, "error": str(e), "traceback": traceback.format_exc()})
            say(f"{spec.name}: {stage} FAILED ({type(e).__name__}: {e}); continuing with the others")
            return False

    if not only_report:
        for spec in specs:
            (spec.run_dir / "study-failed.json").unlink(missing_ok=True)
        say(f"{len(specs)} runs in {out_dir}: " + ", ".join(s.name for s in specs))
        for spec in specs:
            guarded(spec, "shards", lambda s=spec: make_run_shards(study, s, False))
        gpus = [str(i) for i in range(torch.cuda.device_count())] if device != "cpu" else []
        threads = None if gpus or jobs <= 1 else max(1, (os.cpu_count() or 1) // jobs)

        def train_one(i: int, spec: RunSpec) -> None:
            gpu = gpus[i % len(gpus)] if gpus else None
            say(f"[{i + 1}/{len(specs)}] {spec.name}: training "
                f"({spec.config.train.total_kimg:g}k images{', GPU ' + gpu if gpu else ''})")
            if guarded(spec, "train", lambda: train_run(spec, _env(threads, gpu),
                                                        spec.run_dir / "train.log")):
                say(f"[{i + 1}/{len(specs)}] {spec.name}: trained")

        # Each run is sampled and evaluated as soon as its training ends (here, while the
        # other trainings go on in their subprocesses), so an interrupted study keeps results.
        refs = _References(study, out_dir, device)
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            futures = {pool.submit(train_one, i, spec): (i, spec) for i, spec in enumerate(specs)}
            for future in as_completed(futures):
                i, spec = futures[future]
                future.result()
                if spec.name in failures:
                    continue
                say(f"[{i + 1}/{len(specs)}] {spec.name}: sampling and evaluating")
                if guarded(spec, "sample", lambda s=spec: sample_run(study, s, device, progress)):
                    if guarded(spec, "evaluate", lambda s=spec: evaluate_run(study, s, refs, device)):
                        write_study_report(study, specs, out_dir, failures)  # results so far
    report = write_study_report(study, specs, out_dir, failures)
    say(f"report: {report}")
    return report
