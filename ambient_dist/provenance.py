"""What produced a result, complete from any install: the one home of provenance.

    provenance() -> dict        JSON-ready; run.json, samples.json, the benchmarks and the
                                GPU check record it

Keys: `package` and `version` (importlib.metadata: the installed distribution, a wheel or an
editable install; the source's `__version__` when it is not installed), `checkout`,
`git_revision` and `git_dirty` (below), `python`, `platform`, `host`, the versions of `torch`,
`numpy`, `deepspeed` and the other libraries of LIBRARIES (None when not installed; read from
their metadata, so nothing is imported), and `cuda` / `cudnn` (the versions torch was built
with and runs, None on a CPU-only build) with the `gpu` name when one is visible.

The revision is that of the package's OWN checkout only: the package directory must be the
`ambient_dist/` folder at the top level of a git work tree whose pyproject.toml names this
project and where the package's files are tracked. A wheel installed into site-packages has
none (None), even when that virtualenv lives inside some other git repository, whose HEAD
says nothing about this code. `git_dirty` says whether tracked files differ from that
revision (None without a checkout).

This module imports nothing of the project (a low helper).
"""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Optional

# The distribution (pyproject.toml [project] name) and the import package it ships.
PROJECT = "ambient_dist"
PACKAGE_DIR = Path(__file__).resolve().parent

# Libraries whose versions are recorded (distribution names).
LIBRARIES = ("torch", "numpy", "deepspeed", "triton", "nvidia-dali-cuda130", "nvidia-dali-cuda120",
             "webdataset", "safetensors", "diffusers", "transformers")


def library_version(distribution: str) -> Optional[str]:
    """The installed version of `distribution`, or None; read from its metadata, so a slow
    import (deepspeed takes seconds and prints accelerator warnings) never happens here."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_version() -> str:
    """This package's version: the installed distribution's, else the source's __version__."""
    # The package is imported whenever this module is (no import needed: a low helper).
    return library_version(PROJECT) or sys.modules[__package__].__version__


def _git(cwd: Path, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):   # no git, or it hangs on a network mount
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_checkout(package_dir: Optional[Path] = None) -> Optional[Path]:
    """The top level of the git work tree that is this package's own checkout, or None.

    `package_dir` (default: where this module lives) must be `<top>/ambient_dist`, `<top>`'s
    pyproject.toml must name this project, and the package must be tracked there."""
    package_dir = Path(package_dir or PACKAGE_DIR).resolve()
    top = _git(package_dir, "rev-parse", "--show-toplevel")
    if not top:
        return None
    top_dir = Path(top).resolve()
    if package_dir != top_dir / package_dir.name:
        return None   # e.g. site-packages/ambient_dist of a virtualenv inside another repository
    try:
        name = tomllib.loads((top_dir / "pyproject.toml").read_text())["project"]["name"]
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        return None
    if name != PROJECT:
        return None
    tracked = _git(top_dir, "ls-files", "--", f"{package_dir.name}/__init__.py")
    return top_dir if tracked else None


def source_revision(package_dir: Optional[Path] = None) -> tuple[Optional[Path], Optional[str], Optional[bool]]:
    """(checkout, revision, dirty) of the package's own checkout; (None, None, None) without one."""
    top = source_checkout(package_dir)
    if top is None:
        return None, None, None
    revision = _git(top, "rev-parse", "HEAD")
    status = _git(top, "status", "--porcelain", "--untracked-files=no")
    return top, revision, (None if status is None else bool(status))


def _accelerator() -> dict:
    """CUDA / cuDNN versions and the GPU name, from torch when it is already imported (the
    commands that record provenance have imported it; this never imports it for them)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return {"cuda": None, "cudnn": None, "gpu": None}
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cuda": torch.version.cuda, "cudnn": cudnn, "gpu": gpu}


def provenance(package_dir: Optional[Path] = None) -> dict:
    """Everything above as one JSON-ready dict (see the module docstring for the keys)."""
    checkout, revision, dirty = source_revision(package_dir)
    info = {"package": PROJECT, "version": package_version(),
            "checkout": None if checkout is None else str(checkout),
            "git_revision": revision, "git_dirty": dirty,
            "python": platform.python_version(), "platform": platform.platform(),
            "host": platform.node()}
    info.update({name: library_version(name) for name in LIBRARIES})
    info.update(_accelerator())
    return info
