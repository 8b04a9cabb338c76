"""One owner per directory: a second owner is refused naming the first (pid, host), a lock
left on disk by a process that died does not block, and a lock is shared with a child only
through the environment it is given."""
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from ambient_dist.locking import DirectoryInUse, DirectoryLock, read_owner
from ambient_dist.errors import UserError

HOLD = textwrap.dedent("""
    import sys, time
    from ambient_dist.locking import DirectoryLock
    lock = DirectoryLock(sys.argv[1], "run directory").acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def hold_in_subprocess(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_owner_is_refused_naming_the_first(tmp_path):
    proc = hold_in_subprocess(tmp_path / "run")
    try:
        with pytest.raises(DirectoryInUse, match=rf"run directory .*run is in use by pid {proc.pid} "
                                                 rf"on host {socket.gethostname()}"):
            DirectoryLock(tmp_path / "run", "run directory").acquire()
        assert issubclass(DirectoryInUse, UserError)
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    proc = hold_in_subprocess(tmp_path / "run")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Its lock file and owner record are still on disk, naming a dead process...
    assert (tmp_path / "run" / ".lock").is_file()
    assert read_owner(tmp_path / "run")["pid"] == proc.pid
    # ...but the kernel released its flock with it.
    with DirectoryLock(tmp_path / "run") as lock:
        assert read_owner(tmp_path / "run")["pid"] == os.getpid()
        assert lock.held and not lock.inherited
    assert read_owner(tmp_path / "run") is None


def test_a_lock_is_shared_only_with_the_children_given_its_environment(tmp_path):
    probe = ("import sys; from ambient_dist.locking import DirectoryLock\n"
             "l = DirectoryLock(sys.argv[1]).acquire(); print('inherited' if l.inherited else 'own')")
    with DirectoryLock(tmp_path / "run") as lock:
        shared = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "run")], text=True,
                                capture_output=True, env={**os.environ, **lock.child_env()})
        assert shared.stdout.strip() == "inherited", shared.stderr
        other = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "run")], text=True,
                               capture_output=True)
        assert other.returncode != 0 and f"in use by pid {os.getpid()}" in other.stderr
        forged = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "run")], text=True,
                                capture_output=True,
                                env={**os.environ, "AMBIENT_DIST_HELD_LOCKS": f"{tmp_path / 'run'}=guess"})
        assert forged.returncode != 0 and "in use by" in forged.stderr
    # Released: the owner's record is gone and anyone may take it.
    assert read_owner(tmp_path / "run") is None
    assert subprocess.run([sys.executable, "-c", probe, str(tmp_path / "run")], text=True,
                          capture_output=True).stdout.strip() == "own"


def test_an_unusable_directory_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot be created"):
        DirectoryLock(tmp_path / "file" / "run", "run directory").acquire()
