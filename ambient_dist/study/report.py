"""The study's report: report.json, report.md and its figures, from the runs' study-eval.json.

    table          one row per (run, training-set size): mean and spread over seeds of KID (with
                   its standard error), FID, memorization (pixels and each feature space: the
                   fraction of samples under Carlini et al.'s criterion and above the first
                   similarity threshold) and the denoiser attraction at each sigma; the held-out
                   real images as the calibration row
    conclusions    each Algorithm 1 run against plain DDPM (sigma_tn = 0) of the same size:
                   relative drop of the pixel-space Carlini fraction, and whether its KID is
                   worse than DDPM's beyond their standard errors. KID is what the quality
                   conclusions rest on: FID at a few hundred samples is dominated by its bias.
    figures        Figure 1 (quality vs memorization, points labelled by sigma_tn), Figure 3
                   (held-out images noised at high sigma and what each model's denoiser makes
                   of them, beside the nearest training image), copy galleries, the pixel-space
                   similarity histogram
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ambient_dist.metrics import report as rep  # noqa: E402

# The relative drop in copying the paper's claim is checked against, and the minimum seeds.
CLAIM_RELATIVE_DROP = 0.40


def _mean_spread(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "values": values}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "values": values}


def _row(evals: list[dict]) -> dict:
    """Aggregate one group's per-seed evaluations."""
    first = evals[0]
    row = {"run": first["run"].rsplit("-n", 1)[0], "method": first["method"],
           "sigma_tn": first["sigma_tn"], "size": first["size"],
           "seeds": [e["seed"] for e in evals]}
    kids = [e["quality"]["kid"]["value"] for e in evals]
    ses = [e["quality"]["kid"]["stderr"] for e in evals]
    row["kid"] = _mean_spread(kids)
    # Standard error of the mean over seeds of independent estimates: sqrt(sum SE^2) / n.
    row["kid"]["stderr"] = (math.sqrt(sum(s * s for s in ses)) / len(ses)
                            if all(s is not None for s in ses) else None)
    row["fid"] = _mean_spread([e["quality"]["fid"] for e in evals])
    row["memorization"] = {}
    for space in first["memorization"]:
        thresholds = first["memorization"][space]["thresholds"]
        t = f"{thresholds[0]:g}"
        row["memorization"][space] = {
            "carlini": _mean_spread([e["memorization"][space]["generated"]["carlini_fraction"] for e in evals]),
            "above": _mean_spread([e["memorization"][space]["generated"]["fraction_above"][t] for e in evals]),
            "threshold": t,
            "feature_space": first["memorization"][space]["feature_space"]}
    row["attraction"] = {
        s: {"closer": _mean_spread([e["attraction"]["per_sigma"][s]["fraction_closer_to_train"] for e in evals]),
            "ratio": _mean_spread([e["attraction"]["per_sigma"][s]["mean_ratio"] for e in evals])}
        for s in first["attraction"]["per_sigma"]}
    return row


def _heldout_row(evaluation: dict) -> dict:
    row = {"run": "held-out real images (calibration)", "memorization": {}}
    for space, mem in evaluation["memorization"].items():
        t = f"{mem['thresholds'][0]:g}"
        held = mem.get("heldout") or {}
        row["memorization"][space] = {"carlini": held.get("carlini_fraction"),
                                      "above": held.get("fraction_above", {}).get(t),
                                      "count": held.get("count")}
    return row


def _conclusions(rows: list[dict]) -> list[dict]:
    """Each Algorithm 1 run (and baseline) against DDPM of the same size."""
    out = []
    for ddpm in [r for r in rows if r["method"] == "ambient" and r["sigma_tn"] == 0]:
        for r in rows:
            if r is ddpm or r["size"] != ddpm["size"]:
                continue
            c_d = ddpm["memorization"]["pixels"]["carlini"]["mean"]
            c_r = r["memorization"]["pixels"]["carlini"]["mean"]
            drop = None if not c_d else (c_d - c_r) / c_d
            k_d, k_r = ddpm["kid"]["mean"], r["kid"]["mean"]
            se = math.hypot(ddpm["kid"]["stderr"] or 0.0, r["kid"]["stderr"] or 0.0)
            kid_worse = k_r - k_d > se
            out.append({"run": r["run"], "size": r["size"], "method": r["method"],
                        "sigma_tn": r["sigma_tn"], "relative_copy_drop": drop,
                        "kid_difference": k_r - k_d, "kid_combined_stderr": se,
                        "kid_worse_beyond_stderr": kid_worse,
                        "meets_claim": (r["method"] == "ambient" and drop is not None
                                        and drop >= CLAIM_RELATIVE_DROP and not kid_worse
                                        and len(r["seeds"]) >= 2)})
    return out


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _ms(s: dict, scale: float = 1.0, pct: bool = False, digits: int = 2) -> str:
    if s["mean"] is None:
        return "n/a"
    f = (lambda v: _pct(v)) if pct else (lambda v: f"{v * scale:.{digits}f}")
    return f(s["mean"]) + (f" ± {f(s['std'])}" if s.get("std") is not None else "")


