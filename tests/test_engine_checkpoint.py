"""ambient_dist.engine.checkpoint: atomic checkpoints (a crash leaves the previous one loadable),
keep-last-k, the latest pointer, plain-data state, the atomic safetensors export.

The other engine building blocks have files of their own: test_engine_lr.py, test_engine_ema.py,
test_engine_logging.py.
"""
import os

import pytest
import torch

from ambient_dist.engine import checkpoint as ckpt_mod
from ambient_dist.engine.checkpoint import (Checkpoint, CheckpointManager,
                                            export_safetensors_atomic)


# -- checkpoints ----------------------------------------------------------------------------

def _checkpoint(value: float, images: int) -> Checkpoint:
    opt_param = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([opt_param])
    opt_param.grad = torch.ones(2)
    opt.step()
    return Checkpoint(model={"w": torch.full((3, 3), value)}, ema={"w": torch.full((3, 3), -value)},
                      rng={"torch": torch.get_rng_state()},
                      state={"optimizer": opt.state_dict(), "loader": {"position": images}},
                      meta={"images_seen": images})


def test_checkpoint_roundtrip_latest_and_keep_last_k(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    assert mgr.latest() is None
    for i, images in enumerate((100, 200, 300)):
        mgr.save(_checkpoint(float(i), images), images)
    assert [p.name for p in mgr.list()] == ["ckpt-000000000200", "ckpt-000000000300"]
    assert mgr.latest().name == "ckpt-000000000300"
    loaded = CheckpointManager.load(mgr.latest())
    assert torch.equal(loaded.model["w"], torch.full((3, 3), 2.0))
    assert torch.equal(loaded.ema["w"], torch.full((3, 3), -2.0))
    assert loaded.state["loader"] == {"position": 300}
    assert loaded.meta["images_seen"] == 300
    assert "exp_avg" in loaded.state["optimizer"]["state"][0]


def test_crash_while_writing_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep=1)
    mgr.save(_checkpoint(1.0, 100), 100)

    def dies_mid_write(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")  # a half-written file, then the process is gone
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(ckpt_mod.torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(_checkpoint(2.0, 200), 200)
    monkeypatch.undo()

    assert mgr.latest().name == "ckpt-000000000100"
    assert [p.name for p in mgr.list()] == ["ckpt-000000000100"]  # the partial one is hidden
    assert torch.equal(CheckpointManager.load(mgr.latest()).model["w"], torch.full((3, 3), 1.0))
    # The next successful save cleans up the stray temporary directory.
    mgr.save(_checkpoint(3.0, 300), 300)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert mgr.latest().name == "ckpt-000000000300"


def test_crash_before_latest_is_updated_keeps_the_old_pointer_valid(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(_checkpoint(1.0, 100), 100)
    monkeypatch.setattr(ckpt_mod, "atomic_write_text",
                        lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        mgr.save(_checkpoint(2.0, 200), 200)
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "ckpt-000000000100"
    assert CheckpointManager.load(mgr.latest()).meta["images_seen"] == 100


def test_loading_an_incomplete_checkpoint_names_the_missing_file(tmp_path):
    path = CheckpointManager(tmp_path, keep=1).save(_checkpoint(1.0, 100), 100)
    (path / "ema.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        CheckpointManager.load(path)


class ArbitraryObject:
    pass


def test_checkpoint_state_is_never_unpickled_beyond_plain_data(tmp_path):
    path = CheckpointManager(tmp_path, keep=1).save(_checkpoint(1.0, 100), 100)
    torch.save({"evil": ArbitraryObject()}, path / "state.pt")  # would run code on unpickling
    with pytest.raises(Exception, match="[Ww]eights only"):
        CheckpointManager.load(path)


def test_export_safetensors_atomic_writes_loadable_file_with_metadata(tmp_path):
    from safetensors import safe_open
    target = tmp_path / "ema.safetensors"
    export_safetensors_atomic({"a": torch.arange(6.0).reshape(2, 3).t()}, target, {"images_seen": "7"})
    with safe_open(str(target), "pt") as f:
        assert f.metadata()["images_seen"] == "7"
        assert torch.equal(f.get_tensor("a"), torch.arange(6.0).reshape(2, 3).t())
    assert [p.name for p in tmp_path.iterdir()] == ["ema.safetensors"]


def test_exported_weights_are_readable_by_the_team_as_the_umask_allows(tmp_path):
    # safetensors creates its files 0600; an exported EMA on a shared cluster must follow the
    # umask like every other file of the run (0644 under the usual 022).
    import os
    old = os.umask(0o022)
    try:
        export_safetensors_atomic({"a": torch.zeros(2)}, tmp_path / "ema.safetensors")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    mode = (tmp_path / "ema.safetensors").stat().st_mode & 0o777
    assert mode == 0o644 == plain.stat().st_mode & 0o777


def test_resume_compares_path_options_resolved(tmp_path, monkeypatch):
    """Runs now save their paths absolute (issue 22 case 3); a checkpoint written before,
    with the paths as typed, still resumes from the directory it was trained in, and a path
    that names another file is still a different option."""
    from ambient_dist.config import ConfigError, load_config, to_dict, with_absolute_paths
    monkeypatch.chdir(tmp_path)
    typed = load_config(None, ["distributed.deepspeed_config=ds.json", "data.shards=fm64"], check_paths=False)
    ckpt_mod.check_resume_compatible(to_dict(typed), with_absolute_paths(typed), tmp_path / "ckpt")
    moved = with_absolute_paths(typed, base=tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"distributed.deepspeed_config: '.*/ds.json' -> '.*/elsewhere/ds.json'"):
        ckpt_mod.check_resume_compatible(to_dict(typed), moved, tmp_path / "ckpt")

def test_staging_directories_are_named_by_their_owner(tmp_path):
    """Two launches never share a staging directory (issue 20: a fixed `.tmp-ckpt-N` let the
    second writer delete the first's files mid-save); ranks of one launch pass one owner."""
    first, second = CheckpointManager(tmp_path, keep=1, owner=111), CheckpointManager(tmp_path, keep=1, owner=222)
    assert first.staging_path(100) != second.staging_path(100)
    assert CheckpointManager(tmp_path, keep=1).staging_path(100).name == f".tmp-{os.getpid()}-ckpt-000000000100"
    staged = first.stage(100)
    (staged / "model.safetensors").write_bytes(b"being written")
    second.stage(100)
    assert (staged / "model.safetensors").read_bytes() == b"being written"
