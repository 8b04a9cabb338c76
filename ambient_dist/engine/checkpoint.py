"""Training checkpoints, written so that a crash at any moment never loses the previous one.

Layout inside a run directory:

    checkpoints/
        ckpt-000012800/          one checkpoint, named by images seen (zero-padded, sortable)
            model.safetensors    network weights
            ema.safetensors      EMA weights
            rng.safetensors      RNG states (uint8 tensors)
            state.pt             everything else: optimizer state, loader position, ...
                                 (torch.save; read back with torch.load(weights_only=True))
            meta.json            images seen, step, config fingerprint, counters
        latest                   text file naming the newest complete checkpoint

A save goes to a hidden temporary directory first, which is renamed into place only once
every file is written and flushed; `latest` is replaced (temp file + os.replace) after that,
and old checkpoints are pruned last. A crash mid-save therefore leaves at worst a stray
`.tmp-*` directory, which the next save removes, and `latest` still names a complete one.
With several ranks, one process stages, all write, and one publishes (`stage`/`publish`).
The staging directory's name holds the writer's `owner` token (the process id of the run's
rank 0, the same on every rank of one launch): two writers never share one, and a save never
deletes another process's staging directory but a stray one, left when its writer died (the
run directory is locked by its one owner while it trains: ambient_dist.locking).

`check_resume_compatible` refuses to continue a checkpoint under options that would change
its trajectory (anything but the run length, intervals and reporting options).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from ambient_dist.config import PATH_OPTIONS, ConfigError, ExperimentConfig, flatten_options, to_dict
from ambient_dist.fileio import atomic_path, atomic_write_text, set_default_permissions

CHECKPOINT_DIR = "checkpoints"

# Options that may differ between a checkpoint and the config resuming it: they change how
# long the run goes or what it reports, never the trajectory of the weights.
RESUMABLE_CHANGES = ("name", "description", "train.total_kimg", "train.log_every_kimg",
                     "train.checkpoint_every_kimg", "train.sample_every_kimg",
                     "train.keep_checkpoints", "train.run_root", "data.shards", "data.loader",
                     "data.workers", "sampling.", "evaluation.", "distributed.timeout_s",
                     "train.cudnn_benchmark",
                     # when power-EMA snapshots are taken, not what they average
                     "ema.snapshot_every_kimg",
                     # follows from text.model_path (validated), and older checkpoints lack it
                     "task")
_NAME = re.compile(r"^ckpt-(\d+)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not every platform can open a directory; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path,
                 metadata: Optional[dict[str, str]] = None) -> None:
    """safetensors needs contiguous, CPU, non-aliased tensors: give it exactly that (and the
    file the usual permissions, not safetensors' 0600)."""
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
              str(path), metadata=metadata)
    set_default_permissions(path)


def export_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path,
                              metadata: Optional[dict[str, str]] = None) -> None:
    """Write one safetensors file (e.g. the EMA export) via a temp file and os.replace."""
    with atomic_path(path) as tmp:
        save_tensors(tensors, tmp, metadata)


@dataclass
class Checkpoint:
    """What a checkpoint holds. Tensor dicts go to safetensors; `state` to torch.save."""
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    state: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


class CheckpointManager:
    def __init__(self, run_dir: str | os.PathLike, keep: int, owner: Optional[int] = None):
        """owner: the token in the staging directory's name (default this process's id; a
        multi-rank run passes rank 0's, so that every rank writes into one directory)."""
        self.root = Path(run_dir) / CHECKPOINT_DIR
        self.keep = keep
        self.owner = os.getpid() if owner is None else int(owner)

    # -- writing ----------------------------------------------------------------------
    def staging_path(self, images_seen: int) -> Path:
        """Where a checkpoint is written before it is published (the same name on every rank
        of one launch, never the same for two launches: see `owner`)."""
        return self.root / f".tmp-{self.owner}-{self.name(images_seen)}"

    @staticmethod
    def name(images_seen: int) -> str:
        return f"ckpt-{images_seen:012d}"

    def stage(self, images_seen: int) -> Path:
        """Create an empty staging directory (one process does this; then all may write)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.staging_path(images_seen)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def publish(self, images_seen: int) -> Path:
        """Make the staged checkpoint durable, rename it into place, then point `latest` at it."""
        tmp, name = self.staging_path(images_seen), self.name(images_seen)
        final = self.root / name
        for f in tmp.rglob("*"):  # make the contents durable before the rename publishes them
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():  # re-saving the same position (e.g. preemption right after a save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        atomic_write_text(self.root / "latest", name + "\n")
        self._prune(keep_name=name)
        return final

    def save(self, ckpt: Checkpoint, images_seen: int) -> Path:
        tmp = self.stage(images_seen)
        save_tensors(ckpt.model, tmp / "model.safetensors")
        save_tensors(ckpt.ema, tmp / "ema.safetensors")
        save_tensors(ckpt.rng, tmp / "rng.safetensors")
        torch.save(ckpt.state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(ckpt.meta, indent=2, sort_keys=True))
        return self.publish(images_seen)

    def _prune(self, keep_name: str) -> None:
        # Staging directories of other owners are strays of writers that died (this one owns
        # the locked run directory); those of this owner were published or abandoned.
        for stray in self.root.glob(".tmp-*"):
            if stray.is_dir():
                shutil.rmtree(stray, ignore_errors=True)
        done = self.list()
        for old in done[:-self.keep]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)

    # -- reading ----------------------------------------------------------------------
    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name)]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))

    def latest(self) -> Optional[Path]:
        pointer = self.root / "latest"
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if path.is_dir():
                return path
        done = self.list()  # `latest` missing (e.g. crash before its first write)
        return done[-1] if done else None

    @staticmethod
    def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
        path = Path(path)
        for part in ("model.safetensors", "ema.safetensors", "rng.safetensors", "state.pt",
                     "meta.json"):
            if not (path / part).is_file():
                raise FileNotFoundError(f"checkpoint {path}: missing {part} (not a complete "
                                        "checkpoint written by ambient_dist)")
        return Checkpoint(
            model=load_file(str(path / "model.safetensors"), device=str(device)),
            ema=load_file(str(path / "ema.safetensors"), device=str(device)),
            rng=load_file(str(path / "rng.safetensors")),
            # weights_only: never unpickle arbitrary objects, even from our own run dirs.
            state=torch.load(path / "state.pt", map_location=device, weights_only=True),
            meta=json.loads((path / "meta.json").read_text()),
        )


def check_resume_compatible(saved: dict, cfg: ExperimentConfig, checkpoint: Path) -> None:
    """Refuse to continue a checkpoint under options that would change its trajectory.

    An option the checkpoint does not mention was added to the schema after it was written;
    the run had none, which is what the option's default means (e.g. augment.p = 0)."""
    old = {**flatten_options(to_dict(ExperimentConfig())), **flatten_options(saved)}
    new = flatten_options(to_dict(cfg))
    # Runs save their paths absolute; a checkpoint written before that holds them as typed,
    # relative to the directory it was trained from (taken to be this one).
    for k in PATH_OPTIONS:
        for side in (old, new):
            if side.get(k):
                side[k] = os.path.normpath(os.path.abspath(side[k]))
    changed = [k for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES)]
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise ConfigError(f"checkpoint {checkpoint} was trained with different options ({details}); "
                          "resume with the run's own config.yaml or start a new run directory")
