"""The study driver: every stage of every run that is not done yet, then the report."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

from ambient_dist.config import to_dict
from ambient_dist.study.config import RunSpec, StudyError, StudyFailed, load_study
from ambient_dist.study.stages import (FAILED_RECORD, RunFailed, _write_json,
                                       make_run_shards, run_one, training_refusal)


def _env(threads: Optional[int], device_index: Optional[str]) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if device_index is not None:
        env["CUDA_VISIBLE_DEVICES"] = device_index
    return env


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


def run_study(path: str | os.PathLike, out: Optional[str] = None, jobs: int = 1,
              device: str = "cpu", only_report: bool = False, progress: bool = True,
              retrain: Sequence[str] = ()) -> Path:
    """Run every stage that is not done yet, then write the report; returns report.md's path.

    Refused before anything starts (StudyError): a bad study file (load_study), and runs
    whose checkpoints cannot continue under the current settings (stages.training_refusal;
    `retrain` names runs to train again from scratch instead, see mark_retrain). A run that
    fails does not stop the others; once every run has been tried and the report written
    (from the runs that succeeded), StudyFailed (a StudyError) is raised with `.failures`
    {run name: "stage: error"} and `.report`. `only_report` rewrites the report from the
    results made under the current study file (naming the others) and raises nothing for
    failed runs."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from ambient_dist.study.report import write_study_report
    study, specs = load_study(path, out)
    specs = mark_retrain(specs, retrain)
    out_dir = specs[0].run_dir.parent.parent
    if only_report:
        if not out_dir.is_dir():
            raise StudyError(f"--report-only: no study directory {out_dir} (run the study first)")
        report = write_study_report(study, specs, out_dir, {})
        if progress:
            print(f"[study] report: {report}", flush=True)
        return report
    refusals = [r for r in (training_refusal(s) for s in specs) if r]
    if refusals:
        raise StudyError(" | ".join(refusals))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "study.yaml").write_text(yaml.safe_dump(to_dict(study), sort_keys=False))
    failures: dict[str, str] = {}
    say = (lambda msg: print(f"[study] {msg}", flush=True)) if progress else (lambda msg: None)
    say(f"{len(specs)} runs in {out_dir}: " + ", ".join(s.name for s in specs))
    # The shard stage is shared by runs with the same data plan: one at a time, up front.
    for spec in specs:
        try:
            make_run_shards(study, spec, False)
        except Exception as e:  # one failed run must not stop the others: record and go on
            import traceback
            failures[spec.name] = f"shards: {type(e).__name__}: {e}"
            _write_json(spec.run_dir / FAILED_RECORD,
                        {"stage": "shards", "error": str(e), "traceback": traceback.format_exc()})
            say(f"{spec.name}: shards FAILED ({type(e).__name__}: {e}); continuing with the others")
    todo = [s for s in specs if s.name not in failures]
    gpus = [str(i) for i in range(torch.cuda.device_count())] if device != "cpu" else []
    threads = None if gpus or jobs <= 1 else max(1, (os.cpu_count() or 1) // jobs)

    def one(i: int, spec: RunSpec) -> None:
        gpu = gpus[i % len(gpus)] if gpus else None
        try:
            run_one(study, spec, device, progress, env=_env(threads, gpu))
        except RunFailed as e:
            failures[spec.name] = f"{e.stage}: {e.error}"
            say(f"{spec.name}: {e.stage} FAILED ({e.error}); continuing with the others")

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = [pool.submit(one, i, spec) for i, spec in enumerate(todo)]
        for future in as_completed(futures):
            future.result()
            write_study_report(study, specs, out_dir, failures)  # results so far
    report = write_study_report(study, specs, out_dir, failures)
    say(f"report: {report}")
    if failures:
        raise StudyFailed({s.name: failures[s.name] for s in specs if s.name in failures}, report)
    return report
