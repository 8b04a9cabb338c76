"""Power-function EMA profiles and their post-hoc reconstruction (EDM2, Karras et al. 2024,
"Analyzing and Improving the Training Dynamics of Diffusion Models", section 3.1, appendix C).

The maths, written from the paper:

- A power-function EMA at time t (counted in training images) averages the weights theta(tau)
  of every earlier time tau with the density  p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)
  on [0, t]. Its width relative to t is  sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)),
  so gamma is the largest real root of the cubic  gamma^3 + 7 gamma^2 + (16 - s) gamma + 12 - s
  with s = sigma_rel^-2 (`gamma_from_sigma_rel`). sigma_rel < 1/sqrt(12) = 0.2887 (gamma > 0).
- Tracked during training by  ema <- beta ema + (1 - beta) theta  with
  beta = (1 - batch / t)^(gamma + 1), t the images seen after the step (`power_beta`). The
  product of the betas telescopes: step k (ending at t_k) weighs exactly
  (t_k^(gamma+1) - t_{k-1}^(gamma+1)) / t^(gamma+1), the integral of p_t over the step. So the
  tracked EMA *is* the continuous profile applied to the piecewise-constant weights: the
  profiles below describe the discrete averages exactly, not approximately.
- Two profiles' L2 inner product has a closed form (`profile_inner`). A snapshot i (time t_i,
  exponent gamma_i) is the average of theta under p_i; any requested profile q at time T is
  approximated by sum_i x_i p_i with x the least-squares solution of  A x = b,
  A_ij = <p_i, p_j>, b_i = <p_i, q>; the coefficients are normalised to sum to one (an average
  of averages). The same x applied to the snapshots' weights gives the reconstructed EMA.
  `fit_error` is the relative L2 distance ||sum_i x_i p_i - q|| / ||q|| of the profiles.

Snapshots (written by engine/power_ema.py while training, read here):

    RUN_DIR/ema-snapshots/
        snapshot-000000004096/          one per ema.snapshot_every_kimg, named by images seen
            rank00000.safetensors       this rank's tensors of every tracked profile, keyed
                                        "<j>/<name>" (j: index into ema.sigma_rels); under
                                        ZeRO 1-3 the parameters are this rank's flat slice of
                                        the fp32 masters (where: the "layout" metadata, JSON
                                        {name: [full shape, start, numel]}); names without a
                                        layout entry are whole tensors, written by rank 0 only
            rank00001.safetensors       ...
            meta.json                   images_seen, batch, sigma_rels, gammas, world_size,
                                        fingerprint; written by rank 0 last: the snapshot is
                                        complete when meta.json exists

Every file is written by temp file + rename (ambient_dist.fileio); a snapshot is assembled
from its slices only here, when a profile is reconstructed. `reconstruct(run_dir, sigma_rels,
at_kimg)` is the library function (ambient-posthoc-ema and the study call it); it writes
RUN_DIR/posthoc/ema-<sigma_rel>.safetensors (the layout of ema.safetensors) and a JSON beside
it with the fit, and returns {sigma_rel: (path, fit_error)}.

This module imports only torch, numpy, safetensors and the low helpers (errors, fileio): the
sampling and evaluation side may use it without importing the training engine.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np
import torch

from ambient_dist.errors import UserError
from ambient_dist.fileio import atomic_path, atomic_write_json, set_default_permissions

SNAPSHOT_DIR = "ema-snapshots"
POSTHOC_DIR = "posthoc"
SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)  # gamma -> 0: the uniform average of the whole run
_SNAPSHOT = re.compile(r"^snapshot-(\d+)$")


class PosthocEMAError(UserError):
    """No snapshots, a sigma_rel out of range, a time with no snapshot; names what and where."""


# --------------------------------------------------------------------------------------
# The profiles
# --------------------------------------------------------------------------------------

def sigma_rel_from_gamma(gamma: float) -> float:
    """Relative standard deviation of the power-function profile with exponent gamma."""
    g = float(gamma)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def check_sigma_rel(sigma_rel: float, what: str = "sigma_rel") -> float:
    """sigma_rel as a float, or PosthocEMAError naming `what` if it is not in (0, 0.2887)."""
    s = float(sigma_rel)
    if not 0 < s < SIGMA_REL_MAX:
        raise PosthocEMAError(f"{what} {sigma_rel}: must be in (0, {SIGMA_REL_MAX:.4f}) (the EMA's "
                              "width relative to the training time; EDM2 tracks 0.05 and 0.10)")
    return s


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma > 0 whose profile has this sigma_rel (the cubic's largest real root)."""
    s = check_sigma_rel(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_beta(gamma: float, images_after: int, batch: int) -> float:
    """Decay of one update of the power-function EMA after a step of `batch` images that ends
    at `images_after` images: (1 - batch / images_after)^(gamma + 1) (0 at the first step)."""
    return (1.0 - batch / images_after) ** (gamma + 1.0)


def profile_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_a, p_b> = integral over tau of the two profiles' product, in closed form (numpy,
    broadcast; float64). Times in images. With m = min(t_a, t_b):
    (a+1)(b+1) m^(a+b+1) / ((a+b+1) t_a^(a+1) t_b^(b+1)), written in ratios for range."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    lo, hi = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    g_hi = np.where(t_a >= t_b, g_a, g_b)  # the exponent of the later profile
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * hi) * (lo / hi) ** g_hi


