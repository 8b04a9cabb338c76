"""The training loop: network + ambient loss + data -> checkpoints, EMA, samples, report.

One `Trainer` runs one experiment in the style of EDM's training_loop: every step draws the
global batch (in micro-batches when accumulating), computes the two-branch ambient loss with
one network call per micro-batch, clips, steps the optimizer at the ramped learning rate and
updates the EMA. Progress is counted in images, so schedules, intervals and resume points do
not depend on the batch size.

A run directory (prepared by run.py) holds config.yaml, run.json, TensorBoard events,
checkpoints/, augmentation.png when augmenting (the first batch as the loss read it) and, at the
end, ema.safetensors (what sampling and evaluation load with the config.yaml beside it),
samples.png and memorization.json.

Resume is exact: model, EMA, optimizer, RNG states and the loader position are restored, so
on CPU a resumed run produces bit for bit the losses of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import Optional

import torch

from ambient_dist import data, metrics, sampling
from ambient_dist.config import ConfigError, ExperimentConfig, to_dict
from ambient_dist.data.augment import GeometricAugment
from ambient_dist.engine.checkpoint import (Checkpoint, CheckpointManager, check_resume_compatible,
                                            export_safetensors_atomic)
from ambient_dist.engine.distributed import DistInfo, any_rank_true
from ambient_dist.engine.ema import EMA, ema_beta
from ambient_dist.engine.logging import RunLogger, TrainingStats, save_image_grid
from ambient_dist.engine.lr import learning_rate, set_learning_rate
from ambient_dist.models import build_network
from ambient_dist.objective import build_loss

# A run stops (with a message) after this many optimizer steps in a row were skipped for a
# non-finite loss or gradient: one bad batch is noise, a long streak is a diverged run.
MAX_BAD_STEPS_IN_A_ROW = 50


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
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = t.cudnn_benchmark

        torch.manual_seed(t.seed)  # the initial weights: the same on every rank
        net = self._build_network().to(self.device, memory_format=self.memory_format).train()
        if t.compile:
            # Compile the U-Net call the loss makes (net.raw); the module and its state_dict
            # keys stay as they are, so checkpoints are the same with or without compile.
            net.raw = torch.compile(net.raw)
        self.num_parameters = sum(p.numel() for p in net.parameters())
        self.loss_fn = self._build_loss()
        self.augment = GeometricAugment(cfg.augment) if cfg.augment.p > 0 else None
        self._setup_model(net)
        self.ema = EMA(self._ema_live())
        # sigma and eps come from their own generator (saved with the checkpoint); dropout
        # uses the global RNG (also saved). Each rank draws different noise.
        self.noise_generator = torch.Generator(self.device).manual_seed(t.seed + 1 + self.rank)
        self.checkpoints = CheckpointManager(self.run_dir, t.keep_checkpoints)
        self.images_seen = self.steps = self.bad_steps = self.bad_in_a_row = 0
        self._saved_loader_state: Optional[dict] = None  # the checkpoint's, set by _restore
        if resume_from is not None:
            self._restore(resume_from)
        self.loader = self._build_loader()
        if resume_from is not None:
            self._check_same_data(resume_from)
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
            mask = None if batch.mask is None else batch.mask.to(self.device, memory_format=self.memory_format)
            with self._autocast():
                out = self.loss_fn(self.net, clean, noisy, labels, generator=self.noise_generator,
                                   augment=self.augment, mask=mask)
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
        if self.augment is not None and self.images_seen == 0:
            self.augment.record = True  # picture of the first augmented batch, below
        try:
            with StopFlag() as stop:
                while self.images_seen < total:
                    # Every rank must leave the loop at the same step (checkpointing is
                    # collective), so a signal seen by any rank stops all of them.
                    if any_rank_true(stop.requested is not None, self.dist):
                        stop.requested = stop.requested or "signal on another rank"
                        break
                    loss = self.train_step()
                    if self.augment is not None and self.augment.recorded is not None:
                        self._save_augmentation_picture(logger)
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

    def _save_augmentation_picture(self, logger: RunLogger) -> None:
        """augmentation.png: what the loss read in the first micro-batch after augmentation
        (clean images for clean-branch samples, noisy copies for ambient ones)."""
        images, self.augment.recorded = self.augment.recorded, None
        if self.rank == 0:
            save_image_grid(images, self.run_dir / "augmentation.png")
            logger.image("augmentation", images, self.images_seen)

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

    def _check_same_data(self, path: Path) -> None:
        """Refuse to resume on other data: the method trains on ONE fixed noisy copy per image
        for the whole run, and remade shards (another noise seed, say) would swap every copy."""
        saved = self._saved_loader_state  # set by _restore
        diffs = self.loader.data_differences(saved) if saved else []
        if diffs:
            raise ConfigError(
                f"data.shards ({self.cfg.data.shards}) is not the data checkpoint {path} was trained "
                f"on ({saved.get('shards', 'shards of another plan')}): {'; '.join(diffs)}. The "
                "method keeps one fixed noisy copy per image for the whole run, so it cannot "
                "continue on remade shards: resume with the original shards, or start a new run")

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
        self._saved_loader_state = ckpt.state.get("loader")

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

    def generate(self, num_images: int, every_rank: bool = False,
                 net: Optional[torch.nn.Module] = None) -> Optional[torch.Tensor]:
        """Images 0..num_images-1 from the EMA weights with the EDM Heun sampler, on rank 0
        (None elsewhere) or, with every_rank, the same images on every rank. Each image has
        its own seed (sampling.seed, index), so the grid is the same at any batch size;
        class-conditional networks cycle through the classes."""
        if net is None:
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
            settings=sampling.SamplerSettings.for_run(self.cfg),
            autocast_dtype=torch.bfloat16 if bf16 else None, device=self.device)

    def reference_images(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The images trained on (data.subset takes a prefix of the stored order) and the
        held-out images (never trained on), float32 [N, C, H, W] in [-1, 1]."""
        shards = self.cfg.data.shards
        train = data.load_model_images(shards, "train", self.cfg.data.subset)
        if not data.read_manifest(shards).get("heldout"):
            return train, None
        return train, data.load_model_images(shards, "heldout", self.cfg.evaluation.heldout_images)

    def finish(self) -> Optional[dict]:
        """Export the EMA, write samples.png and memorization.json; return the summary
        (on rank 0; the other ranks take part in the collectives and return None)."""
        self.export_ema()
        # The memorization summary splits its feature extraction over the ranks, so every
        # rank needs the samples; they are identical everywhere (per-image seeds).
        net = self.ema_network()  # gathered once (a collective under ZeRO-3)
        images = self.generate(self.cfg.sampling.num_images, every_rank=True, net=net)
        train_images, heldout_images = self.reference_images()
        ev = self.cfg.evaluation
        summary = metrics.memorization_summary(images, train_images, heldout_images, ev,
                                               self.device, progress=self.rank == 0)
        # Always also in pixel space (cheap, and free of a feature extractor's blind spots),
        # and the denoiser attraction of held-out images (no sampling needed).
        if ev.memorization_features != "pixels":
            summary["pixels"] = metrics.memorization_summary(
                images, train_images, heldout_images,
                dataclasses.replace(ev, memorization_features="pixels"), self.device)
        if heldout_images is not None and not self.cfg.text.model_path:  # a pixel denoiser
            summary["attraction"] = metrics.network_attraction(
                net, sampling.SamplerSettings.for_run(self.cfg), heldout_images[:128], train_images,
                metrics.ATTRACTION_SIGMAS, self.device)
        if self.rank != 0:
            return None
        save_image_grid(images, self.run_dir / "samples.png")
        tmp = self.run_dir / ".memorization.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=float))
        os.replace(tmp, self.run_dir / "memorization.json")
        return summary
