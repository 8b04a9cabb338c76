"""The study file: its typed sections, validation, and the (run, size, seed) specs it expands to."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from ambient_dist.config import PLAIN_NAME, ConfigError, ExperimentConfig, build_typed, load_config
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
class StudySlurm:
    """`ambient-study --executor slurm`: one SLURM job per run (study/slurm.py); each field
    can also be given on the command line (--partition, --nodes, ...)."""
    # sbatch --partition and --account; empty = the cluster's defaults.
    partition: str = ""
    account: str = ""
    # Nodes per run (more than one: the trainer starts through torchrun on every node of the
    # job's allocation) and GPUs on each of them.
    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    # Memory per node in GB; 0 = the partition's default.
    mem_gb: float = 0.0
    # Wall-clock limit of one job in minutes. A job that reaches it (or is preempted)
    # checkpoints, is requeued and continues; at most max_requeues times.
    time_min: int = 240
    max_requeues: int = 20
    # Extra sbatch options, e.g. ["--qos=high", "--constraint=a100", "--exclusive"].
    sbatch: list[str] = field(default_factory=list)
    # Shell lines the job runs first (module load ..., source .venv/bin/activate).
    setup: list[str] = field(default_factory=list)


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
    slurm: StudySlurm = field(default_factory=StudySlurm)
    # Output directory; default studies/<name>.
    out: str = ""


@dataclass
class RunSpec:
    """One (run, size, seed): what the study trains and where.

    data_plan is everything that decides the content of the run's shard directory (the
    source and every make_shards option, `shard_options`); data_digest its digest, which is
    also the last part of the shard directory's name, so runs share a directory exactly when
    they need the same data. retrain: train from scratch even over existing checkpoints
    (ambient-study --retrain)."""
    run: StudyRun
    size: int
    seed: int
    name: str
    run_dir: Path
    shards: Path
    config: ExperimentConfig
    data_plan: dict = field(default_factory=dict)
    data_digest: str = ""
    retrain: bool = False

    @property
    def group(self) -> str:
        return f"{self.run.name} (n={self.size})"


class StudyError(UserError):
    """A bad study file or an unusable study directory; the message names the key or path."""


class StudyFailed(StudyError):
    """The study ran, but some runs failed (raised by run_study after the report is written).

    failures: {run name: "stage: error"}; report: the report.md written without them;
    outcome: everything run_study did (runner.StudyOutcome)."""

    def __init__(self, failures: dict[str, str], report: Optional[Path] = None, outcome=None):
        # outcome: runner.StudyOutcome (also the runs still queued on SLURM or stopped).
        self.failures, self.report, self.outcome = dict(failures), report, outcome
        names = "; ".join(f"{k} ({v.splitlines()[0]})" for k, v in failures.items())
        where = f"; the report has the others: {report}" if report else ""
        super().__init__(f"{len(failures)} run{'s' if len(failures) != 1 else ''} failed: {names}"
                         f"{where}. Each failed run's study-failed.json has the whole error; run "
                         "the study again to continue (what is done is kept)")


def inputs_digest(inputs) -> str:
    """Short stable digest (16 hex digits) of a JSON-able description of a stage's inputs."""
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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
    if not PLAIN_NAME.fullmatch(study.name):
        bad("name", f"{study.name!r} is not a plain name (it names the study directory): "
            "letters, digits, '.', '_', '+', '-', starting with a letter or digit")
    names = [r.name for r in study.runs]
    for i, r in enumerate(study.runs):
        if not r.name:
            bad(f"runs[{i}].name", "every run needs a name")
        if not PLAIN_NAME.fullmatch(r.name):
            bad(f"runs[{i}].name", f"{r.name!r} is not a plain name (it names the run's "
                "directory): letters, digits, '.', '_', '+', '-', starting with a letter or "
                "digit, at most 100 characters")
        if len(set(r.seeds)) != len(r.seeds):
            bad(f"runs[{i}].seeds", f"must be distinct seeds, got {r.seeds}")
    if len(set(names)) != len(names):
        bad("runs", f"run names must be unique, got {names}")
    # Two names that differ only in case are one directory on macOS and Windows file systems.
    folded = [n.lower() for n in names]
    if len(set(folded)) != len(folded):
        bad("runs", f"run names must differ in more than letter case (one directory on "
            f"case-insensitive file systems), got {names}")
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
    if study.data.heldout < 0:
        bad("data.heldout", f"must be >= 0, got {study.data.heldout}")
    if check_source:
        _check_source(study, bad)

    out_dir = Path(out or study.out or Path("studies") / study.name)
    specs = []
    for r in study.runs:
        for size in study.subset_sizes:
            for seed in r.seeds or study.seeds:
                specs.append(_run_spec(study, base, out_dir, r, size, seed))
    dirs = [s.name.lower() for s in specs]
    if len(set(dirs)) != len(dirs):
        dup = next(s.name for s in specs if dirs.count(s.name.lower()) > 1)
        bad("runs", f"two runs would share the run directory {dup} (rename one)")
    return study, specs


