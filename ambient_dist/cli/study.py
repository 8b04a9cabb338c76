"""Run a memorization study (the paper's Tables 1-2, Figures 1 and 3) from one study file.

    ambient-study configs/studies/fashion-mnist-cpu.yaml
    ambient-study STUDY.yaml --out studies/mine --jobs 8 --device cuda
    ambient-study STUDY.yaml --report-only        # rewrite report.md from what is done
    ambient-study STUDY.yaml --check              # validate every run's config, then exit
    ambient-study STUDY.yaml --retrain ddpm       # train run ddpm again from scratch

For each run x training-set size x seed: shards, training (ambient-train), samples,
evaluation (KID + FID against held-out real images, memorization in pixels and the configured
feature spaces with held-out calibration, denoiser attraction); then report.md, report.json and
figures in the study directory. Re-running continues where it stopped: each stage's result is
reused only when everything that made it is unchanged (ambient_dist/study/stages.py), a
changed input redoes that stage and those after it, and a change that would invalidate a
run's checkpoints is refused before anything starts (naming it and --retrain). A failed run
is reported and the others go on. Exit status: 0 every run done; 1 some runs failed (named
on stderr; the report has the others); 2 refused (a bad study file, option or directory). --jobs N trains N runs at once (one GPU each when there are GPUs; on a CPU
the cores are split between them). The study file format: ambient_dist/study/__init__.py.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ambient_dist.cli import reports_user_errors

# Exit status when the study ran but some runs failed (a refusal before starting is 2).
RUNS_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambient-study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="study YAML file")
    p.add_argument("--out", help="study directory (default: the file's `out`, else studies/<name>)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (sampling and evaluation)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report")
    p.add_argument("--check", action="store_true",
                   help="validate the study file, every run's config, the sizes against the "
                        "source, and that existing runs can continue under it; then exit")
    p.add_argument("--retrain", nargs="+", default=[], metavar="RUN",
                   help="train these runs again from scratch, deleting their run directories "
                        "(a run's name for all its sizes and seeds, a run directory name, or all)")
    p.add_argument("--quiet", action="store_true")
    return p


@reports_user_errors()
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ambient_dist.study import StudyError, load_study, run_study
    if args.jobs < 1:
        raise StudyError(f"--jobs: must be >= 1, got {args.jobs}")
    if args.check:
        from ambient_dist.study.runner import mark_retrain
        from ambient_dist.study.stages import training_refusal
        _, specs = load_study(args.study, args.out)
        # Runs already in the study directory must be able to continue under this file.
        refusals = [r for r in (training_refusal(s) for s in mark_retrain(specs, args.retrain)) if r]
        if refusals:
            raise StudyError(" | ".join(refusals))
        print(f"{args.study}: {len(specs)} runs, every config valid: "
              + ", ".join(s.name for s in specs))
        return 0
    import torch
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    from ambient_dist.study import StudyFailed
    try:
        report = run_study(args.study, args.out, jobs=args.jobs, device=device,
                           only_report=args.report_only, progress=not args.quiet,
                           retrain=args.retrain)
    except StudyFailed as e:  # it ran: not a refusal (2), but not a success either
        print(f"error: {e}", file=sys.stderr)
        return RUNS_FAILED
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