def markdown(study, rows: list[dict], heldout: Optional[dict], conclusions: list[dict],
             failures: dict, figures: dict, missing: Optional[dict] = None,
             not_built: Optional[dict] = None) -> str:
    spaces = list(rows[0]["memorization"]) if rows else ["pixels"]
    sigmas = list(rows[0]["attraction"]) if rows else []
    lines = [f"# Study: {study.name}", "", study.description.strip(), "",
             f"Seeds: {study.seeds}; training-set sizes: {study.subset_sizes}; "
             f"{study.evaluation.num_samples} samples per run. Mean ± standard deviation over seeds.",
             "KID (x 10^3; ± its standard error, propagated over seeds) and FID are against "
             f"{study.evaluation.quality_reference} held-out real images (Inception pool3). "
             "**Quality conclusions rest on KID**: it is unbiased at this sample count, FID is not.",
             "Memorization: % of samples under Carlini et al.'s criterion (nearest training image "
             "closer than 1/3 of the mean distance to the 50 nearest) and % above the first "
             "cosine-similarity threshold, per feature space; the calibration row is held-out real "
             "images that were never trained on. Attraction: % of held-out images noised at sigma "
             "whose denoised output is closer to a training image than to the original (Figure 3).",
             ""]
    head = ["run", "n", "method", "σ_tn", "KID x1e3", "FID"]
    for sp in spaces:
        t = rows[0]["memorization"][sp]["threshold"] if rows else "0.9"
        head += [f"Carlini % ({sp})", f"> {t} % ({sp})"]
    head += [f"attraction % (σ={s})" for s in sigmas]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kid = _ms(r["kid"], 1e3, digits=3)
        if r["kid"].get("stderr") is not None:
            kid += f" (SE {1e3 * r['kid']['stderr']:.3f})"
        cells = [r["run"], str(r["size"]), r["method"], f"{r['sigma_tn']:g}", kid, _ms(r["fid"], digits=1)]
        for sp in spaces:
            m = r["memorization"].get(sp)
            cells += [_ms(m["carlini"], pct=True), _ms(m["above"], pct=True)] if m else ["n/a", "n/a"]
        cells += [_ms(r["attraction"][s]["closer"], pct=True) if s in r["attraction"] else "n/a"
                  for s in sigmas]
        lines.append("| " + " | ".join(cells) + " |")
    if heldout:
        cells = [heldout["run"], "", "", "", "", ""]
        for sp in spaces:
            m = heldout["memorization"].get(sp, {})
            cells += [_pct(m.get("carlini")), _pct(m.get("above"))]
        cells += ["" for _ in sigmas]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Against plain DDPM (σ_tn = 0)", ""]
    for c in conclusions:
        drop = "n/a" if c["relative_copy_drop"] is None else f"{100 * c['relative_copy_drop']:.0f}%"
        verdict = ("KID worse than DDPM's beyond the standard errors" if c["kid_worse_beyond_stderr"]
                   else "KID not worse beyond the standard errors")
        claim = " — **meets the claim** (>= 40% less copying, quality kept)" if c["meets_claim"] else ""
        lines.append(f"- {c['run']} (n={c['size']}): copies {drop} less than DDPM (pixel-space "
                     f"Carlini, relative); KID difference {1e3 * c['kid_difference']:+.3f} x1e-3 "
                     f"(combined SE {1e3 * c['kid_combined_stderr']:.3f}): {verdict}{claim}.")
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- {k}: {v}" for k, v in failures.items()]
    others = {k: v for k, v in (missing or {}).items() if k not in failures}
    if others:
        lines += ["", "## Not in the table", "",
                  "Runs without a result made under this study file (run the study to make them):",
                  ""] + [f"- {k}: {v}" for k, v in others.items()]
    if not_built:
        lines += ["", "## Not built", ""] + [f"- {k}: {v}" for k, v in not_built.items()]
    lines += ["", "## Figures", ""]
    for title, path in figures.items():
        lines += [f"### {title}", "", f"![{title}]({path})", ""]
    return "\n".join(lines) + "\n"


