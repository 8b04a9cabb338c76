"""The four stages of one study run (shards, train, sample, evaluate) and when each is reused.

`run_one(study, spec, device, progress)` does all four for one (run, size, seed). Each stage
records a digest of its complete inputs next to its result, and a result is reused only when
the digest the current study file gives is the recorded one; otherwise the stage is redone,
or (training, when that would throw away its checkpoints) refused:

    shards    <shards>/study-shards.json: the data plan (study/config.data_plan: source, path,
              resolution, channels, sigma_tn, form, noise seed, training count, subset seed,
              held-out count, mask corruption, ...). The plan's digest is part of the
              directory's name, so a changed data setting is a new directory, made from
              scratch (REDO: shards are cheap and deterministic; the old directory is left for
              any run that still uses it).
    train     <run>/study-train.json: every config option that changes the weights' trajectory
              (all but engine.checkpoint.RESUMABLE_CHANGES), the data plan, the schedule length.
              A longer schedule CONTINUES from the last checkpoint; options that only change
              reporting are reused as they are (the run's config.yaml is rewritten to the
              current ones). Changed trajectory options or data, or a shorter schedule, while
              checkpoints exist are REFUSED (StudyError naming the changes and --retrain): the
              checkpoints cannot continue under them, and hours of training are not deleted
              because a study file was edited. `RunSpec.retrain` (ambient-study --retrain)
              deletes the run directory and trains from scratch.
    sample    <run>/study-sample.json: the EMA weights' digest, number of samples, sampling
              seed, sampler settings (SamplerSettings.for_run). REDO: a sample set made
              differently is deleted (the study owns it); one made the same way with fewer
              images is extended (image n depends only on the weights, seed, sampler and n).
    evaluate  <run>/study-eval.json (its "inputs" and "digest" fields): the weights' and the
              samples' digests, the data plan, the study's whole `evaluation` section
              (quality_reference, attraction_sigmas, attraction_images, calibration_images,
              features, num_samples, figure settings, batch), the run's config `evaluation`
              section (thresholds, feature-extractor paths) and the sampler settings (the
              attraction denoiser). REDO (cheap next to training; the old numbers belong to
              other settings).

Each digest contains its upstream stage's, so a change redoes that stage and everything after
it. `result_status` applies the same rules to decide which study-eval.json files the report
may use. A failed stage raises `RunFailed` (after writing <run>/study-failed.json).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

from ambient_dist.config import flatten_options, save_config, to_dict
from ambient_dist.errors import original_message
from ambient_dist.study.config import (RunSpec, StudyConfig, StudyError, _open_source,
                                       inputs_digest, shard_options)

SHARDS_RECORD = "study-shards.json"
TRAIN_RECORD = "study-train.json"
SAMPLE_RECORD = "study-sample.json"
EVAL_RECORD = "study-eval.json"
FAILED_RECORD = "study-failed.json"
ATTRACTION_FILE = "study-attraction.pt"


class RunFailed(Exception):
    """One run's stage failed. run: the run's name; stage: one of STAGES; error: one line
    (`Type: message`); the cause is chained (`__cause__`)."""

    def __init__(self, run: str, stage: str, error: str):
        self.run, self.stage, self.error = run, stage, error
        super().__init__(f"{run}: {stage} failed: {error}")


def record_failure(run_dir: Path, stage: str, error: BaseException, message: str) -> None:
    """<run>/study-failed.json: the stage, the error, the one-line `message` ("stage: Type:
    text") and the traceback of the exception being handled. The one writer of the record
    (run_one, the worker, the driver's shard stage)."""
    _write_json(Path(run_dir) / FAILED_RECORD, {"stage": stage, "error": str(error),
                                                 "message": message,
                                                 "traceback": traceback.format_exc()})


def recorded_failure(run_dir: Path) -> Optional[str]:
    """The one-line message of <run>/study-failed.json, or None when the run has none."""
    record = Path(run_dir) / FAILED_RECORD
    if not record.is_file():
        return None
    r = _read_json(record)
    if r is None:
        return f"failed ({record} unreadable)"
    return r.get("message") or f"{r.get('stage')}: {r.get('error')}"


def _write_json(path: Path, obj) -> None:
    from ambient_dist.fileio import atomic_write_json
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


def _read_json(path: Path) -> Optional[dict]:
    """A record, or None when it is missing or unreadable (then the stage is redone)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def changes(old, new, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs between two input descriptions."""
    a = flatten_options(old, prefix) if isinstance(old, dict) else {prefix.rstrip("."): old}
    b = flatten_options(new, prefix) if isinstance(new, dict) else {prefix.rstrip("."): new}
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _listed(items: list[str], limit: int = 6) -> str:
    return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")


# --------------------------------------------------------------------------------------
# shards
# --------------------------------------------------------------------------------------

def make_run_shards(study: StudyConfig, spec: RunSpec, progress: bool) -> str:
    """Make (or finish, or reuse) the shard directory of `spec`'s data plan; returns "reused"
    or "made". Shared by every run with the same plan: callers that run several at once hold
    a lock on spec.shards around this call."""
    from ambient_dist.data.shards import ShardError, make_shards, read_manifest
    record = _read_json(spec.shards / SHARDS_RECORD)
    if record is not None and record.get("digest") == spec.data_digest:
        try:
            if read_manifest(spec.shards).get("complete"):
                return "reused"
        except ShardError:
            pass
    try:
        make_shards(_open_source(study.data), spec.shards,
                    shard_options(study, spec.size, spec.seed, spec.config), progress=progress)
    except ShardError as e:
        if "different source or options" not in str(e):
            raise
        raise StudyError(f"{spec.shards}: holds shards of another plan than this study's "
                         f"(did the source's files change?): delete the directory to remake it "
                         f"({e})") from None
    _write_json(spec.shards / SHARDS_RECORD, {"digest": spec.data_digest, "inputs": spec.data_plan})
    return "made"


# --------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------

def training_inputs(spec: RunSpec) -> dict:
    """What the weights are a function of: the trajectory options, the data plan, the length."""
    from ambient_dist.engine.checkpoint import RESUMABLE_CHANGES
    options = {k: v for k, v in flatten_options(to_dict(spec.config)).items()
               if not k.startswith(RESUMABLE_CHANGES)}
    return {"options": options, "data": spec.data_plan,
            "total_images": int(round(spec.config.train.total_kimg * 1000))}


def _has_training(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "latest").is_file() or (run_dir / "ema.safetensors").is_file()


def _images_trained(spec: RunSpec) -> int:
    """Images the run's latest checkpoint has seen (0 without one)."""
    from ambient_dist.engine.checkpoint import CheckpointManager
    latest = CheckpointManager(spec.run_dir, spec.config.train.keep_checkpoints).latest()
    meta = _read_json(latest / "meta.json") if latest else None
    return int(meta.get("images_seen", 0)) if meta else 0


def training_refusal(spec: RunSpec) -> Optional[str]:
    """Why the run's existing checkpoints cannot continue under the current study file (None:
    they can, or there are none, or spec.retrain). Known before anything starts."""
    if spec.retrain or not _has_training(spec.run_dir):
        return None
    old = _read_json(spec.run_dir / TRAIN_RECORD)
    if old is None or not isinstance(old.get("inputs"), dict):
        return None  # made without a record (by hand, an older study): the trainer checks it
    now, was = training_inputs(spec), old["inputs"]
    what = (changes(was.get("options"), now["options"])
            + changes(was.get("data"), now["data"], "data plan."))
    seen = _images_trained(spec)
    if not what and now["total_images"] < seen:
        # Shorter than what the run was set to is fine while it has not trained that far (a
        # run stopped early continues to the new length); past it, the weights are of more.
        what = [f"train.total_kimg: {was.get('total_images', 0) / 1000:g} -> "
                f"{now['total_images'] / 1000:g} (it trained {seen / 1000:g}k images already)"]
    if not what:
        return None
    return (f"{spec.name}: trained under other settings ({_listed(what)}); its checkpoints "
            f"cannot continue under these. Pass --retrain {spec.name} (or --retrain "
            f"{spec.run.name} for every size and seed of that run) to delete {spec.run_dir} and "
            "train it again from scratch, or restore the settings")


def launch_training(cmd: list[str], env: dict, log: Path) -> int:
    """Run the trainer command to its end (output appended to `log`); returns its exit
    status. A stop signal is forwarded to the trainer, which checkpoints; then this raises
    study.process.Interrupted (the trainer is never killed)."""
    from ambient_dist.study.process import run_child, with_launcher
    return run_child(with_launcher(cmd, env), env, log)  # torchrun in a multi-GPU SLURM job


def train_run(spec: RunSpec, env: dict, log: Path) -> str:
    """ambient-train in a subprocess (--resume auto: an interrupted or shorter run continues);
    returns "reused", "trained" or "continued". Raises StudyError when training_refusal."""
    import os
    refusal = training_refusal(spec)
    if refusal:
        raise StudyError(refusal)
    if spec.retrain and spec.run_dir.exists():
        shutil.rmtree(spec.run_dir)
    record_path = spec.run_dir / TRAIN_RECORD
    now = training_inputs(spec)
    old = _read_json(record_path)
    if (old is not None and old.get("status") == "done" and old.get("inputs") == now
            and (spec.run_dir / "ema.safetensors").is_file()):
        # Options that do not change the weights (sampling, evaluation, intervals) may have
        # changed: the run directory's config.yaml says what the later stages use.
        save_config(spec.config, spec.run_dir)
        return "reused"
    continued = _has_training(spec.run_dir)
    cfg_path = save_config(spec.config, spec.run_dir.parent.parent / "configs" / spec.name)
    _write_json(record_path, {"status": "started", "digest": inputs_digest(now), "inputs": now})
    cmd = [sys.executable, "-m", "ambient_dist.cli.train", "--config", str(cfg_path),
           "--run-dir", str(spec.run_dir), "--resume", "auto"]
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    rc = launch_training(cmd, env if env is not None else dict(os.environ), log)
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"ambient-train exited with {rc} (log {log}):\n    " + "\n    ".join(tail))
    # ambient-train also exits 0 when preempted (SIGTERM: checkpoint, then exit): only a run
    # that reached its length is done.
    from ambient_dist.engine.checkpoint import CheckpointManager
    latest = CheckpointManager(spec.run_dir, spec.config.train.keep_checkpoints).latest()
    seen = json.loads((latest / "meta.json").read_text())["images_seen"] if latest else 0
    if seen < now["total_images"]:
        raise RuntimeError(f"training stopped at {seen} of {now['total_images']} images "
                           "(preempted?); run the study again to continue it")
    _write_json(record_path, {"status": "done", "digest": inputs_digest(now), "inputs": now,
                              "seconds": time.time() - start, "images": now["total_images"],
                              "fingerprint": spec.config.fingerprint()})
    return "continued" if continued else "trained"


# --------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------

def sampler_description(cfg) -> dict:
    """The sampler settings a run samples with, as samples.json records them."""
    from ambient_dist import sampling
    settings = sampling.SamplerSettings.for_run(cfg)
    return {k: (str(v) if v == float("inf") else v) for k, v in vars(settings).items()}


def sample_inputs(study: StudyConfig, spec: RunSpec, weights_sha: str) -> dict:
    return {"weights": weights_sha, "num": study.evaluation.num_samples,
            "seed": spec.config.sampling.seed, "sampler": sampler_description(spec.config)}


def sample_run(study: StudyConfig, spec: RunSpec, device: str, progress: bool) -> str:
    """evaluation.num_samples images of the run's EMA in <run>/samples; "reused" or "made"."""
    from ambient_dist import sampling
    from ambient_dist.metrics import samples as S
    path = spec.run_dir / "samples"
    weights = S.resolve_weights(spec.run_dir, None)
    now = sample_inputs(study, spec, S.file_digest(weights))
    record = _read_json(spec.run_dir / SAMPLE_RECORD)
    if record is not None and record.get("inputs") == now and path.is_dir():
        return "reused"
    meta = S.recorded_meta(path)
    if meta is not None:
        same_set = (meta.get("weights_sha") == now["weights"] and meta.get("seed") == now["seed"]
                    and {k: v for k, v in (meta.get("sampler") or {}).items() if k != "guidance"}
                    == now["sampler"])
        if not same_set:
            shutil.rmtree(path)  # another sample set (other weights or sampler): the study owns it
    net, _, weights = S.load_denoiser(spec.run_dir, device=device)
    S.sample_run(net, weights, path, now["num"], now["seed"],
                 sampling.SamplerSettings.for_run(spec.config), batch=study.evaluation.batch,
                 device=device, progress=progress)
    _write_json(spec.run_dir / SAMPLE_RECORD, {"digest": inputs_digest(now), "inputs": now})
    return "made"


# --------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------

def evaluation_inputs(study: StudyConfig, spec: RunSpec, weights_sha: str, samples_digest: str) -> dict:
    return {"weights": weights_sha, "samples": samples_digest, "data": spec.data_digest,
            "study_evaluation": to_dict(study.evaluation),
            "run_evaluation": to_dict(spec.config.evaluation),
            "sampler": sampler_description(spec.config)}


def _current_inputs(study: StudyConfig, spec: RunSpec) -> tuple[Optional[dict], Optional[str]]:
    """(the evaluation inputs the current study file gives this run, None) when every stage
    before the evaluation is current; else (None, why not)."""
    from ambient_dist.metrics import samples as S
    train = _read_json(spec.run_dir / TRAIN_RECORD)
    if train is None or train.get("status") != "done":
        return None, "not trained to the end yet"
    if not isinstance(train.get("inputs"), dict):
        return None, "trained by an earlier version of the study (no record of its inputs)"
    if train.get("inputs") != training_inputs(spec):
        what = changes(train.get("inputs"), training_inputs(spec))
        return None, f"trained under other settings ({_listed(what)})"
    weights = spec.run_dir / "ema.safetensors"
    if not weights.is_file():
        return None, f"no EMA weights ({weights} is missing)"
    sha = S.file_digest(weights)
    sample = _read_json(spec.run_dir / SAMPLE_RECORD)
    if sample is None or not isinstance(sample.get("inputs"), dict):
        return None, "not sampled yet"
    if sample.get("inputs") != sample_inputs(study, spec, sha):
        what = changes(sample.get("inputs"), sample_inputs(study, spec, sha))
        return None, f"sampled under other settings ({_listed(what)})"
    return evaluation_inputs(study, spec, sha, sample["digest"]), None


def result_status(study: StudyConfig, spec: RunSpec) -> tuple[Optional[dict], Optional[str]]:
    """(the run's study-eval.json, None) when it was made under the current study file, from
    the current training, samples and data; else (None, a sentence saying why not)."""
    path = spec.run_dir / EVAL_RECORD
    if not path.is_file():
        return None, "not evaluated yet"
    result = _read_json(path)
    if result is None:
        return None, f"{path} is unreadable"
    inputs, why = _current_inputs(study, spec)
    if inputs is None:
        return None, why
    if not isinstance(result.get("inputs"), dict):
        return None, "evaluated by an earlier version of the study (no record of its inputs)"
    if result.get("digest") != inputs_digest(inputs):
        what = changes(result.get("inputs"), inputs)
        return None, f"evaluated under other settings ({_listed(what) or 'an older format'})"
    return result, None


def evaluate_run(study: StudyConfig, spec: RunSpec, device: str) -> dict:
    """Quality, memorization and attraction of one run (metrics.assess, as ambient-evaluate
    runs it) -> <run>/study-eval.json (+ study-attraction.pt for Figure 3); reused when its
    recorded digest is the current one (result_status).

    Quality: KID and FID against the first quality_reference held-out images (their Inception
    features cached in <study>/cache); memorization in pixels and each of `features`,
    calibrated by the first calibration_images held-out images; attraction of the first
    attraction_images held-out images at attraction_sigmas."""
    from ambient_dist import sampling
    from ambient_dist.data import load_pixel_images
    from ambient_dist.metrics import samples as S
    from ambient_dist.metrics.assess import QualityReference, assess
    from ambient_dist.metrics.features import as_model_units, check_same_shape
    from ambient_dist.metrics.memorization import network_attraction

    old, _ = result_status(study, spec)
    if old is not None:
        return old
    inputs, why = _current_inputs(study, spec)
    if inputs is None:
        raise StudyError(f"{spec.name}: cannot be evaluated: {why}")
    digest = inputs_digest(inputs)
    net, cfg, _ = S.load_denoiser(spec.run_dir, device=device)
    ev = study.evaluation
    _, generated, _ = S.read_samples(spec.run_dir / "samples", limit=ev.num_samples)
    if len(generated) != ev.num_samples:
        raise StudyError(f"{spec.run_dir / 'samples'}: {len(generated)} samples, expected {ev.num_samples}")
    train = load_pixel_images(spec.shards, "train", spec.size)
    held = load_pixel_images(spec.shards, "heldout")
    check_same_shape((f"training shards {spec.shards}", train),
                     (f"samples {spec.run_dir / 'samples'}", generated),
                     (f"held-out images of {spec.shards}", held))  # before KID, FID, memorization
    quality = held[: ev.quality_reference]
    assessed = assess(
        generated, train, held[: ev.calibration_images], cfg.evaluation,
        spaces=["pixels"] + list(ev.features),
        quality=QualityReference(quality, f"{len(quality)} held-out real images (never trained on)",
                                 spec.run_dir.parent.parent / "cache"),
        attraction=lambda: network_attraction(
            net, sampling.SamplerSettings.for_run(cfg), as_model_units(held[: ev.attraction_images]),
            as_model_units(train), ev.attraction_sigmas, device, keep_outputs=True),
        device=device, batch=ev.batch)
    memorization, attraction = assessed["memorization"], assessed["attraction"]
    figure = attraction["per_sigma"][f"{ev.figure_sigma:g}"]
    torch.save({"digest": digest, "outputs": figure.pop("outputs")[: ev.figure_rows],
                "nearest": figure["nearest_index"][: ev.figure_rows]},
               spec.run_dir / ATTRACTION_FILE)
    for entry in attraction["per_sigma"].values():
        entry.pop("outputs", None)
        entry.pop("nearest_index", None)
    for space in memorization.values():  # keep the table numbers; per-image lists stay short
        for part in ("generated", "heldout"):
            if space.get(part):
                space[part].pop("carlini_ratio", None)
    result = {"run": spec.name, "digest": digest, "inputs": inputs,
              "weights_sha": inputs["weights"], "num_samples": len(generated),
              "method": spec.run.method, "sigma_tn": spec.run.sigma_tn, "size": spec.size,
              "seed": spec.seed, "quality": assessed["quality"], "memorization": memorization,
              "attraction": attraction}
    _write_json(spec.run_dir / EVAL_RECORD, result)   # last: the record that says it is done
    return result


# --------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------

def run_one(study: StudyConfig, spec: RunSpec, device: str, progress: bool,
            env: Optional[dict] = None) -> dict:
    """All four stages of one run, each skipped when its recorded digest is the current one.

    env: the training subprocess's environment (default: this process's). Returns {"run": name,
    "stages": {stage: "reused" | "made" | "trained" | "continued" | ...}, "evaluation":
    study-eval.json's content}. Raises RunFailed naming the stage (after writing
    <run>/study-failed.json with the traceback); a KeyboardInterrupt / SystemExit passes
    through untouched. Prints one line per stage when `progress`."""
    say = (lambda msg: print(f"[study] {spec.name}: {msg}", flush=True)) if progress else (lambda msg: None)
    (spec.run_dir / FAILED_RECORD).unlink(missing_ok=True)
    stages: dict[str, str] = {}
    stage = "shards"
    try:
        stages["shards"] = make_run_shards(study, spec, False)
        stage = "train"
        if training_refusal(spec) is None and not _train_done(spec):
            say(f"training ({spec.config.train.total_kimg:g}k images)")
        stages["train"] = train_run(spec, env, spec.run_dir / "train.log")
        if stages["train"] != "reused":
            say(stages["train"])
        stage = "sample"
        stages["sample"] = sample_run(study, spec, device, progress)
        stage = "evaluate"
        before, _ = result_status(study, spec)
        if before is None:
            say("evaluating")
        evaluation = evaluate_run(study, spec, device)
        stages["evaluate"] = "reused" if before is not None else "made"
    except Exception as e:
        error = f"{type(e).__name__}: {original_message(e)}"  # a loader worker's own message
        record_failure(spec.run_dir, stage, e, f"{stage}: {error}")
        raise RunFailed(spec.name, stage, error) from e
    return {"run": spec.name, "stages": stages, "evaluation": evaluation}


def _train_done(spec: RunSpec) -> bool:
    old = _read_json(spec.run_dir / TRAIN_RECORD)
    return (old is not None and old.get("status") == "done" and old.get("inputs") == training_inputs(spec)
            and (spec.run_dir / "ema.safetensors").is_file() and not spec.retrain)
