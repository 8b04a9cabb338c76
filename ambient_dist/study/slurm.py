"""`ambient-study --executor slurm`: one SLURM job per run, through submitit.

    ambient-study STUDY.yaml --executor slurm --partition gpu --nodes 4 --gpus-per-node 8

Each run (shards made beforehand on the submitting machine) is one job that runs all of its
stages (study.stages.run_one: train, sample, evaluate) inside its allocation; the report is
written on the submitting machine. The callable is a submitit Checkpointable (`RunJob`): when
SLURM preempts the job or its time limit nears, submitit's signal (USR2, sbatch
--signal=USR2@90) makes it ask the trainer to checkpoint (SIGTERM), wait for it, and requeue
the job, which then continues from that checkpoint (ambient-train --resume auto). A SIGTERM
alone (preemption's first signal) also stops the trainer at a checkpoint; the job then waits
for the requeue.

The job registry, <study>/slurm/jobs.json, maps each run to its job id and the key of what
it was submitted for (the run's config and the study's data and evaluation sections).
Running `ambient-study STUDY.yaml --executor slurm` again shows every job's state, collects
what finished (a failed job's error becomes the run's failure), and submits only the runs that
are neither done (a completed job of the same key) nor queued nor running. `--wait` polls
until every job has ended.

Multi-node runs (slurm.nodes > 1): the job has one task per node; task 0 runs the stages, and
every task starts `torchrun --nnodes N --nproc-per-node G --node-rank i` for the trainer (the
runs' configs need distributed.engine=deepspeed), the command handed over in
<run>/.launch-<job>.json.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Optional

from submitit.helpers import Checkpointable

from ambient_dist.config import to_dict
from ambient_dist.study.config import RunSpec, StudyConfig, StudyError, StudySlurm
from ambient_dist.study.process import LAUNCH_ENV, torchrun_command

# SLURM states of a job that is still going (sacct's names; REQUEUED between two attempts).
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED",
          "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "PREEMPTED"}
WAIT_FOR_REQUEUE_S = 300


def check_slurm(s: StudySlurm) -> None:
    """Refuse settings SLURM would refuse later, naming the key (StudyError)."""
    def bad(key: str, msg: str):
        raise StudyError(f"slurm.{key}: {msg}")
    for key in ("nodes", "time_min", "cpus_per_task"):
        if getattr(s, key) < 1:
            bad(key, f"must be >= 1, got {getattr(s, key)}")
    if s.gpus_per_node < 0:
        bad("gpus_per_node", f"must be >= 0, got {s.gpus_per_node}")
    if s.max_requeues < 0 or s.mem_gb < 0:
        bad("max_requeues" if s.max_requeues < 0 else "mem_gb", "must be >= 0")
    for opt in s.sbatch:
        if not opt.startswith("--") or len(opt) < 3:
            bad("sbatch", f"{opt!r}: give long sbatch options, e.g. --qos=high or --exclusive")


def check_ranks(s: StudySlurm, specs: list[RunSpec]) -> None:
    """A job of several ranks (nodes x gpus_per_node > 1) trains through torchrun, which the
    plain engine refuses at start: refused here, before anything is submitted (StudyError
    naming the runs and the override that fixes it)."""
    ranks = s.nodes * max(s.gpus_per_node, 1)
    plain = [spec.name for spec in specs if spec.config.distributed.engine != "deepspeed"]
    if ranks > 1 and plain:
        raise StudyError(f"slurm.nodes {s.nodes} x slurm.gpus_per_node {s.gpus_per_node} = {ranks} "
                         f"ranks per run need distributed.engine=deepspeed, but {len(plain)} run(s) "
                         f"use the plain single-process engine ({', '.join(plain[:4])}"
                         f"{', ...' if len(plain) > 4 else ''}): add `distributed.engine=deepspeed` "
                         "to the study file's overrides, or use --gpus-per-node 1 --nodes 1")


def preflight(s: StudySlurm) -> None:
    """What must hold before anything is made for a SLURM study (StudyError otherwise)."""
    check_slurm(s)
    if not _have("srun"):
        raise StudyError("--executor slurm: no `srun` on PATH (not on a SLURM cluster's login node?)")


def sbatch_options(options: list[str]) -> dict:
    """["--qos=high", "--exclusive"] -> {"qos": "high", "exclusive": True} (submitit's
    additional_parameters, written as #SBATCH lines)."""
    out: dict = {}
    for opt in options:
        key, eq, value = opt[2:].partition("=")
        out[key] = value if eq else True
    return out


def run_key(study: StudyConfig, spec: RunSpec) -> str:
    """What a run's job was submitted for: its config and the study's data and evaluation."""
    blob = json.dumps([to_dict(spec.config), to_dict(study.data), to_dict(study.evaluation)],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Registry:
    """<study>/slurm/jobs.json: run name -> {job_id, key, submitted} (atomic writes)."""

    def __init__(self, folder: Path):
        self.path = folder / "jobs.json"
        try:
            self.jobs: dict = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.jobs = {}

    def save(self) -> None:
        from ambient_dist.fileio import atomic_write_json
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.jobs)


def make_executor(folder: Path, s: StudySlurm, name: str):
    import submitit
    preflight(s)
    ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=s.max_requeues)
    extra = sbatch_options(s.sbatch)
    if s.mem_gb:
        extra.setdefault("mem", f"{int(s.mem_gb * 1024)}M")
    params = dict(job_name=name, time=s.time_min, nodes=s.nodes, ntasks_per_node=1,
                  cpus_per_task=s.cpus_per_task, additional_parameters=extra,
                  setup=list(s.setup), stderr_to_stdout=True)
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if s.partition:
        params["partition"] = s.partition
    if s.account:
        params["account"] = s.account
    ex.update_parameters(**params)
    return ex


