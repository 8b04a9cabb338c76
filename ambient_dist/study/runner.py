"""The study driver: every run that is not done yet, one process (or SLURM job) each, then the report.

    run_study(path, out, jobs, device, executor="local")
        refuse runs whose checkpoints cannot continue under the study file (stages.training_refusal)
        lock the study directory (a second invocation is refused, naming the owner)
        -> delete the run directories --retrain names
        -> the shards of every run, here (runs that need the same data share them)
        -> local: one worker process per run (study/worker.py), `jobs` at a time;
           slurm: one SLURM job per run through submitit (study/slurm.py)
        -> report.md / report.json from what is done

A stop signal (SIGINT, SIGTERM) raises process.Interrupted after every running worker has
checkpointed and exited (study/process.py says how); queued runs are not started.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml

from ambient_dist.config import to_dict
from ambient_dist.study.config import RunSpec, StudyConfig, StudyError, StudyFailed, load_study
from ambient_dist.study.process import (POLL_S, Interrupted, kill_group, wait_polling,
                                        handle_signals, raise_on_signals)
from ambient_dist.study.stages import FAILED_RECORD as FAILURE_RECORD
from ambient_dist.study.stages import make_run_shards, record_failure, recorded_failure

EXECUTORS = ("local", "slurm")
# study.worker is imported inside the functions: `python -m ambient_dist.study.worker` runs
# it as __main__, which must find it not yet imported by this package.


@dataclass
class StudyOutcome:
    """What run_study did: the report's path and the runs that failed (name -> message)."""
    report: Optional[Path]
    failures: dict[str, str] = field(default_factory=dict)
    # Runs submitted to SLURM and not finished yet (name -> state), with --executor slurm.
    pending: dict[str, str] = field(default_factory=dict)
    # Runs whose worker a signal stopped (not the study's: someone signalled it alone); their
    # checkpoints are kept and a rerun continues them.
    stopped: list[str] = field(default_factory=list)


def study_dir(specs: list[RunSpec]) -> Path:
    return specs[0].run_dir.parent.parent


def continue_hint(path: str | os.PathLike, out_dir: Path) -> str:
    return f"run `ambient-study {path} --out {out_dir}` again to continue"


def mark_retrain(specs: list[RunSpec], retrain: Sequence[str]) -> list[RunSpec]:
    """Set RunSpec.retrain for the runs named in `retrain`: a run's name (every size and
    seed of it), one (run, size, seed)'s directory name, or 'all'. An unknown name is a
    StudyError naming the choices."""
    import dataclasses
    wanted = set(retrain)
    known = {s.name for s in specs} | {s.run.name for s in specs} | {"all"}
    unknown = sorted(wanted - known)
    if unknown:
        raise StudyError(f"--retrain {unknown[0]}: no such run (runs: "
                         f"{', '.join(sorted({s.run.name for s in specs}))}; or a run directory "
                         "name such as " + specs[0].name + ", or all)")
    return [dataclasses.replace(s, retrain=bool(wanted & {"all", s.name, s.run.name})) for s in specs]


def refuse_stale_training(specs: list[RunSpec]) -> None:
    """StudyError naming every run whose checkpoints cannot continue under the study file
    (stages.training_refusal), before anything starts."""
    from ambient_dist.study.stages import training_refusal
    refusals = [r for r in (training_refusal(s) for s in specs) if r]
    if refusals:
        raise StudyError(" | ".join(refusals))