def solve_coefficients(snap_t, snap_gamma, target_t, target_gamma) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coefficients of the snapshot profiles for each target profile.

    snap_t, snap_gamma: [n] (images, exponents); target_t, target_gamma: [m].
    Returns (x [n, m] float64, columns summing to 1; fit_error [m], the relative L2 distance
    of sum_i x_i p_i from the target profile)."""
    st, sg = np.asarray(snap_t, np.float64), np.asarray(snap_gamma, np.float64)
    tt, tg = np.asarray(target_t, np.float64), np.asarray(target_gamma, np.float64)
    A = profile_inner(st[:, None], sg[:, None], st[None, :], sg[None, :])
    B = profile_inner(st[:, None], sg[:, None], tt[None, :], tg[None, :])
    # A is a Gram matrix of linearly independent functions (positive definite), but snapshots
    # close in time are nearly parallel; lstsq degrades gracefully where solve would fail.
    x = np.linalg.lstsq(A, B, rcond=None)[0]
    x = x / x.sum(axis=0, keepdims=True)
    qq = profile_inner(tt, tg, tt, tg)
    sq = np.einsum("im,ij,jm->m", x, A, x) - 2 * np.einsum("im,im->m", x, B) + qq
    return x, np.sqrt(np.maximum(sq, 0.0) / qq)


# --------------------------------------------------------------------------------------
# Snapshots on disk
# --------------------------------------------------------------------------------------

def snapshot_name(images_seen: int) -> str:
    return f"snapshot-{images_seen:012d}"


def rank_file(snapshot: Path, rank: int) -> Path:
    return Path(snapshot) / f"rank{rank:05d}.safetensors"


def write_snapshot_part(snapshot: Path, rank: int, profiles: list[Mapping[str, torch.Tensor]],
                        layout: Mapping[str, tuple]) -> Path:
    """This rank's file of one snapshot: every profile's tensors (the EMA state as the backend
    lays it out), atomically. `layout`: {name: (full shape, start, numel)} of the sliced
    tensors (empty: whole tensors). Names without a layout entry go only into rank 0's file."""
    from safetensors.torch import save_file
    tensors = {f"{j}/{name}": t.detach().to("cpu").contiguous().clone()
               for j, state in enumerate(profiles) for name, t in state.items()
               if name in layout or rank == 0}
    meta = {"layout": json.dumps({k: [list(v[0]), int(v[1]), int(v[2])] for k, v in layout.items()},
                                 sort_keys=True)}
    Path(snapshot).mkdir(parents=True, exist_ok=True)
    path = rank_file(snapshot, rank)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        set_default_permissions(tmp)
    return path


def write_snapshot_meta(snapshot: Path, meta: dict) -> None:
    """meta.json, last (rank 0, after every rank wrote its part): it completes the snapshot."""
    atomic_write_json(Path(snapshot) / "meta.json", meta, indent=1, sort_keys=True)


@dataclass(frozen=True)
class Snapshot:
    path: Path
    images_seen: int
    batch: int
    sigma_rels: tuple[float, ...]
    gammas: tuple[float, ...]
    world_size: int