def _have(program: str) -> bool:
    import shutil
    return shutil.which(program) is not None


def run_on_slurm(path, study: StudyConfig, todo: list[RunSpec], out_dir: Path, device: str,
                 failures: dict, say, overrides: dict, wait: bool = False) -> dict[str, str]:
    """Show each run's job, collect what finished, submit what is neither done nor queued
    nor running; returns name -> state of the runs still queued or running."""
    import submitit
    s = dataclasses.replace(study.slurm, **overrides)
    check_slurm(s)
    folder = out_dir / "slurm"
    registry = Registry(folder)
    pending: dict[str, str] = {}
    submit: list[RunSpec] = []
    for spec in todo:
        entry = registry.jobs.get(spec.name)
        key = run_key(study, spec)
        if entry is None:
            submit.append(spec)
            continue
        job = submitit.SlurmJob(folder=str(folder), job_id=str(entry["job_id"]))
        state = job.watcher.get_state(job.job_id, mode="force")
        if state in ACTIVE or state == "UNKNOWN" and not job.paths.result_pickle.exists():
            say(f"{spec.name}: job {job.job_id} {state}")
            pending[spec.name] = state
            if entry.get("key") != key:
                say(f"{spec.name}: the study file changed since job {job.job_id} was submitted; "
                    f"it finishes as submitted (scancel {job.job_id} and run again to redo it)")
            continue
        outcome, error = _collect(job)
        if outcome == "done" and entry.get("key") == key:
            say(f"{spec.name}: job {job.job_id} {state}: done")
            continue
        if outcome == "failed":
            failures[spec.name] = error
            say(f"{spec.name}: job {job.job_id} {state}: FAILED ({error}); resubmitting it")
        submit.append(spec)
    if submit:
        for spec in submit:
            failures.pop(spec.name, None)  # it runs again: its result is the new job's
        ex = make_executor(folder, s, study.name)
        for spec in submit:  # one job each (not an array: each is requeued on its own)
            job = ex.submit(RunJob(), str(Path(path).resolve()), str(out_dir.resolve()),
                            spec.name, device)
            registry.jobs[spec.name] = {"job_id": job.job_id, "key": run_key(study, spec),
                                        "submitted": time.time()}
            pending[spec.name] = "SUBMITTED"
            say(f"{spec.name}: submitted job {job.job_id} ({s.nodes} node(s) x "
                f"{s.gpus_per_node} GPU(s), {s.time_min} min per attempt)")
        registry.save()
    if wait and pending:
        from ambient_dist.study.process import Interrupted
        try:
            return _wait(study, todo, folder, registry, failures, say)
        except Interrupted as e:
            raise Interrupted(e.signum, f"stopped waiting ({signal.Signals(e.signum).name}); the "
                              f"SLURM jobs go on (scancel stops them): run `ambient-study {path} "
                              f"--out {out_dir} --executor slurm` again to see them") from None
    return pending


