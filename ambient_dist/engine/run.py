"""One training job from start to end: what `ambient-train` (launchers/train.py) calls.

    run_training(cfg, run_dir, resume)
        join the process group (if launched with several ranks)
        -> lock the run directory (one launch owns it; a second is refused, naming the owner)
        -> find the checkpoint to continue from
        -> build_trainer: the Task that cfg.task names (ImageTask | text TextTask) and the
           Backend that distributed.engine names (PlainBackend | DeepSpeedBackend), given to
           the one Trainer (engine/trainer.py)
        -> check the output directory, write config.yaml and run.json
        -> trainer.train()
        -> finish(trainer): gather the EMA once, export ema.safetensors (and the task's own
           exports), sample, write samples.png and memorization.json, print the summary

`describe(cfg)` is `ambient-train --describe`.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ambient_dist.config import (PLAIN_NAME, ConfigError, ExperimentConfig, resolved_fields,
                                 save_config, to_dict, training_notes, typed_paths, validate_world,
                                 with_absolute_paths)
from ambient_dist.distributed import DistInfo, any_rank_true, init_distributed, shutdown
from ambient_dist.errors import original_message
from ambient_dist.engine.backend import Backend, PlainBackend
from ambient_dist.engine.checkpoint import CheckpointManager
from ambient_dist.engine.task import Task
from ambient_dist.engine.trainer import Trainer
from ambient_dist.fileio import atomic_write_json
from ambient_dist.images import save_image_grid
from ambient_dist.locking import DirectoryLock, lock_for_launch
from ambient_dist.metrics.assess import assess
from ambient_dist.progress import say_once
from ambient_dist.provenance import provenance
from ambient_dist.sampling import SamplerSettings


def resolve_run_dir(cfg: ExperimentConfig, run_dir: Optional[str | os.PathLike] = None) -> Path:
    """--run-dir, else train.run_root/name. ConfigError when that name is not a plain name
    (config.PLAIN_NAME): an empty `name=` would put the run's files straight into the root,
    'a/b' or '../x' elsewhere than under it."""
    if run_dir:
        return Path(run_dir)
    if not PLAIN_NAME.fullmatch(cfg.name):
        raise ConfigError(f"name: {cfg.name!r} is not a plain name (letters, digits, '.', '_', "
                          "'+', '-', starting with a letter or digit): it names the run's "
                          f"directory under train.run_root {cfg.train.run_root}; or pass --run-dir")
    return Path(cfg.train.run_root) / cfg.name


def own_run_dir(run_dir: Path, info: DistInfo) -> DirectoryLock:
    """Lock the run directory for this launch (locking.lock_for_launch: rank 0 takes the lock
    for all ranks, every rank stops when it is refused). Raises DirectoryInUse (naming the
    owner's pid and host) on every rank; a collective."""
    return lock_for_launch(run_dir, "run directory", info.is_main,
                           lambda refused: any_rank_true(refused, info))


def find_resume_point(run_dir: Path, resume: Optional[str], keep: int = 1) -> Optional[Path]:
    """The checkpoint to continue from, or None for a fresh start.

    resume=None refuses to overwrite a run directory that already holds checkpoints;
    "auto" continues from its latest checkpoint if there is one; any other value is a run
    directory (or a checkpoint directory inside one) to continue from.
    """
    if resume is None:
        existing = CheckpointManager(run_dir, keep).latest()
        if existing is not None:
            raise ConfigError(f"run directory {run_dir} already holds checkpoint {existing.name}: "
                              "pass --resume auto to continue it, or --run-dir for a new run")
        return None
    if resume == "auto":
        return CheckpointManager(run_dir, keep).latest()
    path = Path(resume)
    if (path / "meta.json").is_file():
        return path
    latest = CheckpointManager(path, keep).latest()
    if latest is None:
        raise ConfigError(f"--resume {resume}: no checkpoint found there")
    return latest


def check_output_dir(run_dir: Path, needed_bytes: int) -> None:
    """Fail before training, not at the first checkpoint, if the output cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # A uniquely named probe: every rank checks the same shared directory at once.
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-") as probe:
            probe.write(b"ok")
    except OSError as e:
        raise ConfigError(f"run directory {run_dir}: not writable ({e.strerror})") from None
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise ConfigError(f"run directory {run_dir}: {free / 2**30:.2f} GiB free, but keeping the "
                          f"checkpoints needs about {needed_bytes / 2**30:.2f} GiB")


# What `task:` names -> (module, class). A new task is one file with a Task class, and a line here.
TASKS = {"image": ("ambient_dist.engine.task", "ImageTask"),
         "text": ("ambient_dist.text.task", "TextTask")}   # imports diffusers: only when asked for


def task_class(cfg: ExperimentConfig) -> type:
    """The Task class that cfg.task names (engine/task.py has the protocol)."""
    module, name = TASKS[cfg.task]
    return getattr(importlib.import_module(module), name)


def describe(cfg: ExperimentConfig) -> str:
    """What `ambient-train --describe` prints: the resolved config and the model's size."""
    return task_class(cfg).describe(cfg)


def build_task(cfg: ExperimentConfig, device: torch.device) -> Task:
    return task_class(cfg)(cfg, device)


def build_backend(cfg: ExperimentConfig, dist_info: DistInfo) -> Backend:
    """The Backend that distributed.engine names (engine/backend.py)."""
    if cfg.distributed.engine == "deepspeed":
        from ambient_dist.engine.deepspeed_backend import DeepSpeedBackend
        return DeepSpeedBackend(cfg, dist_info)
    return PlainBackend(cfg, dist_info.device, cfg.accumulation_steps(dist_info.world_size))


def build_trainer(cfg: ExperimentConfig, run_dir: str | os.PathLike,
                  dist_info: Optional[DistInfo] = None, resume_from: Optional[Path] = None) -> Trainer:
    """The Trainer with the task and backend the config asks for (a single CPU/GPU process
    when dist_info is None)."""
    dist_info = dist_info or DistInfo(
        device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return Trainer(cfg, run_dir, build_task(cfg, dist_info.device), build_backend(cfg, dist_info),
                   dist_info, resume_from=resume_from)


def finish(trainer: Trainer) -> Optional[dict]:
    """End of run: ema.safetensors, the task's own exports, samples.png and memorization.json;
    returns the memorization summary on rank 0 (None on the others, which take part in the
    collectives). The EMA is gathered once (at the last checkpoint) for every consumer."""
    cfg, task, rank0 = trainer.cfg, trainer.task, trainer.rank == 0
    # The last checkpoint of train() exported ema.safetensors and kept the gathered weights;
    # a run that had nothing left to train (resumed at its end) exports them here.
    weights, trainer.final_weights = trainer.final_weights, None
    if weights is None:
        weights = trainer.export_ema()  # a collective under ZeRO
    task.finish(weights, trainer.run_dir, rank0)
    # The memorization summary splits its feature extraction over the ranks, so every rank
    # needs the samples; they are identical everywhere (per-image seeds).
    net = task.sampling_network(weights)
    images = task.generate(net, cfg.sampling.num_images)
    train_images, heldout_images = task.reference_images()
    ev = cfg.evaluation
    # Always also in pixel space (cheap, and free of a feature extractor's blind spots),
    # and the denoiser attraction of held-out images (no sampling needed).
    spaces = [ev.memorization_features] + (["pixels"] if ev.memorization_features != "pixels" else [])
    result = assess(images, train_images, heldout_images, ev, spaces=spaces, device=trainer.device,
                    progress=rank0,
                    attraction=(lambda: task.attraction(net, heldout_images, train_images))
                    if heldout_images is not None else None)
    summary = result["memorization"][ev.memorization_features]
    if ev.memorization_features != "pixels":
        summary["pixels"] = result["memorization"]["pixels"]
    if result["attraction"] is not None:
        summary["attraction"] = result["attraction"]
    if not rank0:
        return None
    save_image_grid(images, trainer.run_dir / "samples.png")
    atomic_write_json(trainer.run_dir / "memorization.json", summary, indent=2, default=float)
    return summary


def write_run_info(run_dir: Path, cfg: ExperimentConfig, world_size: int,
                   paths_as_typed: Optional[dict] = None) -> None:
    """run.json: what produced this run (config, the fields it resolves for this world size,
    provenance: package version, its own checkout's revision, library versions, machine; the
    working directory and the path options as typed, when relative: config holds them
    absolute) and `notes`, what the run does other than the config says in so many words
    (said on screen once, too): a length rounded to whole batches, the end-of-run sampler's
    adjustments."""
    notes = training_notes(cfg, world_size) + SamplerSettings.for_run(cfg, announce=False).notes
    for note in notes:
        say_once(note)
    info = {"config": to_dict(cfg), "fingerprint": cfg.fingerprint(), "world_size": world_size,
            "resolved": resolved_fields(cfg, world_size), "notes": notes, **provenance(),
            "argv": sys.argv, "cwd": os.getcwd(), "paths_as_typed": paths_as_typed or {}}
    atomic_write_json(run_dir / "run.json", info, indent=2)


def format_memorization(summary: dict) -> str:
    """A few readable lines of the memorization summary (the JSON file has everything)."""
    lines = [f"memorization: nearest of {summary.get('num_train')} training images by "
             f"{summary.get('similarity', 'cosine similarity')} in {summary.get('feature_space')} space"]
    for name in ("generated", "heldout"):
        stats = summary.get(name)
        if not stats:
            lines.append(f"  {name:9s}: none (no held-out images in the shards: no calibration)")
            continue
        above = ", ".join(f"> {t}: {100 * f:.1f}%" for t, f in stats["fraction_above"].items())
        lines.append(f"  {name:9s} ({stats['count']}): mean {stats['mean']:.3f}, "
                     f"p95 {stats['p95']:.3f}, {above}, Carlini {100 * stats['carlini_fraction']:.1f}%")
    if summary.get("note"):
        lines.append(f"  note: {summary['note']}")
    if summary.get("pixels"):
        lines.append(format_memorization(summary["pixels"]))
    attraction = summary.get("attraction")
    if attraction:
        per = ", ".join(f"sigma {s}: {v['mean_ratio']:.2f}" for s, v in attraction["per_sigma"].items())
        lines.append(f"denoiser attraction of {attraction['count']} held-out images (distance to the "
                     f"nearest training image / to the original; lower = pulled to copies): {per}")
    return "\n".join(lines)


def run_training(cfg: ExperimentConfig, run_dir: Optional[str | os.PathLike] = None,
                 resume: Optional[str] = None) -> Path:
    """The whole job on this rank: join the process group, prepare the run directory, train
    (or continue), then report. Works the same as a plain process or under a launcher.

    Relative path options are made absolute first (config.with_absolute_paths): the
    checkpoints, config.yaml and run.json then name the same files from any directory."""
    typed = typed_paths(cfg)
    cfg = with_absolute_paths(cfg)
    task_class(cfg).check_data(cfg)  # a clear error before any model is loaded
    info = init_distributed(cfg)
    stack = contextlib.ExitStack()
    try:
        validate_world(cfg, info.world_size)
        if info.distributed and cfg.distributed.engine != "deepspeed":
            raise ConfigError(f"distributed.engine: {info.world_size} ranks need "
                              "distributed.engine=deepspeed (the plain engine is single-process)")
        run_dir = resolve_run_dir(cfg, run_dir)
        lock = own_run_dir(run_dir, info)
        stack.callback(lock.release)
        resume_from = find_resume_point(run_dir, resume, cfg.train.keep_checkpoints)
        trainer = build_trainer(cfg, run_dir, dist_info=info, resume_from=resume_from)
        # model + EMA + two Adam moments, float32, per kept checkpoint (+1 while writing).
        check_output_dir(run_dir, trainer.num_parameters * 4 * 4 * (cfg.train.keep_checkpoints + 1))
        if info.is_main:
            save_config(cfg, run_dir, typed)
            write_run_info(run_dir, cfg, info.world_size, typed)
            if resume_from is not None:
                print(f"resuming from {resume_from} at {trainer.images_seen} images")
        if trainer.train():
            summary = finish(trainer)
            if summary is not None:
                print(format_memorization(summary))
                print(f"run directory: {run_dir} (config.yaml, checkpoints/, ema.safetensors, "
                      "samples.png, memorization.json, TensorBoard events)")
        return run_dir
    except Exception as e:
        if info.distributed:
            # Name the rank: with several ranks the first line a user sees is often another
            # rank's "connection closed", caused by this one.
            print(f"rank {info.rank} of {info.world_size} failed: {type(e).__name__}: {original_message(e)}\n"
                  f"(a rank that dies or stops answering ends every other rank at its next "
                  f"collective, after at most distributed.timeout_s = {cfg.distributed.timeout_s:g} s)",
                  file=sys.stderr, flush=True)
        raise
    finally:
        stack.close()  # the run directory's lock
        shutdown(info)
