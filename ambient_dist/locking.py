"""One owner per directory: a study directory or a run directory is locked while in use.

    with DirectoryLock(run_dir, "run directory"):
        ...                         # a second process asking for run_dir is refused

The lock is `filelock.FileLock` on `<dir>/.lock`, which on POSIX is `flock(2)` on that file.
The kernel releases an flock when the process holding it dies (however it dies: SIGKILL, an
out-of-memory kill, a node reboot of a local disk), so a lock file left on disk by a dead
process never blocks anyone: the next owner's flock on it simply succeeds. No pid is ever
compared to decide staleness; the pid and host written beside the lock (`<dir>/.lock.owner`,
JSON) are only there to name the owner in the refusal message.

A second owner is refused at once (no waiting) with `DirectoryInUse`, a UserError naming the
directory, the owner's pid, host and command, and since when it holds it.

A process may hand its ownership to the processes it starts (the study's worker to its
trainer, a trainer's launcher to its ranks): `child_env()` gives the environment variable
that names the held locks with a random token; a `DirectoryLock` on the same directory in a
descendant that sees its directory and token there, matching the owner file, takes the lock
as already held by its ancestor (it neither acquires nor releases it). A token is never
guessed: only a process that was given the environment can share a lock.

The lock files stay (filelock never deletes an flock's file: waiters must share one inode).
flock works on local disks and on NFSv4 (Linux maps it to a POSIX lock there); a file system
without it (some Lustre mounts) makes filelock fall back to its soft lock, whose staleness
detection filelock does itself.

This module imports only errors and fileio (a low helper, usable from every layer).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from ambient_dist.errors import UserError
from ambient_dist.fileio import atomic_write_json

# The environment variable naming the locks a process shares with its descendants:
# os.pathsep-separated "<absolute dir>=<token>" entries.
SHARED_LOCKS_ENV = "AMBIENT_DIST_HELD_LOCKS"
LOCK_NAME = ".lock"
OWNER_NAME = ".lock.owner"


class DirectoryInUse(UserError):
    """Another process (named in the message: pid, host, command) owns the directory."""


def _shared_tokens(env: Optional[dict] = None) -> dict[str, str]:
    raw = (os.environ if env is None else env).get(SHARED_LOCKS_ENV, "")
    out = {}
    for entry in raw.split(os.pathsep):
        path, sep, token = entry.rpartition("=")
        if sep and path:
            out[path] = token
    return out


def read_owner(directory: str | os.PathLike) -> Optional[dict]:
    """The owner record of a directory's lock ({pid, host, command, since, token}), or None."""
    try:
        return json.loads((Path(directory) / OWNER_NAME).read_text())
    except (OSError, ValueError):
        return None


def describe_owner(owner: Optional[dict]) -> str:
    if not owner:
        return "another process (its pid is not recorded yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    return (f"pid {owner.get('pid')} on host {owner.get('host')} since {since} "
            f"({owner.get('command', '?')})")


class DirectoryLock:
    """An exclusive, non-blocking lock on a directory (created if missing).

    `what` names the directory in messages ("study directory", "run directory"). Use as a
    context manager, or acquire()/release(). acquire() raises DirectoryInUse when another
    process owns the directory; with create=False a missing directory is a UserError
    ("<what> <dir>: not found") instead of being made (a run that must exist already)."""

    def __init__(self, directory: str | os.PathLike, what: str = "directory", create: bool = True):
        from filelock import FileLock
        self.directory = Path(directory).resolve()
        self.what = what
        self.create = create
        self._lock = FileLock(str(self.directory / LOCK_NAME), timeout=0)
        self.token: Optional[str] = None
        self.inherited = False

    def acquire(self) -> "DirectoryLock":
        from filelock import Timeout
        if not self.create and not self.directory.is_dir():
            raise UserError(f"{self.what} {self.directory}: not found")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{self.what} {self.directory}: cannot be created ({e.strerror})") from None
        shared = _shared_tokens().get(str(self.directory))
        if shared is not None:
            owner = read_owner(self.directory)
            if owner and owner.get("token") == shared and self._held_by_someone():
                self.token, self.inherited = shared, True  # an ancestor holds it for us
                return self
        try:
            self._lock.acquire()
        except Timeout:
            owner = None
            for _ in range(20):  # the owner writes its record just after its flock succeeds
                owner = read_owner(self.directory)
                if owner:
                    break
                time.sleep(0.05)
            raise DirectoryInUse(
                f"{self.what} {self.directory} is in use by {describe_owner(owner)}; wait for it "
                "to finish or stop it (a lock left by a process that died does not block)") from None
        except OSError as e:  # Timeout is an OSError too: it is caught first
            raise UserError(f"{self.what} {self.directory}: cannot be locked ({e.strerror})") from None
        self.token = uuid.uuid4().hex
        atomic_write_json(self.directory / OWNER_NAME, {
            "pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
            "command": " ".join(sys.argv) or sys.executable, "token": self.token})
        return self

    def _held_by_someone(self) -> bool:
        """Is the flock held right now (by the ancestor that shared it)? Probed without
        waiting; a probe that wins means the ancestor is gone: release it again."""
        from filelock import FileLock, Timeout
        probe = FileLock(str(self.directory / LOCK_NAME), timeout=0, thread_local=False)
        try:
            probe.acquire()
        except Timeout:
            return True
        probe.release()
        return False

    def release(self) -> None:
        if self.token is None:
            return
        if not self.inherited:
            # The owner record goes first: a reader never sees a record of a released lock
            # naming this process as its owner for longer than this line.
            if (read_owner(self.directory) or {}).get("token") == self.token:
                (self.directory / OWNER_NAME).unlink(missing_ok=True)
            self._lock.release()
        self.token, self.inherited = None, False

    @property
    def held(self) -> bool:
        return self.token is not None

    def child_env(self) -> dict[str, str]:
        """{SHARED_LOCKS_ENV: ...}: add to a child's environment to share this lock with it."""
        if self.token is None:
            raise RuntimeError(f"{self.directory}: child_env() of a lock that is not held")
        tokens = {**_shared_tokens(), str(self.directory): self.token}
        return {SHARED_LOCKS_ENV: os.pathsep.join(f"{p}={t}" for p, t in tokens.items())}

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_for_launch(directory: str | os.PathLike, what: str = "run directory", is_main: bool = True,
                    any_rank_refused: Callable[[bool], bool] = lambda refused: refused,
                    create: bool = True) -> DirectoryLock:
    """The lock on `directory` for every rank of one launch: the main rank takes it for all
    (they are one owner), and every rank stops when it is refused, so that a second launch
    never works beside the first. `any_rank_refused(flag) -> bool` is the launch's collective
    "any rank says so" (given by the caller: this module stays below the process group's);
    the default is a single process. `create` as for DirectoryLock. Raises DirectoryInUse
    (or the missing directory's UserError) on every rank; release() the lock when done."""
    lock = DirectoryLock(directory, what, create)
    refused: Optional[UserError] = None
    if is_main:
        try:
            lock.acquire()
        except UserError as e:  # in use, or (create=False) not there
            refused = e
    if any_rank_refused(refused is not None):
        lock.release()
        raise refused or DirectoryInUse(f"{what} {lock.directory} is in use by another launch "
                                        "(rank 0 of this launch says by whom)")
    return lock
