"""Evaluation reports: report.json, report.md and the figures that make memorization visible.

    sample_grid                 a grid of generated images
    nearest_pairs_figure        the most-copied generated images above their nearest training
                                images, similarity printed under each pair
    similarity_histogram        distribution of nearest-neighbour similarity: this run, the
                                held-out calibration, a baseline run; threshold lines
    fid_vs_memorization_figure  one point per run (e.g. a sigma_tn sweep): the trade-off curve
    write_report                report.json (everything, the full distributions included) and
                                report.md (headline numbers and the figures)

Figures are written with matplotlib's Agg backend (no display needed) to a temp file that is
renamed into place, so a crashed evaluation never leaves a truncated PNG behind.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ambient_dist.fileio import atomic_path, atomic_write_json, atomic_write_text  # noqa: E402
from ambient_dist.images import save_image_grid, to_uint8  # noqa: E402
from ambient_dist.metrics.features import as_model_units  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path, suffix=".png") as tmp:  # matplotlib reads the format from it
            fig.savefig(tmp, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _pixels(image: torch.Tensor) -> np.ndarray:
    """One image (uint8 or [-1, 1]) [C, H, W] -> what imshow wants."""
    x = to_uint8(as_model_units(image)).permute(1, 2, 0).numpy()
    return x[:, :, 0] if x.shape[2] == 1 else x


def sample_grid(images: torch.Tensor, path: Path, limit: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_image_grid(as_model_units(images[:limit]), path)


def nearest_pairs_figure(generated: torch.Tensor, train: torch.Tensor, similarity: Sequence[float],
                         nearest: Sequence[int], path: Path, top: int = 8,
                         feature_space: str = "") -> Path:
    """The `top` generated images with the highest similarity, each above its nearest
    training image; the similarity is printed under each pair."""
    sims = np.asarray(similarity)
    order = np.argsort(-sims)[:top]
    fig, axes = plt.subplots(2, len(order), figsize=(1.6 * len(order), 3.7), squeeze=False)
    grey = generated.shape[1] == 1
    for col, i in enumerate(order):
        for row, img in enumerate((generated[i], train[int(nearest[i])])):
            ax = axes[row, col]
            ax.imshow(_pixels(img), cmap="gray" if grey else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, col].set_title(f"gen #{i}", fontsize=8)
        axes[1, col].set_xlabel(f"train #{int(nearest[i])}\nsim {sims[i]:.3f}", fontsize=8)
    axes[0, 0].set_ylabel("generated", fontsize=9)
    axes[1, 0].set_ylabel("nearest train", fontsize=9)
    fig.suptitle(f"Most-copied samples ({feature_space})", fontsize=10)
    return _save(fig, path)


def similarity_histogram(curves: dict[str, Sequence[float]], thresholds: Sequence[float],
                         path: Path, feature_space: str = "") -> Path:
    """Overlaid density histograms of nearest-neighbour similarity, one per labelled set."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    values = [np.asarray(v, dtype=float) for v in curves.values() if len(v)]
    lo = min(min(v.min() for v in values), min(thresholds, default=1.0)) if values else 0.0
    bins = np.linspace(lo, 1.0, 51)
    for label, v in curves.items():
        if len(v):
            ax.hist(np.asarray(v, dtype=float), bins=bins, density=True, histtype="step",
                    linewidth=1.6, label=f"{label} (n={len(v)})")
    for i, t in enumerate(thresholds):
        ax.axvline(t, color="grey", linestyle="--", linewidth=0.8,
                   label="thresholds" if i == 0 else None)
    ax.set_xlabel(f"max cosine similarity to the training set ({feature_space})")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _save(fig, path)


