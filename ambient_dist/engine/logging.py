"""What a training run reports while it runs: TensorBoard events and a progress line.

`TrainingStats` accumulates per-step figures between two log points (loss per branch, the
fraction of samples in the ambient branch, sigma values, gradient norms); `RunLogger` writes
them to TensorBoard event files in the run directory and drives a tqdm progress line in images with
images/s and the ETA. Only rank 0 writes anything; on other ranks every call is a no-op.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from ambient_dist.distributed import sum_over_ranks
from ambient_dist.images import image_grid
from ambient_dist.progress import progress


class TrainingStats:
    """Per-step figures of one logging interval; `summary()` returns the means and resets.

    Tensors are kept on their device and only reduced in `summary()`, so logging adds no
    host-device synchronisation to the training step. With several ranks `summary()` is a
    collective (every rank calls it at the same step): the losses per branch and the ambient
    fraction are over the whole global batch, not rank 0's share of it. The gradient norm and
    skipped steps are global already; the sigma histogram is rank 0's draws (a sample of the
    same distribution).
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.ambient: list[torch.Tensor] = []
        self.sigmas: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        self.skipped_steps = 0

    def add_batch(self, per_sample: torch.Tensor, ambient: torch.Tensor, sigma: torch.Tensor) -> None:
        self.losses.append(per_sample.detach().float().flatten())
        self.ambient.append(ambient.detach().bool().flatten())
        self.sigmas.append(sigma.detach().float().flatten())

    def add_step(self, grad_norm: Optional[torch.Tensor], skipped: bool) -> None:
        if skipped:
            self.skipped_steps += 1
        elif grad_norm is not None:
            self.grad_norms.append(grad_norm.detach().float().reshape(()))

    @torch.no_grad()
    def summary(self) -> tuple[dict[str, float], Optional[torch.Tensor]]:
        """(scalars, this rank's sigmas of the interval) -- then start a new interval."""
        out: dict[str, float] = {"train/skipped_steps": float(self.skipped_steps)}
        sigmas = None
        if self.losses:
            loss = torch.cat(self.losses)
            ambient = torch.cat(self.ambient)
            sigmas = torch.cat(self.sigmas).cpu()
            amb = ambient.to(loss.dtype)
            # (sum, count) of all / clean / ambient samples: one small all-reduce.
            totals = sum_over_ranks(torch.stack([
                loss.sum(), torch.tensor(float(loss.numel()), device=loss.device),
                (loss * (1 - amb)).sum(), (1 - amb).sum(), (loss * amb).sum(), amb.sum()]).double())
            total, n, clean, n_clean, amb_sum, n_amb = totals.tolist()
            out["loss/all"] = total / n
            out["objective/ambient_fraction"] = n_amb / n
            if n_clean:
                out["loss/clean"] = clean / n_clean
            if n_amb:
                out["loss/ambient"] = amb_sum / n_amb
        if self.grad_norms:
            out["train/grad_norm"] = torch.stack(self.grad_norms).mean().item()
        self.reset()
        return out, sigmas


class RunLogger:
    def __init__(self, run_dir: str | Path, total_images: int, start_images: int,
                 enabled: bool = True):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # import late: slow, rank 0 only
        self.writer = SummaryWriter(log_dir=str(run_dir))
        self.bar = progress(total=total_images, initial=start_images, unit="img", unit_scale=True,
                            dynamic_ncols=True, desc="train", smoothing=0.1)
        self._mark_time = time.perf_counter()
        self._mark_images = start_images

    def progress(self, images_seen: int, loss: Optional[float]) -> None:
        if not self.enabled:
            return
        self.bar.update(images_seen - self.bar.n)
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def log(self, images_seen: int, scalars: dict[str, float], sigmas: Optional[torch.Tensor] = None,
            lr: Optional[float] = None) -> dict[str, float]:
        """Write one interval's scalars (x axis: images seen) and return them with images/s."""
        if not self.enabled:
            return scalars
        now = time.perf_counter()
        elapsed = now - self._mark_time
        if elapsed > 0 and images_seen > self._mark_images:
            scalars["perf/images_per_s"] = (images_seen - self._mark_images) / elapsed
        self._mark_time, self._mark_images = now, images_seen
        if lr is not None:
            scalars["train/lr"] = lr
        if torch.cuda.is_available():
            scalars["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:  # CPU runs: the process's peak resident memory (Linux reports KiB)
            scalars["perf/peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, images_seen)
        if sigmas is not None and sigmas.numel():
            # log(sigma): the log-normal draw is then a bell curve, and sigma_tn a vertical cut.
            self.writer.add_histogram("objective/log_sigma", sigmas.log(), images_seen)
        self.writer.flush()
        return scalars

    def image(self, name: str, images: torch.Tensor, images_seen: int) -> None:
        if self.enabled:
            self.writer.add_image(name, image_grid(images), images_seen, dataformats="HWC")

    def write(self, message: str) -> None:
        """Print without breaking the progress bar (rank 0 only)."""
        if self.enabled:
            tqdm.write(message)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