def _collect(job) -> tuple[str, str]:
    """('done', '') | ('failed', message) | ('lost', why) for a job that has ended."""
    if not job.paths.result_pickle.exists():
        return "lost", "no result (cancelled or killed)"
    try:
        job.result()
        return "done", ""
    except Exception as e:  # submitit's FailedJobError carries the job's traceback
        lines = [l for l in str(e).strip().splitlines() if l.strip()]
        return "failed", lines[-1] if lines else type(e).__name__


def _wait(study, todo, folder: Path, registry: Registry, failures: dict, say) -> dict[str, str]:
    import submitit
    from ambient_dist.study.process import raise_on_signals
    with raise_on_signals():  # Ctrl-C stops waiting; the jobs go on (scancel stops them)
        while True:
            pending = {}
            for spec in todo:
                entry = registry.jobs.get(spec.name)
                if entry is None:
                    continue
                job = submitit.SlurmJob(folder=str(folder), job_id=str(entry["job_id"]))
                state = job.watcher.get_state(job.job_id, mode="force")
                if state in ACTIVE or state == "UNKNOWN" and not job.paths.result_pickle.exists():
                    pending[spec.name] = state
                    continue
                outcome, error = _collect(job)
                if outcome != "done":
                    failures[spec.name] = error
            if not pending:
                return {}
            time.sleep(2.0)


class RunJob(Checkpointable):
    """One run as a SLURM job (submitit pickles this callable; requeued, it runs again and
    every stage continues from what is on disk)."""

    def __call__(self, study_path: str, out_dir: str, name: str, device: str) -> Optional[dict]:
        import submitit
        from ambient_dist.study.config import load_study
        from ambient_dist.study.process import Interrupted
        from ambient_dist.study.worker import find_spec, run_locked
        env = submitit.JobEnvironment()
        if device == "auto":
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        study, specs = load_study(study_path, out_dir, check_source=False)
        spec = find_spec(specs, name)
        s = study.slurm
        nodes, gpus = env.num_nodes, max(1, s.gpus_per_node)
        # One hand-over file per attempt: a requeued job starts again with the same job id.
        attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
        launch_file = spec.run_dir / f".launch-{env.job_id}-{attempt}.json"
        if nodes > 1 or gpus > 1:
            os.environ[LAUNCH_ENV] = json.dumps({
                "nnodes": nodes, "nproc_per_node": gpus, "node_rank": env.node,
                "master_addr": env.hostnames[0], "master_port": 29500 + int(env.raw_job_id) % 1000,
                "launch_file": str(launch_file)})
        if env.global_rank != 0:
            return _follow(launch_file)
        try:
            return run_locked(study, spec, device, progress=False)
        except Interrupted as e:
            # SIGTERM (preemption's first signal) stopped the trainer at a checkpoint; SLURM's
            # USR2 (submitit: checkpoint + requeue) or SIGKILL comes next. Wait for either.
            print(f"{name}: {e}; waiting for the requeue", flush=True)
            time.sleep(WAIT_FOR_REQUEUE_S)
            raise RuntimeError(f"{name}: stopped by {signal.Signals(e.signum).name} and not "
                               "requeued; run the study again to resubmit it") from None
        finally:
            if nodes > 1:
                Path(str(launch_file) + ".done").touch()

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on USR2 (preemption, time limit): the trainer checkpoints and
        exits (SIGTERM), then the same call is requeued; it resumes from that checkpoint."""
        from ambient_dist.study.process import stop_current_child
        stop_current_child(signal.SIGTERM, timeout_s=80)  # within sbatch --signal=USR2@90
        return super().checkpoint(*args, **kwargs)


def _follow(launch_file: Path) -> None:
    """Tasks 1.. of a multi-node job: start this node's torchrun when task 0 hands over the
    trainer command; end when task 0 is done."""
    from ambient_dist.study.process import run_child
    done = Path(str(launch_file) + ".done")
    started = None
    while not done.exists():
        if launch_file.exists() and started != launch_file.stat().st_mtime:
            started = launch_file.stat().st_mtime
            cmd = json.loads(launch_file.read_text())["cmd"]
            launch = json.loads(os.environ[LAUNCH_ENV])
            log = launch_file.parent / f"train-node{launch['node_rank']}.log"
            run_child(torchrun_command(cmd, launch), dict(os.environ), log)
        time.sleep(1.0)