def run_study(path: str | os.PathLike, out: Optional[str] = None, jobs: int = 1,
              device: str = "cpu", only_report: bool = False, progress: bool = True,
              executor: str = "local", slurm_overrides: Optional[dict] = None,
              wait: bool = False, retrain: Sequence[str] = ()) -> StudyOutcome:
    """Run every run that is not done yet, then write the report.

    executor "local": one worker process per run, `jobs` at a time; "slurm": one SLURM job
    per run (slurm_overrides: StudySlurm fields over the study file's `slurm:`; wait: poll
    until every job has ended).

    Refused before anything starts (StudyError): a bad study file (load_study), and runs
    whose checkpoints cannot continue under the current settings (stages.training_refusal;
    `retrain` names runs to train again from scratch instead: their run directories are
    deleted here, once, before any worker starts, see mark_retrain). Raises DirectoryInUse
    when another process owns the study directory, Interrupted (exit_status 130 / 143, its
    message says how to continue) on SIGINT / SIGTERM. A run that fails does not stop the
    others; once every run has been tried and the report written (from the runs that
    succeeded), StudyFailed (a StudyError) is raised with `.failures` {run name: "stage:
    error"}, `.report` and `.outcome`. `only_report` rewrites the report from the results
    made under the current study file (naming the others) and raises nothing for failed
    runs."""
    from ambient_dist.locking import DirectoryLock
    from ambient_dist.study.report import write_study_report
    study, specs = load_study(path, out)
    specs = mark_retrain(specs, retrain)
    out_dir = study_dir(specs)
    if only_report and not out_dir.is_dir():
        raise StudyError(f"--report-only: no study directory {out_dir} (run the study first)")
    if not only_report:
        refuse_stale_training(specs)
    if executor == "slurm" and not only_report:
        from ambient_dist.study.slurm import check_ranks, preflight
        settings = dataclasses.replace(study.slurm, **(slurm_overrides or {}))
        check_ranks(settings, specs)
        preflight(settings)
    say = (lambda msg: print(f"[study] {msg}", flush=True)) if progress else (lambda msg: None)
    with DirectoryLock(out_dir, "study directory"):
        failures: dict[str, str] = {}
        pending: dict[str, str] = {}
        stopped: list[str] = []
        if not only_report:
            (out_dir / "study.yaml").write_text(yaml.safe_dump(to_dict(study), sort_keys=False))
            # Here, once: a worker (or a requeued SLURM job) that deleted its run directory on
            # every start would throw its own checkpoints away.
            for spec in [s for s in specs if s.retrain]:
                if spec.run_dir.exists():
                    say(f"{spec.name}: --retrain: deleting {spec.run_dir}")
                    shutil.rmtree(spec.run_dir)
            specs = [dataclasses.replace(s, retrain=False) for s in specs]
            try:
                with raise_on_signals():
                    _make_shards(study, specs, failures, say)
            except Interrupted as e:
                raise Interrupted(e.signum, f"stopped by {signal.Signals(e.signum).name} while "
                                  f"making shards; {continue_hint(path, out_dir)}") from None
            todo = [s for s in specs if s.name not in failures]
            if executor == "slurm":
                from ambient_dist.study.slurm import run_on_slurm
                pending = run_on_slurm(path, study, todo, out_dir, device, failures, say,
                                       slurm_overrides or {}, wait=wait)
            else:
                stopped = _run_local(path, study, specs, todo, out_dir, jobs, device,
                                     progress, failures, say)
        else:
            failures.update(recorded_failures(specs))
        report = write_study_report(study, specs, out_dir, failures)
        say(f"report: {report}")
    outcome = StudyOutcome(report, failures, pending, stopped)
    if failures and not only_report:
        raise StudyFailed({s.name: failures[s.name] for s in specs if s.name in failures},
                          report, outcome)
    return outcome


def recorded_failures(specs: list[RunSpec]) -> dict[str, str]:
    """name -> message of the runs whose <run>/study-failed.json says they failed."""
    messages = {spec.name: recorded_failure(spec.run_dir) for spec in specs}
    return {name: message for name, message in messages.items() if message is not None}


def _make_shards(study: StudyConfig, specs: list[RunSpec], failures: dict, say) -> None:
    """Every run's shards, one after the other in this process: runs that need the same data
    share one directory, which is then made once, never by two workers at a time."""
    for spec in specs:
        (spec.run_dir / FAILURE_RECORD).unlink(missing_ok=True)
    for spec in specs:
        try:
            make_run_shards(study, spec, False)
        except Exception as e:  # that run fails; the others go on
            failures[spec.name] = f"shards: {type(e).__name__}: {e}"
            record_failure(spec.run_dir, "shards", e, failures[spec.name])
            say(f"{spec.name}: shards FAILED ({type(e).__name__}: {e}); continuing with the others")


def worker_command(path: str | os.PathLike, out_dir: Path, spec: RunSpec, device: str,
                   progress: bool) -> list[str]:
    return [sys.executable, "-m", "ambient_dist.study.worker", str(path), "--out", str(out_dir),
            "--run", spec.name, "--device", device] + ([] if progress else ["--quiet"])