def list_snapshots(run_dir: str | os.PathLike) -> list[Snapshot]:
    """The complete snapshots of a run (meta.json and every rank's file), oldest first."""
    root = Path(run_dir) / SNAPSHOT_DIR
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if not (_SNAPSHOT.match(p.name) and (p / "meta.json").is_file()):
                continue
            try:
                m = json.loads((p / "meta.json").read_text())
                snap = Snapshot(p, int(m["images_seen"]), int(m["batch"]), tuple(m["sigma_rels"]),
                                tuple(m["gammas"]), int(m["world_size"]))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise PosthocEMAError(f"snapshot {p}: meta.json is not a snapshot's ({e!r}); move the "
                                      "directory away to reconstruct from the others") from None
            if all(rank_file(p, r).is_file() for r in range(snap.world_size)):
                found.append(snap)
    return sorted(found, key=lambda s: s.images_seen)


def _pick_time(snapshots: list[Snapshot], at_kimg: Optional[float], run: Path) -> Snapshot:
    """The snapshot whose time is reconstructed: the last, or the one taken when training
    crossed at_kimg (the first at or after at_kimg * 1000 images, within one batch)."""
    if at_kimg is None:
        return snapshots[-1]
    last = snapshots[-1]
    if not at_kimg > 0:
        raise PosthocEMAError(f"--at-kimg {at_kimg}: must be > 0")
    wanted = at_kimg * 1000
    if wanted > last.images_seen:
        raise PosthocEMAError(f"--at-kimg {at_kimg:g}: beyond training; the last snapshot of {run} "
                              f"is at {last.images_seen / 1000:g} kimg")
    for s in snapshots:
        if wanted <= s.images_seen < wanted + s.batch:
            return s
    times = ", ".join(f"{s.images_seen / 1000:g}" for s in snapshots[-8:])
    raise PosthocEMAError(f"--at-kimg {at_kimg:g}: no snapshot of {run} was taken there; snapshots "
                          f"are at (kimg) {'..., ' if len(snapshots) > 8 else ''}{times}")


def output_path(run_dir: Path, sigma_rel: float, at_kimg: Optional[float]) -> Path:
    suffix = "" if at_kimg is None else f"-at-{at_kimg:g}kimg"
    return Path(run_dir) / POSTHOC_DIR / f"ema-{sigma_rel:g}{suffix}.safetensors"


def _accumulate(snapshot: Snapshot, weights: np.ndarray, outputs: dict, shapes: dict,
                whole: dict) -> None:
    """outputs[name][k] += sum_j weights[j, k] * profile j of `snapshot`, in float64, with the
    ranks' slices put where they belong in the whole (flat) tensor: outputs[name] is
    [len(targets), numel]. Non-float tensors are kept in `whole`, the later snapshot winning."""
    from safetensors import safe_open
    coeffs = torch.from_numpy(np.ascontiguousarray(weights.T))  # [targets, profiles] float64
    for r in range(snapshot.world_size):
        path = rank_file(snapshot.path, r)
        try:
            opened = safe_open(str(path), "pt")
        except Exception as e:  # safetensors raises its own error type for a damaged header
            raise PosthocEMAError(f"snapshot file {path}: cannot be read ({e}); move its snapshot "
                                  "directory away to reconstruct from the others") from None
        with opened as f:
            layout = json.loads((f.metadata() or {}).get("layout", "{}"))
            by_name: dict[str, dict[int, str]] = {}
            for key in f.keys():
                j, name = key.split("/", 1)
                by_name.setdefault(name, {})[int(j)] = key
            for name, keys in by_name.items():
                first = f.get_tensor(keys[0])
                if not first.is_floating_point():
                    whole[name] = first
                    continue
                if name in layout:
                    shape, start, numel = layout[name]
                    n = max(0, min(numel, math.prod(shape) - start))  # ZeRO-3 pads the last partition
                else:
                    shape, start, n = list(first.shape), 0, first.numel()
                shapes[name] = shape
                out = outputs.get(name)
                if out is None:
                    out = outputs[name] = torch.zeros(coeffs.shape[0], math.prod(shape),
                                                      dtype=torch.float64)
                if n == 0:
                    continue
                # One matrix product per tensor: [targets, profiles] @ [profiles, n].
                rows = torch.stack([f.get_tensor(keys[j]).reshape(-1)[:n] for j in sorted(keys)])
                out[:, start:start + n].addmm_(coeffs[:, sorted(keys)], rows.double())


