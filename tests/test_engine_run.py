"""ambient_dist.engine.run with real processes: one launch owns a run directory (a second
`ambient-train` on it is refused, naming the first's pid), and SIGINT stops a trainer at a
checkpoint (exit 0) that --resume auto continues."""
import json
import re
import signal
import subprocess
import sys

import pytest

from ambient_dist.config import load_config, save_config
from ambient_dist.engine.checkpoint import CheckpointManager
from ambient_dist.locking import DirectoryLock
from helpers import alive, toy_overrides, wait_for


def test_second_trainer_on_a_run_directory_is_refused_and_sigint_checkpoints(tmp_path, pixel_shards):
    # Long enough never to end by itself: the test stops it.
    cfg = load_config(None, toy_overrides(pixel_shards, tmp_path / "runs", **{
        "train.total_kimg": 1000, "train.checkpoint_every_kimg": 0.016}))
    config = save_config(cfg, tmp_path / "cfg")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ambient_dist.cli.train", "--config", str(config),
           "--run-dir", str(run), "--resume", "auto"]
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: CheckpointManager(run, 1).latest(), what="the first checkpoint")
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert f"error: run directory {run.resolve()} is in use by pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr

        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            first.kill()
    printed = (tmp_path / "first.log").read_text()
    assert "SIGINT: checkpoint saved at" in printed and "Traceback" not in printed
    latest = CheckpointManager(run, 1).latest()
    seen = json.loads((latest / "meta.json").read_text())["images_seen"]
    assert 0 < seen < 1_000_000
    assert not list((run / "checkpoints").glob(".tmp-*"))  # nothing half-staged left
    assert not alive(first.pid)
    with DirectoryLock(run):  # released when it exited
        pass


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", ".hidden", "two words"])
def test_a_run_name_that_is_not_a_plain_name_is_refused(tmp_path, name):
    """The run's directory is train.run_root/name: an empty name= put the run's files straight
    into the root, 'a/b' or '../x' elsewhere. --run-dir needs no name."""
    from ambient_dist.config import ConfigError
    from ambient_dist.engine.run import resolve_run_dir
    cfg = load_config(None, [f"name={name}", f"train.run_root={tmp_path}"], check_paths=False)
    with pytest.raises(ConfigError, match=rf"name: {re.escape(repr(name))} is not a plain name .* "
                                          rf"under train.run_root {tmp_path}; or pass --run-dir"):
        resolve_run_dir(cfg)
    assert resolve_run_dir(cfg, tmp_path / "mine") == tmp_path / "mine"
    assert resolve_run_dir(load_config(None, ["name=exp-1.b_2+c", f"train.run_root={tmp_path}"],
                                       check_paths=False)) == tmp_path / "exp-1.b_2+c"
