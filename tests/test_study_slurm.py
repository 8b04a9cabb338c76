"""`ambient-study --executor slurm` (study/slurm.py) against a fake SLURM (tests/fake_slurm:
sbatch, srun, sacct, squeue, scancel, scontrol that run each job here, in the background, and
answer as SLURM does): each run is one job, submitted once; a rerun shows the jobs' states,
collects what finished and submits nothing that is queued, running or done; a preempted job
(SIGTERM, then submitit's USR2, as SLURM sends them) checkpoints, is requeued, resumes and ends
with the weights of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ambient_dist.engine.checkpoint import CheckpointManager
from helpers import toy_study, wait_for

FAKE_SLURM = Path(__file__).resolve().parent / "fake_slurm"


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """The fake SLURM commands first on PATH (for this process and what it starts); yields
    the fake's state directory (jobs/<id>.json, jobs/<id>.sh); stops leftover jobs after."""
    state = tmp_path / "slurm-state"
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state))
    monkeypatch.setenv("FAKE_SLURM_PYTHON", sys.executable)
    yield state
    for path in (state / "jobs").glob("*.json"):
        job = json.loads(path.read_text())
        for pid in job.get("steps", []) + [job.get("supervisor")]:
            try:
                os.killpg(pid, signal.SIGKILL) if pid else None
            except (ProcessLookupError, PermissionError):
                pass


def job(state: Path, job_id: int) -> dict:
    return json.loads((state / "jobs" / f"{job_id}.json").read_text())


def study_cli(path: Path, out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ambient_dist.cli.study", str(path), "--out", str(out),
                           "--device", "cpu", "--executor", "slurm", *args],
                          capture_output=True, text=True, timeout=timeout)


def one_run(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(toy_study(runs=[{"name": "ddpm"}], **changes)))
    return path


def test_each_run_is_one_job_submitted_once_then_collected(tmp_path, fake_slurm):
    path, out = one_run(tmp_path), tmp_path / "out"
    first = study_cli(path, out, "--partition", "gpu", "--time-min", "30", "--sbatch=--qos=high")
    assert first.returncode == 0, first.stderr
    assert "ddpm-n12-s0: submitted job 1" in first.stdout
    assert "1 run(s) queued or running on SLURM" in first.stdout
    script = (fake_slurm / "jobs" / "1.sh").read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --qos=high",
                 "#SBATCH --signal=USR2@90", "#SBATCH --nodes=1"):
        assert line in script, line

    again = study_cli(path, out)  # while it is queued or running: shown, not submitted again
    assert again.returncode == 0, again.stderr
    assert any(f"ddpm-n12-s0: job 1 {s}" in again.stdout for s in ("PENDING", "RUNNING", "COMPLETED"))
    assert not (fake_slurm / "jobs" / "2.json").exists()

    done = study_cli(path, out, "--wait")
    assert done.returncode == 0, done.stderr
    assert job(fake_slurm, 1)["state"] == "COMPLETED"
    report = json.loads((out / "report.json").read_text())
    assert [r["run"] for r in report["rows"]] == ["ddpm"]
    ev = json.loads((out / "runs" / "ddpm-n12-s0" / "study-eval.json").read_text())
    assert report["rows"][0]["kid"]["values"] == [ev["quality"]["kid"]["value"]]

    collected = study_cli(path, out)
    assert collected.returncode == 0 and "ddpm-n12-s0: job 1 COMPLETED: done" in collected.stdout
    assert not (fake_slurm / "jobs" / "2.json").exists()


