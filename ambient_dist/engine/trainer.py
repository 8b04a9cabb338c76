"""The training loop: network + ambient loss + data -> checkpoints, EMA, samples, report.

One `Trainer` runs one experiment in the style of EDM's training_loop: every step draws the
global batch (in micro-batches when accumulating), computes the two-branch ambient loss with
one network call per micro-batch, clips, steps the optimizer at the ramped learning rate and
updates the EMA. Progress is counted in images, so schedules, intervals and resume points do
not depend on the batch size.

A run directory holds config.yaml, run.json, TensorBoard events, checkpoints/ and, at the
end, ema.safetensors (what sampling and evaluation load with the config.yaml beside it),
samples.png and memorization.json.

Resume is exact: model, EMA, optimizer, RNG states and the loader position are restored, so
on CPU a resumed run produces bit for bit the losses of an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch
import yaml

from ambient_dist import data, metrics, sampling
from ambient_dist.config import (ConfigError, ExperimentConfig, save_config, to_dict,
                                 validate_world)
from ambient_dist.data.augment import to_model_units
from ambient_dist.engine.checkpoint import Checkpoint, CheckpointManager, export_safetensors_atomic
from ambient_dist.engine.distributed import DistInfo, any_rank_true, init_distributed, shutdown
from ambient_dist.engine.ema import EMA, ema_beta
from ambient_dist.engine.logging import RunLogger, TrainingStats, save_image_grid
from ambient_dist.engine.lr import learning_rate, set_learning_rate
from ambient_dist.models import build_network
from ambient_dist.models.flops import train_gflop_per_image
from ambient_dist.objective import build_loss

# A run stops (with a message) after this many optimizer steps in a row were skipped for a
# non-finite loss or gradient: one bad batch is noise, a long streak is a diverged run.
MAX_BAD_STEPS_IN_A_ROW = 50

# Options that may differ between a checkpoint and the config resuming it: they change how
# long the run goes or what it reports, never the trajectory of the weights.
RESUMABLE_CHANGES = ("name", "description", "train.total_kimg", "train.log_every_kimg",
                     "train.checkpoint_every_kimg", "train.sample_every_kimg",
                     "train.keep_checkpoints", "train.run_root", "data.shards", "data.loader",
                     "data.workers", "sampling.", "evaluation.", "distributed.timeout_s")


# ----------------------------------------------------------------------------------------
# Run directory, resume point, description.
# ----------------------------------------------------------------------------------------

def resolve_run_dir(cfg: ExperimentConfig, run_dir: Optional[str | os.PathLike] = None) -> Path:
    return Path(run_dir) if run_dir else Path(cfg.train.run_root) / cfg.name


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
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run directory {run_dir}: not writable ({e.strerror})") from None
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise ConfigError(f"run directory {run_dir}: {free / 2**30:.2f} GiB free, but keeping the "
                          f"checkpoints needs about {needed_bytes / 2**30:.2f} GiB")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_compatible(saved: dict, cfg: ExperimentConfig, checkpoint: Path) -> None:
    """Refuse to continue a checkpoint under options that would change its trajectory."""
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    changed = [k for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES)]
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise ConfigError(f"checkpoint {checkpoint} was trained with different options ({details}); "
                          "resume with the run's own config.yaml or start a new run directory")


def describe(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML, the parameter count and the training cost per image."""
    net = build_network(cfg)
    params = sum(p.numel() for p in net.parameters())
    gflop = train_gflop_per_image(net, cfg.data.resolution, cfg.data.channels, net.label_dim)
    return (yaml.safe_dump(to_dict(cfg), sort_keys=False)
            + f"parameters: {params}\ntrain GFLOP/image: {gflop:.2f}")


