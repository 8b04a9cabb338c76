"""Process control of `ambient-study` (study/process.py, study/worker.py, the local executor of
study/runner.py) with real processes and real signals: one owner per study and run directory,
SIGINT / SIGTERM stop every run at a checkpoint, start no queued run, leave no process behind,
exit 130 / 143, and a rerun continues from the checkpoints."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from ambient_dist.engine.checkpoint import CheckpointManager
from ambient_dist.locking import DirectoryLock
from helpers import alive, descendants, toy_study, wait_for

NEVER_ENDS = 1000  # kimg: a run the test stops


def write(tmp_path: Path, study: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(study))
    return path


def start_study(path: Path, out: Path, *args: str) -> subprocess.Popen:
    """ambient-study in a session of its own (its process group is what Ctrl-C reaches)."""
    return subprocess.Popen([sys.executable, "-m", "ambient_dist.cli.study", str(path), "--out",
                             str(out), "--device", "cpu", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def checkpoint_images(run: Path) -> int:
    latest = CheckpointManager(run, 1).latest()
    return json.loads((latest / "meta.json").read_text())["images_seen"] if latest else 0


def three_runs(total_kimg) -> dict:
    return toy_study(total_kimg=total_kimg, runs=[{"name": "a", "sigma_tn": 0.0},
                                                  {"name": "b", "sigma_tn": 0.5},
                                                  {"name": "c", "sigma_tn": 1.0}])


def test_sigint_stops_the_study_at_a_checkpoint_and_a_rerun_continues(tmp_path):
    path, out = write(tmp_path, three_runs(NEVER_ENDS)), tmp_path / "out"
    runs = {n: out / "runs" / f"{n}-n12-s0" for n in "abc"}
    study = start_study(path, out)
    try:
        wait_for(lambda: checkpoint_images(runs["a"]) > 0, what="run a's first checkpoint")
        family = descendants(study.pid)
        assert len(family) >= 2  # the worker and its trainer

        # One owner per directory: a second study and an ambient-train on run a are refused.
        second = subprocess.run([sys.executable, "-m", "ambient_dist.cli.study", str(path), "--out",
                                 str(out), "--device", "cpu"], capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert f"study directory {out.resolve()} is in use by pid {study.pid}" in second.stderr
        worker = json.loads((runs["a"] / ".lock.owner").read_text())["pid"]
        assert worker in family
        train = subprocess.run([sys.executable, "-m", "ambient_dist.cli.train", "--config",
                                str(runs["a"] / "config.yaml"), "--run-dir", str(runs["a"]),
                                "--resume", "auto"], capture_output=True, text=True, timeout=300)
        assert train.returncode == 2
        assert f"run directory {runs['a'].resolve()} is in use by pid {worker}" in train.stderr

        os.killpg(study.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
        stdout, stderr = study.communicate(timeout=300)
    finally:
        if study.poll() is None:
            os.killpg(study.pid, signal.SIGKILL)
    assert study.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped: interrupted by SIGINT: 1 run(s) stopped at their checkpoints (a-n12-s0)")
    assert "2 not started (b-n12-s0, c-n12-s0)" in last and f"ambient-study {path} --out {out}" in last
    assert "Traceback" not in stderr
    assert [pid for pid in family if alive(pid)] == []
    # Run a stopped at a checkpoint (not FAILED); b and c never started.
    stopped_at = checkpoint_images(runs["a"])
    assert stopped_at > 0 and "SIGINT: checkpoint saved at" in (runs["a"] / "train.log").read_text()
    assert not (runs["a"] / "study-failed.json").exists() and "FAILED" not in stdout
    for name in "bc":
        assert not (runs[name] / "worker.log").exists() and not (runs[name] / "checkpoints").exists()

    # The rerun (run a alone, now two batches past where it stopped: a schedule it can still
    # reach is a resumable change) continues from that checkpoint.
    shorter = write(tmp_path, {**three_runs((stopped_at + 32) / 1000),
                               "runs": [{"name": "a", "sigma_tn": 0.0}]}, "a.yaml")
    rerun = subprocess.run([sys.executable, "-m", "ambient_dist.cli.study", str(shorter), "--out",
                            str(out), "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from {CheckpointManager(runs['a'], 1).root}" in (runs["a"] / "train.log").read_text()
    assert f"at {stopped_at} images" in (runs["a"] / "train.log").read_text()
    assert (runs["a"] / "study-eval.json").is_file()


def test_sigterm_stops_every_running_run_and_exits_143(tmp_path):
    """Two runs at once (--jobs 2); SIGTERM to the study's pid alone (kill, docker stop)."""
    path, out = write(tmp_path, toy_study(total_kimg=NEVER_ENDS)), tmp_path / "out"
    runs = [out / "runs" / n for n in ("ddpm-n12-s0", "ambient-0.5-n12-s0")]
    study = start_study(path, out, "--jobs", "2")
    try:
        wait_for(lambda: all(checkpoint_images(r) > 0 for r in runs), what="both runs' first checkpoints")
        family = descendants(study.pid)
        assert len(family) >= 4  # two workers, two trainers
        study.send_signal(signal.SIGTERM)
        stdout, stderr = study.communicate(timeout=300)
    finally:
        if study.poll() is None:
            os.killpg(study.pid, signal.SIGKILL)
    assert study.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1].startswith(
        "stopped: interrupted by SIGTERM: 2 run(s) stopped at their checkpoints")
    assert [pid for pid in family if alive(pid)] == []
    for run in runs:
        assert "SIGTERM: checkpoint saved at" in (run / "train.log").read_text()
        assert not (run / "study-failed.json").exists()


def test_a_worker_whose_study_is_killed_stops_its_trainer_at_a_checkpoint(tmp_path):
    """SIGKILL cannot be forwarded: the worker notices its parent is gone and stops itself."""
    path, out = write(tmp_path, toy_study(total_kimg=NEVER_ENDS, runs=[{"name": "ddpm"}])), tmp_path / "out"
    run = out / "runs" / "ddpm-n12-s0"
    study = start_study(path, out)
    try:
        wait_for(lambda: checkpoint_images(run) > 0, what="the first checkpoint")
        family = descendants(study.pid)
        study.send_signal(signal.SIGKILL)
        study.wait(timeout=60)
        wait_for(lambda: not any(alive(p) for p in family), what="the worker and trainer to stop")
    finally:
        for pid in descendants(study.pid):
            os.kill(pid, signal.SIGKILL)
    assert "SIGTERM: checkpoint saved at" in (run / "train.log").read_text()
    # The dead study's lock file is still there; it does not block the next owner.
    assert (out / ".lock").exists() and json.loads((out / ".lock.owner").read_text())["pid"] == study.pid
    with DirectoryLock(out, "study directory"):
        pass
