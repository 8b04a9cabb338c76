"""A one-machine stand-in for SLURM's sbatch, srun, sacct, squeue, scancel and scontrol, for
the tests of `ambient-study --executor slurm` (tests/test_study_slurm.py). Only what submitit
calls, answered in the formats submitit parses:

    sbatch FILE                   -> "Submitted batch job N"; the job runs in the background
    srun [--output F] [--error F] [--unbuffered] CMD...   runs CMD as the job's one task
    sacct -o JobID,State,NodeList --parsable2 -j N ...  -> "JobID|State|NodeList" lines
    squeue -h -o "%i %T" [-j N]   -> "N STATE" lines of the jobs not ended
    scancel N [--signal SIG]      -> with --signal: send SIG to the job's tasks; else cancel
    scontrol requeue N            -> the job runs again when its current attempt ends

State lives in $FAKE_SLURM_DIR (jobs/<N>.json). Like SLURM, `scancel --signal` reaches the
job's step (the srun task's process group), not the batch script. One node, one task.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SLURM_DIR", "/tmp/fake-slurm"))
JOBS = STATE / "jobs"


def job_path(job_id) -> Path:
    return JOBS / f"{job_id}.json"


def read(job_id) -> dict:
    return json.loads(job_path(job_id).read_text())


def update(job_id, **changes) -> dict:
    # One writer at a time per job: an flock on the job's file.
    import fcntl
    with open(job_path(job_id).with_suffix(".lock"), "a") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        job = read(job_id)
        job.update(changes)
        tmp = job_path(job_id).with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(job))
        os.replace(tmp, job_path(job_id))
        return job


def sbatch(args) -> int:
    script = Path(args[-1]).read_text()
    params = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M))
    JOBS.mkdir(parents=True, exist_ok=True)
    job_id = 1
    while True:
        try:
            fd = os.open(job_path(job_id), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            job_id += 1
    (JOBS / f"{job_id}.sh").write_text(script)
    with os.fdopen(fd, "w") as f:
        json.dump({"id": job_id, "state": "PENDING", "params": params, "restarts": 0,
                   "requeue": False, "cancel": False, "steps": []}, f)
    subprocess.Popen([sys.executable, __file__, "_supervise", str(job_id)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"Submitted batch job {job_id}")
    return 0


def supervise(job_id: str) -> int:
    """Run the batch script, again after each requeue; the job's final state after the last."""
    update(job_id, supervisor=os.getpid())
    while True:
        job = update(job_id, state="RUNNING", steps=[])
        p = job["params"]
        out = (p.get("output") or f"slurm-{job_id}.out").replace("%j", job_id).replace("%t", "0")
        env = {**os.environ, "SLURM_JOB_ID": job_id, "SLURM_JOBID": job_id, "SLURM_NTASKS": "1",
               "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
               "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": socket.gethostname(),
               "SLURM_RESTART_COUNT": str(job["restarts"]), "SLURM_JOB_NAME": p.get("job-name", "")}
        with open(out, "ab") as log:
            rc = subprocess.call(["bash", str(JOBS / f"{job_id}.sh")], env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
        job = read(job_id)
        if job["requeue"] and not job["cancel"]:
            update(job_id, state="REQUEUED", requeue=False, restarts=job["restarts"] + 1)
            time.sleep(0.5)
            continue
        update(job_id, state="CANCELLED" if job["cancel"] else "COMPLETED" if rc == 0 else "FAILED",
               exit_code=rc)
        return 0


def srun(args) -> int:
    out = None
    while args and args[0].startswith("--"):
        opt = args.pop(0)
        if opt in ("--output", "--error"):
            value = args.pop(0)
            if opt == "--output":
                out = value
        elif opt.startswith("--output="):
            out = opt.split("=", 1)[1]
    job_id = os.environ["SLURM_JOB_ID"]
    if out:
        out = out.replace("%j", job_id).replace("%t", "0")
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # the task gets them (scancel --signal), not srun
    with open(out, "ab") if out else open(os.devnull, "wb") as log:
        task = subprocess.Popen(args, stdout=log if out else None, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True,
                                preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in
                                                    (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)])
        update(job_id, steps=read(job_id)["steps"] + [task.pid])
        return task.wait()


def sacct(args) -> int:
    ids = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
    print("JobID|State|NodeList")
    for job_id in ids:
        if job_path(job_id).is_file():
            print(f"{job_id}|{read(job_id)['state']}|{socket.gethostname()}")
    return 0


def squeue(args) -> int:
    for path in sorted(JOBS.glob("*.json")):
        job = json.loads(path.read_text())
        if job["state"] in ("PENDING", "RUNNING", "REQUEUED"):
            print(f"{job['id']} {job['state']}")
    return 0


def scancel(args) -> int:
    sig = None
    ids = []
    while args:
        a = args.pop(0)
        if a == "--signal" or a == "-s":
            sig = args.pop(0)
        elif a.startswith("--signal="):
            sig = a.split("=", 1)[1]
        else:
            ids.append(a)
    for job_id in ids:
        job = read(job_id)
        if sig is None:
            update(job_id, cancel=True)
            sig = "TERM"
        name = sig if sig.startswith("SIG") else "SIG" + sig
        for pgid in job["steps"]:
            try:
                os.killpg(pgid, getattr(signal, name))
            except ProcessLookupError:
                pass
    return 0


def scontrol(args) -> int:
    if args[:1] == ["requeue"]:
        update(args[1], requeue=True)
        return 0
    print(f"fake scontrol: unsupported {args}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "_supervise":
        sys.exit(supervise(args[0]))
    sys.exit({"sbatch": sbatch, "srun": srun, "sacct": sacct, "squeue": squeue,
              "scancel": scancel, "scontrol": scontrol}[command](args))