def fid_vs_memorization_figure(runs: Sequence[dict], path: Path, threshold: str) -> Path:
    """runs: dicts with "name", "fid", "memorized" (fraction above `threshold`) and optionally
    "sigma_tn"; points joined in sigma_tn order (the paper's Figure 1 trade-off curve)."""
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    pts = sorted(runs, key=lambda r: (r.get("sigma_tn") is None, r.get("sigma_tn") or 0.0))
    xs = [r["memorized"] for r in pts]
    ys = [r["fid"] if r.get("fid") is not None else np.nan for r in pts]
    ax.plot(xs, ys, "-o", color="tab:blue")
    for r, x, y in zip(pts, xs, ys):
        label = r["name"] + (f" (σtn={r['sigma_tn']:g})" if r.get("sigma_tn") is not None else "")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"fraction of samples with similarity > {threshold}")
    ax.set_ylabel("FID")
    ax.set_title("FID vs memorization")
    return _save(fig, path)


# --------------------------------------------------------------------------------------
# report.json / report.md
# --------------------------------------------------------------------------------------

def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    mem = report.get("memorization") or {}
    gen, held = mem.get("generated") or {}, mem.get("heldout") or {}
    lines = [f"# Evaluation: {report.get('run', '')}", ""]
    lines += [f"- samples: `{report.get('samples', '')}` ({report.get('num_samples', '?')} images)",
              f"- training images: {mem.get('num_train', '?')}; held-out images: "
              f"{held.get('count', 'none')}"]
    f = report.get("fid")
    if f:
        lines.append(f"- **FID {f['value']:.3f}** against {f['reference']} ({f['reference_count']} "
                     f"images, {f['extractor']})")
    c = report.get("clip_score")
    if c:
        lines.append(f"- CLIP score {c['mean']:.3f} ({c['model']})")
    if mem:
        lines += ["", f"## Memorization ({mem['feature_space']}, {mem['similarity']})", ""]
        if mem.get("note"):
            lines += [f"> {mem['note']}", ""]
        header = "| set | " + " | ".join(f"> {t:g}" for t in mem["thresholds"]) + \
                 " | Carlini (d1 < d50/3) | mean | median | p95 |"
        lines += [header, "|" + "---|" * (len(mem["thresholds"]) + 5)]
        for name, s in (("generated", gen), ("held-out (calibration)", held)):
            if s:
                fr = " | ".join(f"{s['fraction_above'][f'{t:g}']:.4f}" for t in mem["thresholds"])
                lines.append(f"| {name} | {fr} | {s['carlini_fraction']:.4f} | {s['mean']:.4f} | "
                             f"{s['median']:.4f} | {s['p95']:.4f} |")
        b = report.get("baseline")
        if b:
            fr = " | ".join(f"{b['fraction_above'].get(f'{t:g}', float('nan')):.4f}" for t in mem["thresholds"])
            lines.append(f"| baseline {b['name']} | {fr} | {b['carlini_fraction']:.4f} | "
                         f"{b['mean']:.4f} | {b['median']:.4f} | {b['p95']:.4f} |")
    figs = report.get("figures", {})
    if figs:
        lines += ["", "## Figures", ""]
        titles = {"grid": "Samples", "pairs": "Most-copied samples and their nearest training images",
                  "histogram": "Nearest-neighbour similarity", "tradeoff": "FID vs memorization"}
        for key, rel in figs.items():
            lines += [f"### {titles.get(key, key)}", "", f"![{key}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(out_dir: str | os.PathLike, report: dict) -> tuple[Path, Path]:
    """report.json + report.md in out_dir (atomic writes); returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "report.json", out / "report.md"
    atomic_write_json(js, report)
    atomic_write_text(md, markdown(report))
    return js, md


def read_report(path: str | os.PathLike) -> dict:
    """A report.json, given the file or the directory holding it."""
    p = Path(path)
    p = p / "report.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no report.json (run ambient-evaluate on it first)")
    return json.loads(p.read_text())


def tradeoff_point(report: dict, threshold: Optional[str] = None) -> dict:
    """(name, sigma_tn, FID, memorized fraction) of one report, for the trade-off figure."""
    mem = report["memorization"]
    t = threshold or f"{mem['thresholds'][0]:g}"
    return {"name": report.get("run", "?"), "sigma_tn": report.get("sigma_tn"),
            "fid": (report.get("fid") or {}).get("value"),
            "memorized": mem["generated"]["fraction_above"][t], "threshold": t}
