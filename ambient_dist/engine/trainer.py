"""The training loop: one class, read top to bottom (EDM's training_loop, in the same order).

`Trainer` holds only the loop, the EMA, the learning-rate schedule, the stop flag and the
checkpoint cadence. It is given two parts:

- a Task (engine/task.py): what is trained -- the network, the loss of one micro-batch, the
  loader, and how EMA weights become samples (ImageTask, or text.task.TextTask);
- a Backend (engine/backend.py): how a step runs -- backward, the optimizer step, the weights
  the EMA averages, gathering them, and the checkpoint format (PlainBackend, DeepSpeedBackend).

Every step draws the global batch (in micro-batches when accumulating), computes the loss, lets
the backend step, and updates the EMA. Progress is counted in images, so schedules, intervals
and resume points do not depend on the batch size. Resume is exact: model, EMA, optimizer, RNG
states and the loader position are restored (the RNG states after the loader is started; no
loader draws from them), so on CPU a resumed run produces bit for bit the losses and weights of
an uninterrupted one, with any loader and worker count. engine/run.py builds the parts and
does the end-of-run work.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Optional

import torch

from ambient_dist.config import ConfigError, ExperimentConfig, to_dict
from ambient_dist.distributed import DistInfo, any_rank_true, sum_over_ranks
from ambient_dist.engine.backend import Backend, TrainingState, read_meta
from ambient_dist.engine.checkpoint import (CheckpointManager, check_resume_compatible,
                                            export_safetensors_atomic)
from ambient_dist.engine.ema import EMA, ema_beta
from ambient_dist.engine.logging import RunLogger, TrainingStats
from ambient_dist.engine.lr import learning_rate, set_learning_rate
from ambient_dist.engine.power_ema import PowerEMA
from ambient_dist.engine.task import Task
from ambient_dist.images import save_image_grid

# A run stops (with a message) after this many optimizer steps in a row were skipped for a
# non-finite loss or gradient: one bad batch is noise, a long streak is a diverged run.
MAX_BAD_STEPS_IN_A_ROW = 50


class StopFlag:
    """SIGINT (Ctrl-C), SIGTERM (kill, docker stop), SIGUSR1 and SIGUSR2 (a scheduler's
    preemption or time limit: SLURM's --signal, submitit's USR2) ask the loop to checkpoint
    and exit cleanly (exit status 0, `continue with --resume auto`). Repeated signals are
    harmless: they only set the flag again (a study forwards its signal to the trainer, which
    may also have received it directly). To stop without a checkpoint, SIGKILL."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

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