def test_a_preempted_job_is_requeued_and_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, fake_slurm):
    # 30 steps, a checkpoint after each: long enough to be preempted mid-run.
    path = one_run(tmp_path, total_kimg=0.48, evaluation={**toy_study()["evaluation"]})
    study = yaml.safe_load(path.read_text())
    study["overrides"].append("train.checkpoint_every_kimg=0.016")
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "out"
    run = out / "runs" / "ddpm-n12-s0"
    assert study_cli(path, out).returncode == 0
    wait_for(lambda: CheckpointManager(run, 1).latest(), what="the job's first checkpoint")
    # Preemption as SLURM does it (and submitit's SlurmJob._interrupt imitates): SIGTERM to
    # the job's tasks, then the --signal USR2 on which submitit checkpoints and requeues.
    subprocess.run(["scancel", "1", "--signal", "SIGTERM"], check=True)
    subprocess.run(["scancel", "1", "--signal", "USR2"], check=True)
    wait_for(lambda: job(fake_slurm, 1)["restarts"] == 1, what="the requeue")

    done = study_cli(path, out, "--wait")
    assert done.returncode == 0, done.stderr
    assert job(fake_slurm, 1)["state"] == "COMPLETED"
    log = (run / "train.log").read_text()
    assert "SIGTERM: checkpoint saved at" in log and "resuming from" in log
    resumed_at = int(log.split("resuming from")[1].split(" at ")[1].split()[0])
    assert 0 < resumed_at < 480

    # The same config trained without interruption.
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "ambient_dist.cli.train", "--config",
                    str(out / "configs" / "ddpm-n12-s0" / "config.yaml"), "--run-dir", str(reference)],
                   check=True, capture_output=True, timeout=600)
    for name in ("ema.safetensors",):
        mine, theirs = load_file(str(run / name)), load_file(str(reference / name))
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name
    last = CheckpointManager(run, 1).latest()
    assert last.name == CheckpointManager(reference, 1).latest().name
    assert torch.equal(torch.cat([t.flatten() for t in load_file(str(last / "model.safetensors")).values()]),
                       torch.cat([t.flatten() for t in load_file(str(CheckpointManager(reference, 1).latest()
                                                                     / "model.safetensors")).values()]))


@pytest.mark.parametrize("args, message", [
    (["--partition", "gpu"], "--partition: a SLURM option needs --executor slurm"),
    (["--executor", "slurm", "--nodes", "0", "--check"], "slurm.nodes: must be >= 1, got 0"),
    (["--executor", "slurm", "--time-min", "0", "--check"], "slurm.time_min: must be >= 1"),
    (["--executor", "slurm", "--sbatch", "qos=high", "--check"], "slurm.sbatch: 'qos=high'"),
    # Several ranks per run need DeepSpeed (field: the README's 8-GPU command queued jobs that
    # could only die at start with the plain engine's refusal; --check said all was valid).
    (["--executor", "slurm", "--gpus-per-node", "8", "--check"],
     "slurm.nodes 1 x slurm.gpus_per_node 8 = 8 ranks per run need distributed.engine=deepspeed, "
     "but 1 run(s) use the plain single-process engine (ddpm-n12-s0): add "
     "`distributed.engine=deepspeed` to the study file's overrides"),
    (["--executor", "slurm", "--nodes", "4", "--gpus-per-node", "8"], "= 32 ranks per run need"),
])
def test_bad_slurm_settings_are_refused_naming_the_key(tmp_path, args, message):
    path = one_run(tmp_path)
    r = subprocess.run([sys.executable, "-m", "ambient_dist.cli.study", str(path), "--out",
                        str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_the_study_file_slurm_section_is_typed(tmp_path):
    from ambient_dist.study import StudyError, load_study
    path = one_run(tmp_path, slurm={"partitoin": "gpu"})
    with pytest.raises(StudyError, match=r"slurm.partitoin: unknown key \(did you mean 'partition'\?\)"):
        load_study(path, out=str(tmp_path / "out"))
    path = one_run(tmp_path, slurm={"partition": "gpu", "nodes": 4, "gpus_per_node": 8,
                                    "sbatch": ["--qos=high", "--exclusive"]})
    study, _ = load_study(path, out=str(tmp_path / "out"))
    assert (study.slurm.partition, study.slurm.nodes, study.slurm.gpus_per_node) == ("gpu", 4, 8)
    from ambient_dist.study.slurm import sbatch_options
    assert sbatch_options(study.slurm.sbatch) == {"qos": "high", "exclusive": True}


def test_without_srun_the_slurm_executor_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # python, no SLURM
    path, out = one_run(tmp_path), tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "ambient_dist.cli.study", str(path), "--out", str(out),
                        "--executor", "slurm"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "error: --executor slurm: no `srun` on PATH" in r.stderr, r.stderr


def test_a_multi_gpu_job_starts_the_trainer_through_torchrun():
    from ambient_dist.study.process import torchrun_command
    cmd = ["/py", "-m", "ambient_dist.cli.train", "--config", "c.yaml"]
    launch = {"nnodes": 4, "nproc_per_node": 8, "node_rank": 2, "master_addr": "node1", "master_port": 29501}
    assert torchrun_command(cmd, launch) == [
        "/py", "-m", "torch.distributed.run", "--nnodes=4", "--nproc-per-node=8", "--node-rank=2",
        "--master-addr=node1", "--master-port=29501", "-m", "ambient_dist.cli.train", "--config", "c.yaml"]
