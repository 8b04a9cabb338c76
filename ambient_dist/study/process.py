"""Process control of a study: signals reach every child, children stop cleanly, nothing stays.

The processes of a study on one machine (`--executor local`):

    ambient-study            holds the study directory's lock; starts one worker per run,
      |                      --jobs at a time, each in its own process group
      +- worker (one run)    python -m ambient_dist.study.worker: holds the run directory's
           |                 lock, runs the run's stages (study.stages.run_one)
           +- trainer        ambient-train, started by stages.launch_training -> run_child

A SIGINT or SIGTERM to the study (Ctrl-C reaches the study's process group; kill, docker stop
reach its pid) is forwarded to every running worker; a worker forwards it to its trainer,
which checkpoints and exits (engine.trainer.StopFlag); queued runs are never started. A worker
that is not training when the signal comes (sampling, evaluating: both resumable or redone)
stops at once. Each worker exits with 128 + the signal's number, the study waits for them all,
then kills whatever is left in their process groups (nothing, normally) and exits 130
(SIGINT) or 143 (SIGTERM). A worker whose study dies without a word (SIGKILL) notices that
its parent is gone and stops the same way.

`Interrupted` is what a stopped process raises: a BaseException, so that no `except
Exception` on the way records an interruption as a failure.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

# The environment variable that makes launch_training start the trainer through torchrun
# (JSON: nnodes, nproc_per_node, node_rank, master_addr, master_port, launch_file; set by a
# multi-GPU SLURM job, study/slurm.py).
LAUNCH_ENV = "AMBIENT_STUDY_TORCHRUN"
# The signals a study, a worker and launch_training turn into a clean stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_S = 0.1


def exit_status(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (130, 143)."""
    return 128 + int(signum)


class Interrupted(BaseException):
    """A stop signal ended this work; it continues from its checkpoints when run again."""

    def __init__(self, signum: int, message: str = ""):
        self.signum = int(signum)
        super().__init__(message or f"stopped by {signal.Signals(self.signum).name}")

    @property
    def exit_status(self) -> int:
        return exit_status(self.signum)


@contextlib.contextmanager
def handle_signals(handler: Callable[[int], None],
                   signals: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
    """Run handler(signum) on each of `signals` inside the block (main thread only: other
    threads leave signal handling as it is), restoring the previous handlers after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda signum, frame: handler(signum)) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def raise_on_signals() -> contextlib.AbstractContextManager:
    """A block that a stop signal ends with Interrupted (the worker between its trainings).
    Only the first signal raises; later ones (a study may send its signal again) are ignored,
    so that they cannot interrupt the clean-up the first one started."""
    seen: list[int] = []

    def stop(signum: int) -> None:
        if not seen:
            seen.append(signum)
            raise Interrupted(signum)
    return handle_signals(stop)


# The trainer this process waits for right now (for a scheduler's checkpoint request:
# study.slurm asks it to checkpoint from inside a signal handler).
_current_child: Optional[subprocess.Popen] = None


def stop_current_child(signum: int = signal.SIGTERM, timeout_s: Optional[float] = None) -> None:
    """Ask the running trainer (if any) to checkpoint and exit, and wait for it to exit."""
    child = _current_child
    if child is None or child.poll() is not None:
        return
    _signal(child.pid, signum)
    wait_polling(child, timeout_s)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def wait_polling(child: subprocess.Popen, timeout_s: Optional[float] = None) -> Optional[int]:
    """child.wait() without blocking in waitpid: Popen.wait holds a lock that a signal
    handler calling wait again (stop_current_child) would deadlock on; poll takes it without
    waiting. Returns the exit status, None on timeout."""
    end = None if timeout_s is None else time.monotonic() + timeout_s
    while child.poll() is None:
        if end is not None and time.monotonic() > end:
            return None
        time.sleep(POLL_S)
    return child.returncode


def run_child(cmd: Sequence[str], env: dict, log: Path) -> int:
    """Run a trainer (cmd) to its end with stdout and stderr appended to `log`; returns its
    exit status.

    A stop signal to this process while it runs is forwarded to the trainer, which
    checkpoints and exits; this waits for that, then raises Interrupted(signal). The trainer
    is never killed: an exception here (a scheduler's SystemExit, say) also asks it to stop
    and waits, so its checkpoint is written. (subprocess.run would kill it instead.)"""
    global _current_child
    received: list[int] = []
    child: Optional[subprocess.Popen] = None

    def forward(signum: int) -> None:
        received.append(signum)
        if child is not None:
            _signal(child.pid, signum)

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out, handle_signals(forward):
        # Its own process group: a signal to this worker's group does not reach the trainer
        # twice, nor its data-loader workers at all (the trainer stops them itself).
        child = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        _current_child = child
        try:
            if received:  # came while the trainer was being started
                _signal(child.pid, received[0])
            rc = wait_polling(child)
        except BaseException:
            if child.poll() is None:
                _signal(child.pid, signal.SIGTERM)
                wait_polling(child)
            raise
        finally:
            _current_child = None
            kill_group(child.pid)
    if received:
        raise Interrupted(received[0], f"stopped by {signal.Signals(received[0]).name} "
                          f"(the trainer exited with {rc}; it checkpoints before it exits)")
    return rc


def kill_group(pgid: int) -> None:
    """SIGKILL whatever is left in a finished child's process group (its leader has exited:
    what remains would be orphans, e.g. a data-loader worker)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def watch_parent(on_orphaned: Callable[[], None], interval_s: float = 1.0) -> None:
    """Call on_orphaned() (from a daemon thread) once the parent of this process is gone
    (its parent pid changes: it was re-parented to init or a subreaper)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        on_orphaned()
    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def with_launcher(cmd: list[str], env: dict) -> list[str]:
    """The trainer command as this job must start it: unchanged, or through torchrun on every
    node of a multi-GPU / multi-node allocation (LAUNCH_ENV, set by study.slurm.RunJob).
    Task 0 also hands the command to the other nodes' tasks (the launch file)."""
    spec = env.get(LAUNCH_ENV)
    if not spec:
        return list(cmd)
    launch = json.loads(spec)
    if launch["nnodes"] > 1:
        from ambient_dist.fileio import atomic_write_json
        atomic_write_json(Path(launch["launch_file"]), {"cmd": list(cmd)})
    return torchrun_command(cmd, launch)


def torchrun_command(cmd: list[str], launch: dict) -> list[str]:
    """[python, -m, module, args...] -> [python, -m, torch.distributed.run, ..., -m, module, args]."""
    if cmd[1:2] != ["-m"]:
        raise ValueError(f"not a `python -m module` command: {shlex.join(cmd)}")
    return [cmd[0], "-m", "torch.distributed.run", f"--nnodes={launch['nnodes']}",
            f"--nproc-per-node={launch['nproc_per_node']}", f"--node-rank={launch['node_rank']}",
            f"--master-addr={launch['master_addr']}", f"--master-port={launch['master_port']}",
            *cmd[1:]]
