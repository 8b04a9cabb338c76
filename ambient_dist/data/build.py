"""The loader factory: `build_loader(cfg, rank, world_size, device, start_sample=0)`.

Opens the shard directory named by `cfg.data.shards`, verifies it and checks its manifest
against the config (in `loader.TrainLoader`), and returns the loader chosen by
`cfg.data.loader` ("resident", "webdataset" or "dali"). Kept apart from loader.py, which the
three loaders import, so that no module of data/ imports one that imports it back; the DALI
loader is imported only when chosen (it needs nvidia-dali).
"""
from __future__ import annotations

from ambient_dist.config import ExperimentConfig

from .loader import TrainLoader
from .resident import ResidentLoader
from .shards import ShardError
from .webdataset_loader import WebDatasetLoader


def build_loader(cfg: ExperimentConfig, rank: int, world_size: int, device,
                 start_sample: int = 0) -> TrainLoader:
    """The loader named by cfg.data.loader for this rank (see the module docstring)."""
    if not cfg.data.shards:
        raise ShardError("data.shards: no shard directory set (make one with ambient-make-shards)")
    kind = cfg.data.loader
    if kind == "resident":
        cls = ResidentLoader
    elif kind == "webdataset":
        cls = WebDatasetLoader
    elif kind == "dali":
        from .dali_loader import DaliLoader as cls  # needs nvidia-dali: imported when chosen
    else:
        raise ShardError(f"data.loader: unknown loader {kind!r}")
    return cls(cfg, rank, world_size, device, start_sample=start_sample)