def reconstruct(run_dir: str | os.PathLike, sigma_rels: Iterable[float],
                at_kimg: Optional[float] = None, out_dir: Optional[str | os.PathLike] = None
                ) -> dict[float, tuple[Path, float]]:
    """Reconstruct the EMA of each requested sigma_rel from the run's snapshots.

    run_dir: a training run with ema.kind=power (RUN_DIR/ema-snapshots). at_kimg: the training
    time to reconstruct (a snapshot's; default the last). Writes, for each sigma_rel,
    <out_dir or RUN_DIR/posthoc>/ema-<sigma_rel>[-at-<K>kimg].safetensors (float32, the
    network's keys: the layout of ema.safetensors) and a .json beside it (the fit error,
    coefficients and snapshots used). Returns {sigma_rel: (path, fit_error)}; fit_error is the
    relative L2 distance of the fitted profile from the requested one (about 1e-8 for a
    tracked sigma_rel, which the fit reproduces). Memory: one float64 copy of the model per
    requested sigma_rel. Raises PosthocEMAError (no snapshots, sigma_rel outside (0, 0.2887),
    at_kimg beyond training or not at a snapshot)."""
    run = Path(run_dir)
    wanted = sorted({check_sigma_rel(s, "--sigma-rel") for s in sigma_rels})
    if not wanted:
        raise PosthocEMAError("give at least one --sigma-rel")
    if not run.is_dir():
        raise PosthocEMAError(f"run directory {run}: not found")
    snapshots = list_snapshots(run)
    if not snapshots:
        raise PosthocEMAError(f"run directory {run}: no EMA snapshots in {run / SNAPSHOT_DIR} (train "
                              "with ema.kind=power, which writes one every ema.snapshot_every_kimg)")
    target = _pick_time(snapshots, at_kimg, run)
    used = [s for s in snapshots if s.images_seen <= target.images_seen]
    times = [s.images_seen for s in used for _ in s.gammas]
    gammas = [g for s in used for g in s.gammas]
    x, errors = solve_coefficients(times, gammas, [target.images_seen] * len(wanted),
                                   [gamma_from_sigma_rel(s) for s in wanted])
    outputs: dict = {}
    shapes: dict = {}
    whole: dict = {}
    row = 0
    for s in used:
        _accumulate(s, x[row:row + len(s.gammas)], outputs, shapes, whole)
        row += len(s.gammas)  # the last snapshot's non-float tensors remain in `whole`
    meta_run = json.loads((target.path / "meta.json").read_text())
    out_root = Path(out_dir) if out_dir else run / POSTHOC_DIR
    try:
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PosthocEMAError(f"output directory {out_root}: cannot be created ({e.strerror})") from None
    result = {}
    from safetensors.torch import save_file
    for k, sigma_rel in enumerate(wanted):
        tensors = {name: flat[k].float().view(shapes[name]) for name, flat in outputs.items()}
        tensors.update(whole)
        path = out_root / output_path(run, sigma_rel, at_kimg).name
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={
                "images_seen": str(target.images_seen), "sigma_rel": f"{sigma_rel:g}",
                "fingerprint": str(meta_run.get("fingerprint", ""))})
            set_default_permissions(tmp)
        fit = float(errors[k])
        atomic_write_json(path.with_suffix(".json"), {
            "sigma_rel": sigma_rel, "gamma": gamma_from_sigma_rel(sigma_rel),
            "images_seen": target.images_seen, "kimg": target.images_seen / 1000, "fit_error": fit,
            "weights": path.name,
            "snapshots": [{"images_seen": s.images_seen, "sigma_rel": sr, "coefficient": float(c)}
                          for s, sr, c in zip((s for s in used for _ in s.gammas),
                                              (sr for s in used for sr in s.sigma_rels), x[:, k])]},
            indent=1)
        result[sigma_rel] = (path, fit)
    return result