class Trainer:
    def __init__(self, cfg: ExperimentConfig, run_dir: str | os.PathLike, task: Task,
                 backend: Backend, dist_info: DistInfo, resume_from: Optional[Path] = None):
        self.cfg, self.run_dir, self.task, self.backend = cfg, Path(run_dir), task, backend
        self.dist, self.device, self.rank = dist_info, dist_info.device, dist_info.rank
        t = cfg.train
        self.accumulation = cfg.accumulation_steps(dist_info.world_size)
        self.memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = t.cudnn_benchmark

        # The network (the same initial weights on every rank), handed to the backend.
        torch.manual_seed(t.seed)
        net = task.build_network().to(self.device, memory_format=self.memory_format).train()
        self.num_parameters = sum(p.numel() for p in net.parameters())
        backend.setup(net)
        self.ema = EMA(backend.ema_weights())
        # ema.kind=power: EDM2's power-function EMAs, the first of which is self.ema.
        self.power_ema = PowerEMA.for_config(cfg, self.ema, backend.ema_weights())
        # sigma and eps come from their own generator (saved with the checkpoint); dropout
        # uses the global RNG (also saved). Each rank draws different noise.
        self.noise_generator = torch.Generator(self.device).manual_seed(t.seed + 1 + self.rank)
        # Rank 0's process id names the staging directory of every rank's checkpoint files.
        owner = sum_over_ranks(torch.tensor([os.getpid() if self.rank == 0 else 0], dtype=torch.int64))
        self.checkpoints = CheckpointManager(self.run_dir, t.keep_checkpoints, owner=int(owner.item()))
        self.images_seen = self.steps = self.bad_steps = self.bad_in_a_row = 0
        self.final_weights: Optional[dict[str, torch.Tensor]] = None  # set by train() at its end

        saved = self._restore(resume_from) if resume_from is not None else None
        self.loader = task.build_loader(self.rank, dist_info.world_size, self.images_seen)
        if saved is not None:
            self._check_same_data(saved.loader, resume_from)
        self.batches = iter(self.loader)
        if saved is not None:
            # The RNG states last, once the loader is built and started: whatever that draws
            # (no loader of ours draws from the global RNG) a fresh run drew before its first
            # step too, so the resumed run continues from exactly the saved states.
            self._set_rng_states(saved.rng)
        self.stats = TrainingStats()

    # -- one optimizer step ------------------------------------------------------------
    def train_step(self) -> torch.Tensor:
        """One step over the global batch; returns this rank's mean loss (a device scalar)."""
        set_learning_rate(self.backend.optimizer, learning_rate(self.cfg.optimizer, self.images_seen))
        step_loss = torch.zeros((), device=self.device)
        for _ in range(self.accumulation):
            batch = next(self.batches).to(self.memory_format)
            with self.backend.autocast():
                out = self.task.loss(self.backend.module, batch, self.noise_generator,
                                     backward_scale=1.0 / self.accumulation)
            self.backend.backward(out.loss)
            step_loss += out.loss.detach() / self.accumulation
            self.stats.add_batch(out.per_sample, out.ambient, out.sigma)

        applied, grad_norm = self.backend.step(step_loss)
        t = self.cfg.train
        if self.power_ema is not None:
            # Every step, applied or skipped: the profiles weigh each step's span of images,
            # and over a skipped step the weights are the previous step's.
            self.power_ema.update(self.backend.ema_weights(), self.images_seen + t.batch, t.batch)
        if applied:
            if self.power_ema is None:
                self.ema.update(self.backend.ema_weights(),
                                ema_beta(self.images_seen, t.batch, t.ema_halflife_kimg, t.ema_rampup_ratio))
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
        # Steps are whole batches: the run ends at the first multiple of the batch past total.
        last = self.images_seen + max(0, -(-(total - self.images_seen) // t.batch)) * t.batch
        logger = RunLogger(self.run_dir, last, self.images_seen, enabled=self.rank == 0)
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
                    self._publish_pictures(logger)
                    logger.progress(self.images_seen, None)
                    if self._crossed(t.log_every_kimg) or self.images_seen >= total:
                        scalars, sigmas = self.stats.summary()  # collective
                        logger.progress(self.images_seen, scalars.get("loss/all", loss.item()))
                        logger.log(self.images_seen, scalars, sigmas,
                                   lr=self.backend.optimizer.param_groups[0]["lr"])
                    if self._crossed(t.sample_every_kimg) and self.images_seen < total:
                        grid = self.sample_grid(min(16, self.cfg.sampling.num_images))
                        if grid is not None:
                            logger.image("samples", grid, self.images_seen)
                    # A snapshot before the checkpoint of the same step: a crash between the
                    # two resumes from an earlier checkpoint, which writes it again.
                    if self.power_ema is not None and (self._crossed(self.cfg.ema.snapshot_every_kimg)
                                                       or self.images_seen >= total):
                        self.save_snapshot()
                    if self._crossed(t.checkpoint_every_kimg) and self.images_seen < total:
                        self.save_checkpoint()
                        saved_at = self.images_seen
                if saved_at != self.images_seen:
                    # The last checkpoint: its gathered EMA is kept for the end of the run
                    # (engine.run.finish), which then need not gather it a second time.
                    self.final_weights = self.save_checkpoint()
                if stop.requested:
                    logger.write(f"{stop.requested}: checkpoint saved at {self.images_seen} images "
                                 f"in {self.checkpoints.latest()}; continue with --resume auto")
                    return False
        finally:
            logger.close()
        return True

    def _publish_pictures(self, logger: RunLogger) -> None:
        """<name>.png in the run directory and a TensorBoard image, for what the task shows."""
        for name, images in self.task.pictures().items():
            if self.rank == 0:
                save_image_grid(images, self.run_dir / f"{name}.png")
                logger.image(name, images, self.images_seen)

    # -- the EMA as a whole model --------------------------------------------------------
    def ema_weights_full(self) -> dict[str, torch.Tensor]:
        """The whole model's EMA weights under the network's own keys (a collective: under
        ZeRO each rank holds a slice). Gather once and pass it to every consumer."""
        return self.backend.full_weights(self.ema.state_dict())

    def sample_grid(self, num_images: int) -> Optional[torch.Tensor]:
        """A few samples of the EMA network on rank 0 (None elsewhere), for TensorBoard."""
        weights = self.ema_weights_full()
        if self.rank != 0:
            return None
        # A picture must not change the run: building the sampling network draws its initial
        # weights from the global RNG, which the run's dropout uses and a checkpoint saves, and
        # a run stopped at this step (its last step draws no grid) would resume off the
        # uninterrupted run's states.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return self.task.generate(self.task.sampling_network(weights), num_images)

    def export_ema(self) -> dict[str, torch.Tensor]:
        """<run_dir>/ema.safetensors, what sampling and evaluation load (rank 0 writes it; a
        collective). Returns the whole EMA weights it exported."""
        weights = self.ema_weights_full()
        if self.rank == 0:
            export_safetensors_atomic(weights, self.run_dir / "ema.safetensors", metadata={
                "images_seen": str(self.images_seen), "fingerprint": self.cfg.fingerprint()})
        return weights

    # -- checkpoints -------------------------------------------------------------------
    def save_checkpoint(self) -> dict[str, torch.Tensor]:
        """A checkpoint (the backend's format), then ema.safetensors refreshed from the same
        EMA; returns the whole EMA weights (gathered: a collective)."""
        state = TrainingState(ema=self.ema.state_dict(), rng=self._rng_states(),
                              loader=self.loader.state_dict(), meta=self._meta(),
                              power_ema=self.power_ema.state_dict() if self.power_ema else {})
        self.backend.save(self.checkpoints, self.images_seen, state)
        return self.export_ema()

    def save_snapshot(self) -> Path:
        """A power-EMA snapshot at the current step (a collective; ambient_dist.posthoc_ema)."""
        return self.power_ema.save_snapshot(self.run_dir, self.images_seen, self.cfg.train.batch,
                                            self.dist, self.backend.ema_layout(),
                                            self.cfg.fingerprint())

    def _restore(self, path: Path) -> TrainingState:
        """Continue from checkpoint `path` (model, optimizer, EMA, counters); returns what it
        saved, whose RNG states `_set_rng_states` applies once the loader is started."""
        meta = read_meta(path)
        check_resume_compatible(meta["config"], self.cfg, path)
        if meta["world_size"] != self.dist.world_size:
            raise ConfigError(f"checkpoint {path} was written by {meta['world_size']} ranks; this "
                              f"run has {self.dist.world_size}. Resume at the same world size (the "
                              "per-rank optimizer partitions and data positions depend on it).")
        state = self.backend.load(path)
        self.ema.load_state_dict(state.ema)
        if self.power_ema is not None:
            self.power_ema.load_state_dict(state.power_ema)
        self.images_seen = meta["images_seen"]
        self.steps, self.bad_steps = meta["steps"], meta["bad_steps"]
        return state

    def _set_rng_states(self, rng: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(rng["torch"])
        self.noise_generator.set_state(rng["noise"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _check_same_data(self, saved: Optional[dict], path: Path) -> None:
        """Refuse to resume on other data: the method trains on ONE fixed noisy copy per image
        for the whole run, and remade shards (another noise seed, say) would swap every copy."""
        diffs = self.loader.data_differences(saved) if saved else []
        if diffs:
            raise ConfigError(
                f"data.shards ({self.cfg.data.shards}) is not the data checkpoint {path} was trained "
                f"on ({saved.get('shards', 'shards of another plan')}): {'; '.join(diffs)}. The "
                "method keeps one fixed noisy copy per image for the whole run, so it cannot "
                "continue on remade shards: resume with the original shards, or start a new run")

    def _rng_states(self) -> dict[str, torch.Tensor]:
        states = {"torch": torch.get_rng_state(), "noise": self.noise_generator.get_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def _meta(self) -> dict:
        return {"images_seen": self.images_seen, "steps": self.steps, "bad_steps": self.bad_steps,
                "world_size": self.dist.world_size, "fingerprint": self.cfg.fingerprint(),
                "config": to_dict(self.cfg),
                # the data trained on, readable without state.pt (ambient-evaluate checks it)
                "data": self.loader.state_dict()}
