"""The study file: its typed sections, validation, and the (run, size, seed) specs it expands to."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from ambient_dist.config import ConfigError, ExperimentConfig, build_typed, load_config
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