def _run_local(path, study: StudyConfig, specs: list[RunSpec], todo: list[RunSpec],
               out_dir: Path, jobs: int, device: str, progress: bool, failures: dict,
               say) -> list[str]:
    """One worker process per run, `jobs` at a time, each in its own process group; returns
    the runs whose workers were stopped by a signal of their own."""
    from ambient_dist.study.report import write_study_report
    gpus: list[str] = []
    if device != "cpu":
        import torch
        gpus = [str(i) for i in range(torch.cuda.device_count())]
    threads = None if gpus or jobs <= 1 else max(1, (os.cpu_count() or 1) // jobs)
    index = {s.name: i for i, s in enumerate(specs)}
    queue = list(todo)
    running: dict[str, tuple[subprocess.Popen, RunSpec, Optional[str]]] = {}
    stopped: list[int] = []
    interrupted: list[str] = []
    say(f"{len(specs)} runs in {out_dir}: " + ", ".join(s.name for s in specs))

    def start(spec: RunSpec) -> None:
        free = [g for g in gpus if g not in {r[2] for r in running.values()}]
        # A GPU of its own while there are free ones; beyond that they are shared in turn.
        gpu = free[0] if free else gpus[index[spec.name] % len(gpus)] if gpus else None
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        with open(spec.run_dir / "worker.log", "ab") as log:
            proc = subprocess.Popen(worker_command(path, out_dir, spec, device, progress),
                                    stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        running[spec.name] = (proc, spec, gpu)
        say(f"[{index[spec.name] + 1}/{len(specs)}] {spec.name}: started (worker pid {proc.pid}, "
            f"{spec.config.train.total_kimg:g}k training images{', GPU ' + gpu if gpu else ''}; "
            f"log {spec.run_dir / 'worker.log'})")

    def finished(name: str, rc: int) -> None:
        proc, spec, _ = running.pop(name)
        kill_group(proc.pid)  # anything its worker left behind
        tag = f"[{index[name] + 1}/{len(specs)}] {name}"
        if rc == 0:
            say(f"{tag}: done")
            write_study_report(study, specs, out_dir, failures)  # results so far
        elif rc > 128 or rc < 0:  # stopped by a signal (its own, or the study's)
            interrupted.append(name)
            say(f"{tag}: stopped ({_describe_status(rc)}); its checkpoint is kept")
        else:
            failures[name] = recorded_failures([spec]).get(name) or _last_error(spec, rc)
            stage, _, error = failures[name].partition(": ")
            say(f"{name}: {stage} FAILED ({error}); continuing with the others")

    signalled: set[int] = set()

    def forward(signum: int) -> None:
        stopped.append(signum)
        for proc, _, _ in list(running.values()):
            if proc.pid not in signalled:  # once each: a worker is stopping already
                signalled.add(proc.pid)
                try:
                    os.kill(proc.pid, signum)  # the worker forwards it to its trainer
                except ProcessLookupError:
                    pass

    with handle_signals(forward):
        while (queue or running) and not stopped:
            while queue and len(running) < jobs and not stopped:
                start(queue.pop(0))
            for name, (proc, _, _) in list(running.items()):
                if proc.poll() is not None:
                    finished(name, proc.returncode)
            if running:
                time.sleep(POLL_S)
        if stopped:
            # Every running worker got the signal (forward; again here for one started while
            # the signal came); wait until each has stopped (its trainer checkpoints first).
            forward(stopped[0])
            for name, (proc, _, _) in list(running.items()):
                wait_polling(proc)
                finished(name, proc.returncode)
    if stopped:
        name = signal.Signals(stopped[0]).name
        parts = [f"{len(interrupted)} run(s) stopped at their checkpoints"
                 + (f" ({', '.join(interrupted)})" if interrupted else "")]
        if queue:
            parts.append(f"{len(queue)} not started ({', '.join(s.name for s in queue)})")
        raise Interrupted(stopped[0], f"interrupted by {name}: " + "; ".join(parts)
                          + f"; {continue_hint(path, out_dir)}")
    return interrupted


def _describe_status(rc: int) -> str:
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    try:
        return f"exit {rc}, {signal.Signals(rc - 128).name}"
    except ValueError:
        return f"exit {rc}"


def _last_error(spec: RunSpec, rc: int) -> str:
    """The last `error:` line of a worker that failed without a record (refused, bad args)."""
    log = spec.run_dir / "worker.log"
    try:
        lines = [l for l in log.read_text(errors="replace").splitlines() if l.startswith("error: ")]
    except OSError:
        lines = []
    return f"run: {lines[-1][len('error: '):]}" if lines else f"run: worker exited with {rc} (log {log})"
