#!/usr/bin/env python3
"""Run a memorization study (the paper's Tables 1-2, Figures 1 and 3) from one study file.

    python launchers/study.py configs/studies/fashion-mnist-cpu.yaml
    python launchers/study.py STUDY.yaml --out studies/mine --jobs 8 --device cuda
    python launchers/study.py STUDY.yaml --report-only        # rewrite report.md from what is done
    python launchers/study.py STUDY.yaml --check              # validate every run's config, then exit

For each run x training-set size x seed: shards, training (launchers/train.py), samples,
evaluation (KID + FID against held-out real images, memorization in pixels and the configured
feature spaces with held-out calibration, denoiser attraction); then report.md, report.json and
figures in the study directory. Re-running continues where it stopped; a failed run is reported
and the others go on. --jobs N trains N runs at once (one GPU each when there are GPUs; on a CPU
the cores are split between them). The study file format: ambient_dist/study.py.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="study YAML file")
    p.add_argument("--out", help="study directory (default: the file's `out`, else studies/<name>)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (sampling and evaluation)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report")
    p.add_argument("--check", action="store_true", help="validate the study file and every run's config")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from ambient_dist.errors import UserError
    from ambient_dist.study import StudyError, load_study, run_study
    try:
        if args.jobs < 1:
            raise StudyError(f"--jobs: must be >= 1, got {args.jobs}")
        if args.check:
            _, specs = load_study(args.study, args.out)
            print(f"{args.study}: {len(specs)} runs, every config valid: "
                  + ", ".join(s.name for s in specs))
            return 0
        import torch
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        report = run_study(args.study, args.out, jobs=args.jobs, device=device,
                           only_report=args.report_only, progress=not args.quiet)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
