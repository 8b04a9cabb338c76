"""ambient_dist.provenance: a run's provenance is complete from any install, and the revision
recorded is that of the package's own checkout only (issue 22, case 6)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ambient_dist import provenance as P

ROOT = Path(__file__).resolve().parent.parent
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True,
                          env=GIT_ENV).stdout.strip()


def repo(path: Path, files: dict[str, str]) -> Path:
    """A git repository at `path` with `files` committed."""
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git(path.parent, "init", "-q", str(path))
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "x")
    return path


def test_inside_our_checkout_the_revision_is_its_head():
    info = P.provenance()
    assert info["git_revision"] == git(ROOT, "rev-parse", "HEAD")
    assert info["checkout"] == str(ROOT)
    assert info["git_dirty"] == bool(git(ROOT, "status", "--porcelain", "--untracked-files=no"))
    assert info["version"] == importlib.metadata.version("ambient_dist")
    for key in ("package", "python", "platform", "host", "torch", "numpy", "deepspeed", "cuda", "cudnn"):
        assert key in info
    assert info["torch"] == importlib.metadata.version("torch") and info["numpy"]
    json.dumps(info)   # JSON-ready


def test_an_install_inside_another_repository_records_no_revision(tmp_path):
    """A virtualenv living in some other git repository: its HEAD says nothing of our code."""
    other = repo(tmp_path / "other", {"pyproject.toml": '[project]\nname = "other"\n', "README": "x"})
    site = other / ".venv" / "lib" / "python3.11" / "site-packages" / "ambient_dist"
    shutil.copytree(ROOT / "ambient_dist", site, ignore=shutil.ignore_patterns("__pycache__"))
    git(other, "add", "-f", "-A")   # even when the copy is committed there
    git(other, "commit", "-q", "-m", "vendored")
    assert P.source_checkout(site) is None
    info = P.provenance(site)
    assert info["git_revision"] is None and info["git_dirty"] is None and info["checkout"] is None
    assert info["version"] == importlib.metadata.version("ambient_dist")
    # the real thing: the copied package, imported from there, finds no checkout of its own
    out = subprocess.run([sys.executable, "-c", "import json, ambient_dist.provenance as p; "
                          "print(json.dumps([p.__file__, p.provenance()]))"], capture_output=True,
                         text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site.parent)},
                         check=True)
    where, installed = json.loads(out.stdout)
    assert Path(where).parent == site
    assert installed["git_revision"] is None and installed["checkout"] is None and installed["version"]


def test_a_repository_of_another_project_or_an_untracked_copy_is_not_our_checkout(tmp_path):
    named_other = repo(tmp_path / "fork", {"pyproject.toml": '[project]\nname = "something_else"\n',
                                           "ambient_dist/__init__.py": ""})
    assert P.source_checkout(named_other / "ambient_dist") is None
    untracked = repo(tmp_path / "ours", {"pyproject.toml": '[project]\nname = "ambient_dist"\n'})
    (untracked / "ambient_dist").mkdir()
    (untracked / "ambient_dist" / "__init__.py").write_text("")
    assert P.source_checkout(untracked / "ambient_dist") is None
    nested = repo(tmp_path / "deep", {"pyproject.toml": '[project]\nname = "ambient_dist"\n',
                                      "src/ambient_dist/__init__.py": ""})
    assert P.source_checkout(nested / "src" / "ambient_dist") is None
    no_git = tmp_path / "plain" / "ambient_dist"
    no_git.mkdir(parents=True)
    assert P.source_revision(no_git) == (None, None, None)


def test_a_checkout_of_ours_gives_its_revision_and_whether_it_is_dirty(tmp_path):
    ours = repo(tmp_path / "clone", {"pyproject.toml": '[project]\nname = "ambient_dist"\n',
                                     "ambient_dist/__init__.py": "__version__ = '0'\n"})
    top, revision, dirty = P.source_revision(ours / "ambient_dist")
    assert (top, revision, dirty) == (ours.resolve(), git(ours, "rev-parse", "HEAD"), False)
    (ours / "ambient_dist" / "__init__.py").write_text("changed = 1\n")
    assert P.source_revision(ours / "ambient_dist")[2] is True
    (ours / "ambient_dist" / "__init__.py").write_text("__version__ = '0'\n")
    (ours / "new.txt").write_text("untracked files do not make a revision irreproducible")
    assert P.source_revision(ours / "ambient_dist")[2] is False


def test_a_source_tree_that_is_not_installed_reports_its_own_version(monkeypatch):
    import ambient_dist
    real = P.library_version
    monkeypatch.setattr(P, "library_version", lambda name: None if name == P.PROJECT else real(name))
    assert P.provenance()["version"] == ambient_dist.__version__
