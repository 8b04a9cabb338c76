"""The study driver: every stage of every run that is not done yet, then the report."""
from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Optional

import torch
import yaml

from ambient_dist.config import to_dict
from ambient_dist.study.config import RunSpec, load_study
from ambient_dist.study.stages import (_References, _write_json, evaluate_run, make_run_shards,
                                       sample_run, train_run)

def _env(threads: Optional[int], device_index: Optional[str]) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if device_index is not None:
        env["CUDA_VISIBLE_DEVICES"] = device_index
    return env


def run_study(path: str | os.PathLike, out: Optional[str] = None, jobs: int = 1,
              device: str = "cpu", only_report: bool = False, progress: bool = True) -> Path:
    """Run every stage that is not done yet, then write the report; returns report.md's path."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from ambient_dist.study.report import write_study_report
    study, specs = load_study(path, out)
    out_dir = specs[0].run_dir.parent.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "study.yaml").write_text(yaml.safe_dump(to_dict(study), sort_keys=False))
    failures: dict[str, str] = {}
    say = (lambda msg: print(f"[study] {msg}", flush=True)) if progress else (lambda msg: None)

    def guarded(spec: RunSpec, stage: str, fn) -> bool:
        if spec.name in failures:
            return False
        try:
            fn()
            return True
        except Exception as e:  # one failed run must not stop the others: record and go on
            failures[spec.name] = f"{stage}: {type(e).__name__}: {e}"
            _write_json(spec.run_dir / "study-failed.json",
                        {"stage": stage, "error": str(e), "traceback": traceback.format_exc()})
            say(f"{spec.name}: {stage} FAILED ({type(e).__name__}: {e}); continuing with the others")
            return False

    if not only_report:
        for spec in specs:
            (spec.run_dir / "study-failed.json").unlink(missing_ok=True)
        say(f"{len(specs)} runs in {out_dir}: " + ", ".join(s.name for s in specs))
        for spec in specs:
            guarded(spec, "shards", lambda s=spec: make_run_shards(study, s, False))
        gpus = [str(i) for i in range(torch.cuda.device_count())] if device != "cpu" else []
        threads = None if gpus or jobs <= 1 else max(1, (os.cpu_count() or 1) // jobs)

        def train_one(i: int, spec: RunSpec) -> None:
            gpu = gpus[i % len(gpus)] if gpus else None
            say(f"[{i + 1}/{len(specs)}] {spec.name}: training "
                f"({spec.config.train.total_kimg:g}k images{', GPU ' + gpu if gpu else ''})")
            if guarded(spec, "train", lambda: train_run(spec, _env(threads, gpu),
                                                        spec.run_dir / "train.log")):
                say(f"[{i + 1}/{len(specs)}] {spec.name}: trained")

        # Each run is sampled and evaluated as soon as its training ends (here, while the
        # other trainings go on in their subprocesses), so an interrupted study keeps results.
        refs = _References(study, out_dir, device)
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            futures = {pool.submit(train_one, i, spec): (i, spec) for i, spec in enumerate(specs)}
            for future in as_completed(futures):
                i, spec = futures[future]
                future.result()
                if spec.name in failures:
                    continue
                say(f"[{i + 1}/{len(specs)}] {spec.name}: sampling and evaluating")
                if guarded(spec, "sample", lambda s=spec: sample_run(study, s, device, progress)):
                    if guarded(spec, "evaluate", lambda s=spec: evaluate_run(study, s, refs, device)):
                        write_study_report(study, specs, out_dir, failures)  # results so far
    report = write_study_report(study, specs, out_dir, failures)
    say(f"report: {report}")
    return report
