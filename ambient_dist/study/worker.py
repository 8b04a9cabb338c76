"""One run of a study, in its own process: what `ambient-study --executor local` starts per run.

    python -m ambient_dist.study.worker STUDY.yaml --out STUDY_DIR --run NAME [--device cuda]

Locks the run directory (a second worker or an `ambient-train` on it is refused, naming the
owner), shares the lock with its trainer (locking.DirectoryLock.child_env), and runs the run's
stages (study.stages.run_one), each skipped when done. Exit status: 0 done; 1 failed (the
stage and error in <run>/study-failed.json); 2 a user error (e.g. the run directory is in
use); 130 / 143 stopped by SIGINT / SIGTERM (the trainer checkpointed: running the study
again continues it). A worker whose parent dies stops as if sent SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from typing import Optional, Sequence

from ambient_dist.study.config import RunSpec, StudyConfig, StudyError
from ambient_dist.study.stages import FAILED_RECORD as FAILURE_RECORD
from ambient_dist.study.stages import RunFailed

FAILED = 1


def failure_message(error: BaseException) -> str:
    """"stage: Type: message" of a failed run (RunFailed carries both already)."""
    if isinstance(error, RunFailed):
        return f"{error.stage}: {error.error}"
    from ambient_dist.errors import original_message
    return f"run: {type(error).__name__}: {original_message(error)}"


def run_locked(study: StudyConfig, spec: RunSpec, device: str, progress: bool) -> Optional[dict]:
    """run_one under the run directory's lock, shared with the trainer. A failure is recorded
    in <run>/study-failed.json and re-raised; Interrupted and DirectoryInUse pass through
    unrecorded (neither is the run's fault)."""
    from ambient_dist.locking import DirectoryLock
    from ambient_dist.study.stages import record_failure, run_one
    with DirectoryLock(spec.run_dir, "run directory") as lock:
        os.environ.update(lock.child_env())  # the trainer runs with this environment
        (spec.run_dir / FAILURE_RECORD).unlink(missing_ok=True)
        try:
            return run_one(study, spec, device, progress)
        except RunFailed:
            raise  # run_one wrote the record, with the cause's traceback
        except Exception as e:
            record_failure(spec.run_dir, "run", e, failure_message(e))
            raise


def find_spec(specs: list[RunSpec], name: str) -> RunSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise StudyError(f"--run {name}: no such run in the study (runs: "
                     + ", ".join(s.name for s in specs) + ")")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ambient_dist.study.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="study YAML file")
    p.add_argument("--out", required=True, help="the study directory")
    p.add_argument("--run", required=True, help="the run's name (<run>-n<size>-s<seed>)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ambient_dist.cli import fail
    from ambient_dist.errors import UserError
    from ambient_dist.study.config import load_study
    from ambient_dist.study.process import STOP_SIGNALS, Interrupted, raise_on_signals, watch_parent
    args = build_parser().parse_args(argv)
    try:
        with raise_on_signals():
            # The study was SIGKILLed (or died): stop as it would have asked us to.
            watch_parent(lambda: os.kill(os.getpid(), signal.SIGTERM))
            study, specs = load_study(args.study, args.out, check_source=False)
            spec = find_spec(specs, args.run)
            run_locked(study, spec, args.device, not args.quiet)
    except Interrupted as e:
        for s in STOP_SIGNALS:  # stopping already: a repeated signal must not end it sooner
            signal.signal(s, signal.SIG_IGN)
        print(f"{args.run}: {e}", flush=True)
        return e.exit_status
    except RunFailed as e:  # its traceback is in the record, the message is enough here
        print(f"{args.run}: {failure_message(e)}", file=sys.stderr, flush=True)
        return FAILED
    except UserError as e:  # refused before the run's stages began (e.g. the directory in use)
        return fail(e)
    except Exception as e:
        traceback.print_exc()
        print(f"{args.run}: {failure_message(e)}", file=sys.stderr, flush=True)
        return FAILED
    return 0

if __name__ == "__main__":
    sys.exit(main())