def _check_source(study: StudyConfig, bad) -> None:
    """Open the source and check that every training-set size fits beside the held-out images."""
    from ambient_dist.data.sources import SourceError
    data = study.data
    try:
        n = len(_open_source(data))
    except (SourceError, FileNotFoundError, ValueError) as e:
        bad("data.source", f"{data.source!r}: {e}")
    too_big = [size for size in study.subset_sizes if size + data.heldout > n]
    if too_big:
        bad("subset_sizes", f"{too_big[0]} training images + data.heldout {data.heldout} held-out "
            f"images exceed the {n} images of data.source {data.source!r} (the largest size "
            f"that fits is {n - data.heldout})")


def _open_source(data: StudyData):
    from ambient_dist.data.sources import open_named_source
    return open_named_source(data.source, os.path.expanduser(data.path) if data.path else None)


def shard_options(study: StudyConfig, size: int, seed: int, cfg: ExperimentConfig):
    """The make_shards options of one run's data: its resolved config's geometry and objective,
    the study's held-out count and subset seed, the run's seed as the noise seed."""
    from ambient_dist.data.shards import ShardOptions
    o, d = cfg.objective, cfg.data
    return ShardOptions(resolution=d.resolution, channels=d.channels, sigma_tn=o.sigma_tn,
                        form=o.form, noise_seed=seed, count=size,
                        subset_seed=study.data.subset_seed, heldout=study.data.heldout,
                        mask_corruption=o.mask_corruption if o.method == "masking" else 0.0)


def data_plan(study: StudyConfig, size: int, seed: int, cfg: ExperimentConfig) -> dict:
    """Everything that decides a shard directory's content: the source (as named, and its path
    made absolute) and every make_shards option (ShardOptions.content)."""
    path = os.path.abspath(os.path.expanduser(study.data.path)) if study.data.path else ""
    return {"source": study.data.source, "path": path,
            **shard_options(study, size, seed, cfg).content()}


def shard_tag(run: StudyRun, size: int, seed: int, cfg: ExperimentConfig,
              digest: str = "") -> str:
    """The shard directory's name: readable settings, then the digest of the whole data plan
    (so runs that differ in any data setting, e.g. data.resolution, never share one)."""
    mask = f"-mask{cfg.objective.mask_corruption:g}" if run.method == "masking" else ""
    return f"n{size}-tn{cfg.objective.sigma_tn:g}{mask}-seed{seed}" + (f"-{digest[:8]}" if digest else "")


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
    plan = data_plan(study, size, seed, cfg)
    digest = inputs_digest(plan)
    shards = out_dir / "shards" / shard_tag(r, size, seed, cfg, digest)
    cfg = dataclasses.replace(cfg, name=name, data=dataclasses.replace(cfg.data, shards=str(shards)))
    return RunSpec(r, size, seed, name, run_dir, shards, cfg, plan, digest)
