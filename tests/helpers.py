"""Plain helper functions shared by several test files (fixtures live in tests/conftest.py).

Importable as `helpers` because pytest puts tests/ on sys.path; spawned worker processes
inherit that path, so functions used there may come from here too.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ambient_dist.config import save_config
from ambient_dist.data import make_shards, open_source
from ambient_dist.models import build_network

ROOT = Path(__file__).resolve().parent.parent


def load_launcher(name: str):
    """Import launchers/<name>.py as a module (launchers/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"launcher_{name}", ROOT / "launchers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def perturb(net: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Give zero/near-zero-initialised layers real weights, so the network output is not ~0.

    EDM initialises the last layer to zero, which would make D = c_skip x at init.
    """
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


def write_toy_run(cfg, run: Path, seed: int) -> Path:
    """A run directory as training leaves it (config + EMA weights) for a seeded, perturbed
    network built from `cfg`, without training: enough for the sampling/evaluation launchers."""
    save_config(cfg, run)
    torch.manual_seed(seed)
    net = perturb(build_network(cfg))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(run / "ema.safetensors"))
    return run


def random_grey_shards(root: Path, count: int, side: int, opts) -> Path:
    """`count` random side x side grey images (seed 0) saved as root/source.npz and made into
    shards under root/shards with the ShardOptions `opts`; returns the shard directory."""
    images = (np.random.default_rng(0).random((count, side, side)) * 255).astype(np.uint8)
    np.savez(root / "source.npz", images=images)
    make_shards(open_source(str(root / "source.npz")), root / "shards", opts, progress=False)
    return root / "shards"
