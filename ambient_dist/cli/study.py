"""Run a memorization study (the paper's Tables 1-2, Figures 1 and 3) from one study file.

    ambient-study configs/studies/fashion-mnist-cpu.yaml
    ambient-study STUDY.yaml --out studies/mine --jobs 8 --device cuda
    ambient-study STUDY.yaml --report-only        # rewrite report.md from what is done
    ambient-study STUDY.yaml --check              # validate every run's config, then exit
    ambient-study STUDY.yaml --retrain ddpm       # train run ddpm again from scratch
    ambient-study STUDY.yaml --executor slurm --partition gpu --nodes 4 --gpus-per-node 8

For each run x training-set size x seed: shards, training (ambient-train), samples,
evaluation (KID + FID against held-out real images, memorization in pixels and the configured
feature spaces with held-out calibration, denoiser attraction); then report.md, report.json and
figures in the study directory. Re-running continues where it stopped: each stage's result is
reused only when everything that made it is unchanged (ambient_dist/study/stages.py), a
changed input redoes that stage and those after it, and a change that would invalidate a
run's checkpoints is refused before anything starts (naming it and --retrain). A failed run
is reported and the others go on.

--executor local (default): each run is one process on this machine, --jobs N at a time (one
GPU each when there are GPUs; on a CPU the cores are split between them). --executor slurm: each
run is one SLURM job (submitit); running the command again shows the jobs' states, collects
what finished and submits what is neither done nor queued nor running (--wait: until all end).

One study directory has one owner: a second invocation on it is refused (exit 2) naming the
owner's pid and host. Ctrl-C or SIGTERM stops every run at a checkpoint and starts no queued
run; the command then exits 130 / 143 and running it again continues. Exit status: 0 every run
done; 1 some runs failed (named on stderr; the report has the others) or were stopped by a
signal of their own; 2 refused (a bad study file, option or directory, or one in use); 130 /
143 stopped. The study file format: ambient_dist/study/__init__.py.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ambient_dist.cli import reports_user_errors

# Exit status when the study ran but some runs failed (a refusal before starting is 2).
RUNS_FAILED = 1

# Command-line names of the study file's slurm: keys (StudySlurm fields).
SLURM_FLAGS = {"partition": str, "account": str, "nodes": int, "gpus_per_node": int,
               "cpus_per_task": int, "mem_gb": float, "time_min": int, "max_requeues": int}


def check_device(device: str, executor: str) -> None:
    """StudyError unless `device` is auto, cpu, cuda or cuda:N, and (on this machine, with the
    local executor) a CUDA device is there when one is asked for."""
    from ambient_dist.study import StudyError
    if device == "auto":
        return
    import torch
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise StudyError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    if kind == "cuda" and executor == "local" and not torch.cuda.is_available():
        raise StudyError(f"--device {device}: no CUDA device on this machine (torch "
                         f"{torch.__version__}); use --device cpu or auto")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambient-study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="study YAML file")
    p.add_argument("--out", help="study directory (default: the file's `out`, else studies/<name>)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (local executor)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (sampling and evaluation)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report")
    p.add_argument("--check", action="store_true",
                   help="validate the study file, every run's config, the sizes against the "
                        "source, and that existing runs can continue under it; then exit")
    p.add_argument("--retrain", nargs="+", default=[], metavar="RUN",
                   help="train these runs again from scratch, deleting their run directories "
                        "(a run's name for all its sizes and seeds, a run directory name, or all)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="local: one process per run here; slurm: one SLURM job per run (submitit)")
    p.add_argument("--wait", action="store_true", help="slurm: wait until every job has ended")
    g = p.add_argument_group("SLURM (over the study file's slurm: section)")
    for key, kind in SLURM_FLAGS.items():
        g.add_argument("--" + key.replace("_", "-"), dest=f"slurm_{key}", type=kind,
                       metavar=key.split("_")[0].upper(), help=f"slurm.{key}")
    g.add_argument("--sbatch", dest="slurm_sbatch", action="append", metavar="OPTION",
                   help="an extra sbatch option, e.g. --sbatch=--qos=high (repeatable)")
    return p


@reports_user_errors()
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ambient_dist.study import StudyError, load_study, run_study
    from ambient_dist.study.process import Interrupted
    if args.jobs < 1:
        raise StudyError(f"--jobs: must be >= 1, got {args.jobs}")
    slurm = {k[len("slurm_"):]: v for k, v in vars(args).items()
             if k.startswith("slurm_") and v is not None}
    if slurm and args.executor != "slurm":
        raise StudyError("--" + next(iter(slurm)).replace("_", "-") + ": a SLURM option needs "
                         "--executor slurm")
    check_device(args.device, args.executor)  # before hours of training, not at sampling
    if args.check:
        from ambient_dist.study.runner import mark_retrain, refuse_stale_training
        study, specs = load_study(args.study, args.out)
        # Runs already in the study directory must be able to continue under this file.
        refuse_stale_training(mark_retrain(specs, args.retrain))
        if args.executor == "slurm":
            import dataclasses

            from ambient_dist.study.slurm import check_ranks, check_slurm
            settings = dataclasses.replace(study.slurm, **slurm)
            check_slurm(settings)
            check_ranks(settings, specs)
        print(f"{args.study}: {len(specs)} runs, every config valid: "
              + ", ".join(s.name for s in specs))
        return 0
    device = args.device
    if device == "auto" and args.executor == "local":  # a SLURM job decides on its own node
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from ambient_dist.study import StudyFailed
    try:
        outcome = run_study(args.study, args.out, jobs=args.jobs, device=device,
                            only_report=args.report_only, progress=not args.quiet,
                            executor=args.executor, slurm_overrides=slurm, wait=args.wait,
                            retrain=args.retrain)
    except StudyFailed as e:  # it ran: not a refusal (2), but not a success either
        outcome, failed = e.outcome, e
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        return e.exit_status
    except KeyboardInterrupt:  # Ctrl-C while no run was going (set-up, the last report)
        print(f"stopped: interrupted by SIGINT; run `ambient-study {args.study}"
              + (f" --out {args.out}" if args.out else "") + "` again to continue",
              file=sys.stderr, flush=True)
        return 130
    else:
        failed = None
    print(f"report: {outcome.report}")
    if outcome.pending:
        print(f"{len(outcome.pending)} run(s) queued or running on SLURM ("
              + ", ".join(f"{n}: {st}" for n, st in outcome.pending.items())
              + "); run the same command again to collect them")
    if outcome.stopped:
        print(f"error: {len(outcome.stopped)} run(s) stopped by a signal before their end ("
              + ", ".join(outcome.stopped) + "); their checkpoints are kept: run the same command "
              "again to continue them", file=sys.stderr)
    if failed is not None:
        print(f"error: {failed}", file=sys.stderr)
        return RUNS_FAILED
    return RUNS_FAILED if outcome.stopped else 0


if __name__ == "__main__":
    sys.exit(main())