def figure1(rows: list[dict], path: Path) -> Path:
    """Quality (KID) against memorization (pixel-space Carlini), one point per run."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    curve = sorted([r for r in rows if r["method"] == "ambient"], key=lambda r: r["sigma_tn"])
    for group, style in ((curve, "-o"), ([r for r in rows if r["method"] != "ambient"], "s")):
        if not group:
            continue
        xs = [1e3 * r["kid"]["mean"] for r in group]
        ys = [100 * r["memorization"]["pixels"]["carlini"]["mean"] for r in group]
        xerr = [1e3 * (r["kid"]["stderr"] or 0) for r in group]
        yerr = [100 * (r["memorization"]["pixels"]["carlini"]["std"] or 0) for r in group]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=style, capsize=3,
                    color="tab:blue" if style == "-o" else "tab:red",
                    label="Algorithm 1 (σ_tn = 0: DDPM)" if style == "-o" else "baselines")
        for r, x, y in zip(group, xs, ys):
            label = (f"σ_tn={r['sigma_tn']:g}" if r["method"] == "ambient"
                     else f"{r['run']} (σ_tn={r['sigma_tn']:g})")
            ax.annotate(f"{label}, n={r['size']}", (x, y), textcoords="offset points",
                        xytext=(5, 4), fontsize=7)
    ax.set_xlabel("KID x 10^3 (lower = better quality)")
    ax.set_ylabel("% samples copying a training image (pixels, Carlini)")
    ax.set_title("Quality vs memorization (paper Figure 1)")
    ax.legend(fontsize=8)
    return rep._save(fig, path)


def figure3(study, specs_by_group: dict, train: torch.Tensor, heldout: torch.Tensor,
            path: Path) -> Optional[Path]:
    """Rows: held-out images; columns: original, noised, then per run its denoised output and
    that output's nearest training image."""
    from ambient_dist.metrics.memorization import attraction_noise
    ev = study.evaluation
    columns = []
    from ambient_dist.study.stages import ATTRACTION_FILE
    for group, spec in specs_by_group.items():
        f = spec.run_dir / ATTRACTION_FILE
        if f.is_file():
            columns.append((group, torch.load(f)))
    if not columns:
        return None
    rows = min(ev.figure_rows, len(heldout), *(len(c["outputs"]) for _, c in columns))
    ncol = 2 + 2 * len(columns)
    fig, axes = plt.subplots(rows, ncol, figsize=(1.2 * ncol, 1.25 * rows + 0.8), squeeze=False)
    grey = heldout.shape[1] == 1

    def show(ax, img, title=None):
        ax.imshow(rep._pixels(img.clamp(-1, 1)), cmap="gray" if grey else None, vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        if title:
            ax.set_title(title, fontsize=6)
    for i in range(rows):
        y = heldout[i]
        show(axes[i, 0], y, "held-out" if i == 0 else None)
        show(axes[i, 1], y + ev.figure_sigma * attraction_noise(y.shape, 0, i),
             f"σ={ev.figure_sigma:g}" if i == 0 else None)
        for j, (group, c) in enumerate(columns):
            show(axes[i, 2 + 2 * j], c["outputs"][i], f"{group}\ndenoised" if i == 0 else None)
            show(axes[i, 3 + 2 * j], train[int(c["nearest"][i])], "nearest train" if i == 0 else None)
    fig.suptitle(f"What each denoiser makes of held-out images at σ={ev.figure_sigma:g} "
                 "(paper Figure 3)", fontsize=9)
    return rep._save(fig, path)


def _not_in_table(study, specs: list, failures: dict) -> tuple[dict, dict]:
    """({group: [current study-eval.json, ...]}, {run name: why it is not in the table}).

    Only results made under the current study file count (stages.result_status: the same
    digests the stages reuse them by); a failure recorded now or by an earlier invocation
    (study-failed.json) is named with its stage."""
    from ambient_dist.study.stages import FAILED_RECORD, _read_json, result_status
    current: dict[str, list] = {}
    missing: dict[str, str] = {}
    for spec in specs:
        if spec.name in failures:
            missing[spec.name] = f"failed: {failures[spec.name]}"
            continue
        result, why = result_status(study, spec)
        if result is not None:
            current.setdefault(spec.group, []).append((spec, result))
            continue
        failed = _read_json(spec.run_dir / FAILED_RECORD)
        if failed is not None:
            why = f"{why}; its last attempt failed at {failed.get('stage')}: {failed.get('error')}"
        missing[spec.name] = why
    return current, missing


def write_study_report(study, specs: list, out_dir: Path, failures: dict) -> Path:
    """report.json + report.md (+ figures/) from the runs' results made under the current
    study file; a run without one, a group that cannot be summarised and a figure that cannot
    be drawn are named in the report (never raised). Returns report.md's path."""
    from ambient_dist.data import load_model_images
    from ambient_dist.errors import UserError
    from ambient_dist.metrics import samples as S
    from ambient_dist.study.stages import ATTRACTION_FILE

    drawable = (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError, UserError)
    current, missing = _not_in_table(study, specs, failures)
    rows, first_spec, evals_first = [], {}, {}
    not_built: dict[str, str] = {}
    for group, members in current.items():
        try:
            rows.append(_row([e for _, e in members]))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            not_built[f"row {group}"] = f"its results could not be summarised ({type(e).__name__}: {e})"
            continue
        first_spec[group], evals_first[group] = members[0]
    figures: dict[str, str] = {}
    figs = out_dir / "figures"
    heldout = None
    if evals_first:
        try:
            heldout = _heldout_row(next(iter(evals_first.values())))
        except (KeyError, TypeError) as e:
            not_built["calibration row"] = f"{type(e).__name__}: {e}"

    def draw(title: str, fn) -> None:
        try:
            rel = fn()
        except drawable as e:
            not_built[title] = f"{type(e).__name__}: {e}"
            return
        if rel:
            figures[title] = rel

    if rows:
        def fig1():
            figure1(rows, figs / "figure1_quality_vs_memorization.png")
            return "figures/figure1_quality_vs_memorization.png"
        draw("Figure 1: quality vs memorization", fig1)
        trains: dict = {}

        def train_of(spec):
            """Each run's own training images (sizes and resolutions may differ between runs)."""
            if spec.shards not in trains:
                trains[spec.shards] = load_model_images(spec.shards, "train", spec.size)
            return trains[spec.shards]

        # Figure 3 compares runs on the same held-out images: one panel per data geometry and
        # size (the held-out images depend on both; across sigma_tn they are the same images).
        made = {g: sp for g, sp in first_spec.items()
                if _attraction_digest(sp.run_dir / ATTRACTION_FILE) == evals_first[g].get("digest")}
        panels: dict = {}
        for group, spec in made.items():
            d = spec.config.data
            panels.setdefault((spec.size, d.resolution, d.channels), {})[group] = spec
        for (size, res, _), members in panels.items():
            first = next(iter(members.values()))
            suffix = "" if len(panels) == 1 else f"_n{size}_{res}px"
            title = "Figure 3: denoiser attraction" + ("" if len(panels) == 1 else f" (n={size}, {res} px)")

            def fig3(members=members, first=first, suffix=suffix):
                held = load_model_images(first.shards, "heldout", study.evaluation.attraction_images)
                name = f"figure3_denoiser_attraction{suffix}.png"
                if figure3(study, members, train_of(first), held, figs / name):
                    return f"figures/{name}"
                return None
            draw(title, fig3)
        curves = {}
        for group, spec in first_spec.items():
            def copies(group=group, spec=spec):
                mem = evals_first[group]["memorization"]["pixels"]
                _, gen, _ = S.read_samples(spec.run_dir / "samples", limit=study.evaluation.num_samples)
                name = f"copies_{spec.name}.png"
                rep.nearest_pairs_figure(gen, train_of(spec), mem["generated"]["max_similarity"],
                                         mem["generated"]["nearest_index"], figs / name,
                                         feature_space=mem["feature_space"])
                curves[group] = mem["generated"]["max_similarity"]
                return f"figures/{name}"
            draw(f"Most-copied samples: {spec.name}", copies)

        def histogram():
            mem0 = next(iter(evals_first.values()))["memorization"]["pixels"]
            if mem0.get("heldout"):
                curves["held-out real (calibration)"] = mem0["heldout"]["max_similarity"]
            rep.similarity_histogram(curves, mem0["thresholds"], figs / "similarity_pixels.png",
                                     mem0["feature_space"])
            return "figures/similarity_pixels.png"
        draw("Nearest-training-image similarity (pixels)", histogram)
    conclusions = _conclusions(rows)
    report = {"study": study.name, "description": study.description, "seeds": study.seeds,
              "subset_sizes": study.subset_sizes, "num_samples": study.evaluation.num_samples,
              "quality_reference": study.evaluation.quality_reference,
              "attraction_sigmas": study.evaluation.attraction_sigmas,
              "quality_conclusions_rest_on": "KID", "rows": rows, "heldout": heldout,
              "conclusions": conclusions, "failures": failures, "not_in_table": missing,
              "not_built": not_built, "figures": figures,
              "runs": {s.name: str(s.run_dir) for s in specs}}
    from ambient_dist.fileio import atomic_write_json, atomic_write_text
    atomic_write_json(out_dir / "report.json", report)
    md = out_dir / "report.md"
    atomic_write_text(md, markdown(study, rows, heldout, conclusions, failures, figures,
                                   missing, not_built))
    return md


def _attraction_digest(path: Path) -> Optional[str]:
    if not path.is_file():
        return None
    try:
        return torch.load(path).get("digest")
    except (OSError, RuntimeError, EOFError, AttributeError, ValueError):
        return None
