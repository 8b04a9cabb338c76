"""ambient_dist.fileio: atomic writes of files and directories, file checksums."""
import hashlib
import json
import os

import pytest

from ambient_dist.fileio import (atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text,
                                 replace_directory, sha256_file)


def test_atomic_writes_replace_the_file_and_leave_nothing_else(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "old")
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n "b": 1,\n "a": [\n  1,\n  2\n ]\n}\n'  # indent 1, key order kept
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_text(path, "complete")
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})  # not JSON: fails before anything is written
    with pytest.raises(RuntimeError):
        with atomic_path(path, suffix=".png") as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".png") and tmp.name.startswith(".")
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_replace_directory_swaps_in_the_new_content_or_keeps_the_old(tmp_path):
    out = tmp_path / "model"
    with replace_directory(out) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(KeyboardInterrupt):
        with replace_directory(out) as tmp:
            (tmp / "weights").write_text("half")
            raise KeyboardInterrupt
    assert (out / "weights").read_text() == "v1"
    with replace_directory(out) as tmp:
        (tmp / "weights").write_text("v2")
    assert (out / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_sha256_file_reads_in_blocks(tmp_path):
    data = os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=999) == hashlib.sha256(data).hexdigest()
    assert json.dumps(sha256_file(tmp_path / "f"))  # a plain str