def write_run_info(run_dir: Path, cfg: ExperimentConfig, world_size: int) -> None:
    """run.json: what produced this run (config, versions, world size, git revision)."""
    def git_revision() -> Optional[str]:
        try:
            return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                  capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None
    info = {"config": to_dict(cfg), "fingerprint": cfg.fingerprint(), "world_size": world_size,
            "git_revision": git_revision(), "python": sys.version.split()[0],
            "torch": torch.__version__, "host": platform.node(), "argv": sys.argv}
    tmp = run_dir / ".run.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, run_dir / "run.json")


class StopFlag:
    """SIGTERM / SIGUSR1 (cluster preemption) ask the loop to checkpoint and exit cleanly."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested: Optional[str] = None
        self._previous = {}

    def __enter__(self) -> "StopFlag":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signal handling to the caller
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------
# The trainer.
# ----------------------------------------------------------------------------------------

def build_optimizer(params, cfg: ExperimentConfig, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optimizer
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
               fused=device.type == "cuda")


class Trainer:
    """Single-process PyTorch training. `DeepSpeedTrainer` (deepspeed_engine.py) overrides
    the few hooks marked below: how the model and optimizer are set up, how a micro-batch
    is back-propagated and a step applied, what the EMA averages, and checkpoint I/O."""

    def __init__(self, cfg: ExperimentConfig, run_dir: str | os.PathLike,
                 dist_info: Optional[DistInfo] = None, resume_from: Optional[Path] = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.dist = dist_info or DistInfo(
            device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        self.device, self.rank, self.world_size = self.dist.device, self.dist.rank, self.dist.world_size
        t = cfg.train
        self.micro_batch = cfg.micro_batch(self.world_size)
        self.accumulation = cfg.accumulation_steps(self.world_size)
        self.memory_format = torch.channels_last if t.channels_last else torch.contiguous_format

        torch.manual_seed(t.seed)  # the initial weights: the same on every rank
        net = self._build_network().to(self.device, memory_format=self.memory_format).train()
        if t.compile:
            # Compile the U-Net call the loss makes (net.raw); the module and its state_dict
            # keys stay as they are, so checkpoints are the same with or without compile.
            net.raw = torch.compile(net.raw)
        self.num_parameters = sum(p.numel() for p in net.parameters())
        self.loss_fn = self._build_loss()
        self._setup_model(net)
        self.ema = EMA(self._ema_live())
        # sigma and eps come from their own generator (saved with the checkpoint); dropout
        # uses the global RNG (also saved). Each rank draws different noise.
        self.noise_generator = torch.Generator(self.device).manual_seed(t.seed + 1 + self.rank)
        self.checkpoints = CheckpointManager(self.run_dir, t.keep_checkpoints)
        self.images_seen = self.steps = self.bad_steps = self.bad_in_a_row = 0
        if resume_from is not None:
            self._restore(resume_from)
        self.loader = self._build_loader()
        self.batches = iter(self.loader)
        self.stats = TrainingStats()

    # -- what is trained on what (ambient_dist.text.text_trainer overrides these) -------
    def _build_network(self) -> torch.nn.Module:
        return build_network(self.cfg)

    def _build_loss(self):
        return build_loss(self.cfg.objective)

    def _build_loader(self):
        """An iterator of data.Batch with state_dict(), resuming at self.images_seen."""
        return data.build_loader(self.cfg, self.rank, self.world_size, self.device,
                                 start_sample=self.images_seen)

    # -- hooks: the plain PyTorch implementation -----------------------------------------
    def _setup_model(self, net: torch.nn.Module) -> None:
        self.net = net  # what the loss calls
        self.optimizer = build_optimizer(net.parameters(), self.cfg, self.device)

    def _ema_live(self) -> dict[str, torch.Tensor]:
        """The live weights the EMA follows (the whole model here; a partition under ZeRO-3)."""
        return self.net.state_dict()

    def _backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def _apply_step(self, step_loss: torch.Tensor) -> tuple[bool, torch.Tensor]:
        """Clip and step unless the loss or gradient is not finite -> (applied, grad norm)."""
        params = [p for p in self.net.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        # One host sync per step: a non-finite loss or gradient skips the update entirely.
        finite = bool(torch.isfinite(step_loss) & torch.isfinite(grad_norm))
        if finite:
            if self.cfg.optimizer.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.cfg.optimizer.grad_clip, grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite, grad_norm

    # -- one optimizer step ------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.train.precision == "bf16")

    def train_step(self) -> torch.Tensor:
        """One step over the global batch; returns this rank's mean loss (a device scalar)."""
        set_learning_rate(self.optimizer, learning_rate(self.cfg.optimizer, self.images_seen))
        step_loss = torch.zeros((), device=self.device)
        for _ in range(self.accumulation):
            batch = next(self.batches)
            clean = batch.clean.to(self.device, memory_format=self.memory_format)
            noisy = batch.noisy.to(self.device, memory_format=self.memory_format)
            labels = None if batch.labels is None else batch.labels.to(self.device)
            with self._autocast():
                out = self.loss_fn(self.net, clean, noisy, labels, generator=self.noise_generator)
            self._backward(out.loss)
            step_loss += out.loss.detach() / self.accumulation
            self.stats.add_batch(out.per_sample, out.ambient, out.sigma)

        applied, grad_norm = self._apply_step(step_loss)
        if applied:
            t = self.cfg.train
            beta = ema_beta(self.images_seen, t.batch, t.ema_halflife_kimg, t.ema_rampup_ratio)
            self.ema.update(self._ema_live(), beta)
            self.bad_in_a_row = 0
        else:
            self.bad_steps += 1
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= MAX_BAD_STEPS_IN_A_ROW:
                raise FloatingPointError(
                    f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient "
                    f"(at {self.images_seen} images); the run has diverged. Lower optimizer.lr or "
                    f"set optimizer.grad_clip, and resume from {self.checkpoints.latest()}")
        self.stats.add_step(grad_norm, skipped=not applied)
        self.images_seen += self.cfg.train.batch
        self.steps += 1
        return step_loss

    # -- the loop ----------------------------------------------------------------------
    def _crossed(self, every_kimg: float) -> bool:
        """Did the last step cross a multiple of `every_kimg` thousand images?"""
        every = max(int(round(every_kimg * 1000)), 1)
        return self.images_seen // every > (self.images_seen - self.cfg.train.batch) // every

    def train(self) -> bool:
        """Train to train.total_kimg. Returns False if stopped early by a signal."""
        t = self.cfg.train
        total = int(round(t.total_kimg * 1000))
        logger = RunLogger(self.run_dir, total, self.images_seen, enabled=self.rank == 0)
        saved_at = self.images_seen if self.checkpoints.latest() else -1
        try:
            with StopFlag() as stop:
                while self.images_seen < total:
                    # Every rank must leave the loop at the same step (checkpointing is
                    # collective), so a signal seen by any rank stops all of them.
                    if any_rank_true(stop.requested is not None, self.dist):
                        stop.requested = stop.requested or "signal on another rank"
                        break
                    loss = self.train_step()
                    logger.progress(self.images_seen, None)
                    if self._crossed(t.log_every_kimg) or self.images_seen >= total:
                        scalars, sigmas = self.stats.summary()
                        logger.progress(self.images_seen, scalars.get("loss/all", loss.item()))
                        logger.log(self.images_seen, scalars, sigmas,
                                   lr=self.optimizer.param_groups[0]["lr"])
                    if self._crossed(t.sample_every_kimg) and self.images_seen < total:
                        grid = self.generate(min(16, self.cfg.sampling.num_images))
                        if grid is not None:
                            logger.image("samples", grid, self.images_seen)
                    if self._crossed(t.checkpoint_every_kimg):
                        self.save_checkpoint()
                        saved_at = self.images_seen
                if saved_at != self.images_seen:
                    self.save_checkpoint()
                if stop.requested:
                    logger.write(f"{stop.requested}: checkpoint saved at {self.images_seen} images "
                                 f"in {self.checkpoints.latest()}; continue with --resume auto")
                    return False
        finally:
            logger.close()
        return True

    # -- checkpoints -------------------------------------------------------------------
    def _rng_states(self) -> dict[str, torch.Tensor]:
        states = {"torch": torch.get_rng_state(), "noise": self.noise_generator.get_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def _meta(self) -> dict:
        return {"images_seen": self.images_seen, "steps": self.steps, "bad_steps": self.bad_steps,
                "world_size": self.world_size, "fingerprint": self.cfg.fingerprint(),
                "config": to_dict(self.cfg)}

    def _check_resumable(self, meta: dict, path: Path) -> None:
        check_resume_compatible(meta["config"], self.cfg, path)
        if meta["world_size"] != self.world_size:
            raise ConfigError(f"checkpoint {path} was written by {meta['world_size']} ranks; this "
                              f"run has {self.world_size}. Resume at the same world size (the "
                              "per-rank optimizer partitions and data positions depend on it).")

    def _set_rng_states(self, rng: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(rng["torch"])
        self.noise_generator.set_state(rng["noise"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _set_progress(self, meta: dict) -> None:
        self.images_seen = meta["images_seen"]
        self.steps, self.bad_steps = meta["steps"], meta["bad_steps"]

    def save_checkpoint(self) -> Path:
        path = self._write_checkpoint()
        self.export_ema()
        return path

    def _write_checkpoint(self) -> Path:
        ckpt = Checkpoint(
            model=self.net.state_dict(), ema=self.ema.state_dict(), rng=self._rng_states(),
            state={"optimizer": self.optimizer.state_dict(), "loader": self.loader.state_dict()},
            meta=self._meta())
        return self.checkpoints.save(ckpt, self.images_seen)

    def _restore(self, path: Path) -> None:
        ckpt = CheckpointManager.load(path, self.device)
        self._check_resumable(ckpt.meta, path)
        self.net.load_state_dict(ckpt.model)
        self.ema.load_state_dict(ckpt.ema)
        self.optimizer.load_state_dict(ckpt.state["optimizer"])
        self._set_rng_states(ckpt.rng)
        self._set_progress(ckpt.meta)

    def ema_state_full(self) -> dict[str, torch.Tensor]:
        """The whole model's EMA weights (collective under ZeRO-3, where each rank has a part)."""
        return self.ema.state_dict()

    def export_ema(self) -> Path:
        """<run_dir>/ema.safetensors: the EMA weights under the network's own keys (rank 0)."""
        state = self.ema_state_full()
        path = self.run_dir / "ema.safetensors"
        if self.rank == 0:
            export_safetensors_atomic(state, path, metadata={
                "images_seen": str(self.images_seen), "fingerprint": self.cfg.fingerprint()})
        return path

    # -- end of run: samples and the memorization summary ------------------------------
    def ema_network(self) -> torch.nn.Module:
        state = self.ema_state_full()
        net = build_network(self.cfg).to(self.device).eval().requires_grad_(False)
        net.load_state_dict(state)
        return net

    def generate(self, num_images: int, every_rank: bool = False) -> Optional[torch.Tensor]:
        """Images 0..num_images-1 from the EMA weights with the EDM Heun sampler, on rank 0
        (None elsewhere) or, with every_rank, the same images on every rank. Each image has
        its own seed (sampling.seed, index), so the grid is the same at any batch size;
        class-conditional networks cycle through the classes."""
        net = self.ema_network()  # every rank takes part in gathering the EMA
        if self.rank != 0 and not every_rank:
            return None
        indices = list(range(num_images))
        labels = (torch.tensor(indices, device=self.device) % net.label_dim
                  if net.label_dim else None)
        bf16 = self.cfg.train.precision == "bf16"
        return sampling.edm_sample(
            net, indices, (net.img_channels, net.img_resolution, net.img_resolution),
            seed=self.cfg.sampling.seed, labels=labels,
            settings=sampling.SamplerSettings.from_config(self.cfg.sampling),
            autocast_dtype=torch.bfloat16 if bf16 else None, device=self.device)

    def reference_images(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The images trained on (data.subset takes a prefix of the stored order) and the
        held-out images (never trained on), float32 [N, C, H, W] in [-1, 1]."""
        def as_tensor(images) -> torch.Tensor:
            return to_model_units(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
        shards = self.cfg.data.shards
        _, train, _ = data.load_images(shards, "train")
        train = as_tensor(train[: self.cfg.data.subset or len(train)])
        if not data.read_manifest(shards).get("heldout"):
            return train, None
        _, heldout, _ = data.load_images(shards, "heldout")
        return train, as_tensor(heldout[: self.cfg.evaluation.heldout_images])

    def finish(self) -> Optional[dict]:
        """Export the EMA, write samples.png and memorization.json; return the summary
        (on rank 0; the other ranks take part in the collectives and return None)."""
        self.export_ema()
        # The memorization summary splits its feature extraction over the ranks, so every
        # rank needs the samples; they are identical everywhere (per-image seeds).
        images = self.generate(self.cfg.sampling.num_images, every_rank=True)
        train_images, heldout_images = self.reference_images()
        summary = metrics.memorization_summary(images, train_images, heldout_images,
                                               self.cfg.evaluation, self.device,
                                               progress=self.rank == 0)
        if self.rank != 0:
            return None
        save_image_grid(images, self.run_dir / "samples.png")
        tmp = self.run_dir / ".memorization.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=float))
        os.replace(tmp, self.run_dir / "memorization.json")
        return summary


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
    return "\n".join(lines)


def run_training(cfg: ExperimentConfig, run_dir: Optional[str | os.PathLike] = None,
                 resume: Optional[str] = None, trainer_classes: Optional[dict] = None) -> Path:
    """The whole job on this rank: join the process group, prepare the run directory, train
    (or continue), then report. Works the same as a plain process or under a launcher."""
    info = init_distributed(cfg)
    try:
        validate_world(cfg, info.world_size)
        if info.distributed and cfg.distributed.engine != "deepspeed":
            raise ConfigError(f"distributed.engine: {info.world_size} ranks need "
                              "distributed.engine=deepspeed (the plain engine is single-process)")
        run_dir = resolve_run_dir(cfg, run_dir)
        resume_from = find_resume_point(run_dir, resume, cfg.train.keep_checkpoints)
        if trainer_classes:  # {"none": class, "deepspeed": class}, e.g. the text trainers
            trainer_class = trainer_classes[cfg.distributed.engine]
        elif cfg.distributed.engine == "deepspeed":
            from ambient_dist.engine.deepspeed_engine import DeepSpeedTrainer as trainer_class
        else:
            trainer_class = Trainer
        trainer = trainer_class(cfg, run_dir, dist_info=info, resume_from=resume_from)
        # model + EMA + two Adam moments, float32, per kept checkpoint (+1 while writing).
        check_output_dir(run_dir, trainer.num_parameters * 4 * 4 * (cfg.train.keep_checkpoints + 1))
        if info.is_main:
            save_config(cfg, run_dir)
            write_run_info(run_dir, cfg, info.world_size)
            if resume_from is not None:
                print(f"resuming from {resume_from} at {trainer.images_seen} images")
        if trainer.train():
            summary = trainer.finish()
            if summary is not None:
                print(format_memorization(summary))
                print(f"run directory: {run_dir} (config.yaml, checkpoints/, ema.safetensors, "
                      "samples.png, memorization.json, TensorBoard events)")
        return run_dir
    except Exception as e:
        if info.distributed:
            # Name the rank: with several ranks the first line a user sees is often another
            # rank's "connection closed", caused by this one.
            print(f"rank {info.rank} of {info.world_size} failed: {type(e).__name__}: {e}\n"
                  f"(a rank that dies or stops answering ends every other rank at its next "
                  f"collective, after at most distributed.timeout_s = {cfg.distributed.timeout_s:g} s)",
                  file=sys.stderr, flush=True)
        raise
    finally:
        shutdown(info)
