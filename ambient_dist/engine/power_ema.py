"""The training side of EDM2's power-function EMA (`ema.kind: power`; docs/ema.md).

`PowerEMA` keeps one float32 average per `ema.sigma_rels` value of the tensors the backend
hands the EMA (the whole model, or this rank's slice of the fp32 master weights under ZeRO
1-3, exactly as the classic EMA does: engine/backend.py). Its first profile *is* the
Trainer's `ema` (what ema.safetensors, the sample grids and the end-of-run summary use); the
others are checkpointed beside it (TrainingState.power_ema), so a resume continues every
profile exactly. The update after a step ending at t images is
ema <- beta ema + (1 - beta) live with beta = (1 - batch / t)^(gamma + 1)
(ambient_dist.posthoc_ema.power_beta). It runs after every step, also one skipped for a
non-finite gradient (whose weights are then the previous step's): the profile weighs every
span of images, so skipping an update would misweigh the span (the classic EMA, which has no
such accounting, skips it).

`save_snapshot` writes RUN_DIR/ema-snapshots/snapshot-<images>/ (the format is described and
read in ambient_dist.posthoc_ema): each rank its own slices, then rank 0 meta.json, which
completes the snapshot. It is a collective. The Trainer snapshots before it checkpoints at the
same step, so a crash at any moment either leaves the snapshot complete or resumes from an
earlier checkpoint and writes it again, with the same bytes (resume is exact).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch

from ambient_dist.config import ExperimentConfig
from ambient_dist.distributed import DistInfo, barrier
from ambient_dist.engine.ema import EMA
from ambient_dist.posthoc_ema import (SNAPSHOT_DIR, gamma_from_sigma_rel, power_beta, snapshot_name,
                                      write_snapshot_meta, write_snapshot_part)


class PowerEMA:
    """Power-function EMAs of the same tensors, one per sigma_rel; `profiles[0]` is `main`."""

    def __init__(self, main: EMA, live: Mapping[str, torch.Tensor], sigma_rels: list[float]):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [gamma_from_sigma_rel(s) for s in self.sigma_rels]
        self.profiles = [main] + [EMA(live) for _ in self.sigma_rels[1:]]

    @classmethod
    def for_config(cls, cfg: ExperimentConfig, main: EMA,
                   live: Mapping[str, torch.Tensor]) -> Optional["PowerEMA"]:
        """The power EMA that `ema.kind: power` asks for (None for the classic EMA)."""
        return cls(main, live, cfg.ema.sigma_rels) if cfg.ema.kind == "power" else None

    @torch.no_grad()
    def update(self, live: Mapping[str, torch.Tensor], images_after: int, batch: int) -> None:
        """Every profile after a step of `batch` images that ended at `images_after` images."""
        for gamma, ema in zip(self.gammas, self.profiles):
            ema.update(live, power_beta(gamma, images_after, batch))

    # The first profile is checkpointed as the Trainer's `ema`; these are the others.
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{j}/{name}": t for j, ema in enumerate(self.profiles[1:], 1)
                for name, t in ema.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for j, ema in enumerate(self.profiles[1:], 1):
            prefix = f"{j}/"
            mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not mine:
                raise KeyError(f"the checkpoint holds no power-EMA profile {j} "
                               f"(sigma_rel {self.sigma_rels[j]}); was it trained with ema.kind=power?")
            ema.load_state_dict(mine)

    def save_snapshot(self, run_dir: Path, images_seen: int, batch: int, dist: DistInfo,
                      layout: Mapping[str, tuple], fingerprint: str) -> Path:
        """RUN_DIR/ema-snapshots/snapshot-<images>/ (a collective: every rank writes its part)."""
        path = Path(run_dir) / SNAPSHOT_DIR / snapshot_name(images_seen)
        write_snapshot_part(path, dist.rank, [ema.state_dict() for ema in self.profiles], layout)
        barrier(dist)
        if dist.rank == 0:
            write_snapshot_meta(path, {"images_seen": images_seen, "batch": batch,
                                       "sigma_rels": self.sigma_rels, "gammas": self.gammas,
                                       "world_size": dist.world_size, "fingerprint": fingerprint})
        barrier(dist)
        return path
