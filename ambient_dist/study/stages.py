"""The four stages of one study run: shards, train, sample, evaluate."""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ambient_dist.study.config import RunSpec, StudyConfig, StudyError, _open_source

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


def launch_training(cmd: list[str], env: dict, log: Path) -> int:
    """Run the trainer command to its end (output appended to `log`); returns its exit
    status. A stop signal is forwarded to the trainer, which checkpoints; then this raises
    study.process.Interrupted (the trainer is never killed)."""
    from ambient_dist.study.process import run_child, with_launcher
    return run_child(with_launcher(cmd, env), env, log)  # torchrun in a multi-GPU SLURM job


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
    start = time.time()
    rc = launch_training(cmd, env, log)
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


def run_one(study: StudyConfig, spec: RunSpec, device: str, progress: bool) -> dict:
    """All four stages of one run (shards, train, sample, evaluate), each skipped when done;
    returns the run's evaluation. The trainer runs with this process's environment. Raises on
    failure, with the stage's name in the exception's `stage` attribute; a stop signal
    during training raises study.process.Interrupted."""
    import os
    refs = _References(study, spec.run_dir.parent.parent, device)
    stages = [("shards", lambda: make_run_shards(study, spec, progress)),
              ("train", lambda: train_run(spec, dict(os.environ), spec.run_dir / "train.log")),
              ("sample", lambda: sample_run(study, spec, device, progress)),
              ("evaluate", lambda: evaluate_run(study, spec, refs, device))]
    result = None
    for stage, fn in stages:
        try:
            result = fn()
        except Exception as e:
            e.stage = stage
            raise
    return result
