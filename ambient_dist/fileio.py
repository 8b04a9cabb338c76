"""Writing files so that a crash never leaves a truncated one where a complete one is expected.

Every writer of the project that publishes a file others read (manifests, checkpoints'
`latest`, reports, figures, sample PNGs, exported models) goes through this module:

    atomic_write_bytes(path, data)      bytes
    atomic_write_text(path, text)       UTF-8 text
    atomic_write_json(path, obj)        JSON, indent 1, one trailing newline
    atomic_path(path, suffix="")        a temporary path for writers that want a file name
                                        (PIL, matplotlib, safetensors); renamed on success
    replace_directory(path)             the same for a whole directory (exported models)
    set_default_permissions(path)       0666 minus the umask, for files a library wrote 0600
    sha256_file(path)                   hex sha256 of a file, read in blocks

The pattern is always the same: write a hidden temporary sibling (same directory, so the
rename never crosses a file system), flush it to disk (fsync), then `os.replace` it over the
target, which is atomic on POSIX: readers see the old file or the new one, never a mix. A
failed write removes its temporary file and leaves the target as it was.

This module imports nothing of the project (it is the lowest layer).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_path",
           "replace_directory", "set_default_permissions", "sha256_file"]


def set_default_permissions(path: str | os.PathLike) -> None:
    """Give `path` the mode a plain open() would (0666 minus the umask). safetensors creates
    its files 0600, which on a shared cluster hides exported weights from the rest of a team."""
    umask = os.umask(0)  # read it (there is no getter) and put it back at once
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path` (`.<name>.tmp-<pid><suffix>`) to write to.

    When the block ends normally, the temporary file is flushed to disk and renamed over
    `path`; when it raises, the temporary file is removed and `path` is untouched. `suffix`
    keeps an extension that a writer reads the format from (e.g. ".png" for PIL). The
    process id in the name keeps concurrent writers of one path (several ranks) apart.
    Raises FileNotFoundError if the block wrote nothing there; an OSError that names no file
    (a full disk, a quota, an I/O error while writing) is raised again naming `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _naming(e, path, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _naming(e: OSError, path: Path, tmp: Path) -> OSError:
    """`e`, or when it names no file (write() on a full disk says only ENOSPC) or only the
    temporary file, the same error naming `path`: the message says which file could not be
    written."""
    if e.errno is None or (e.filename is not None and str(e.filename) != str(tmp)) \
            or e.filename2 is not None:
        return e
    named = OSError(e.errno, e.strerror, str(path))  # the errno's subclass (PermissionError, ...)
    named.__cause__ = e
    return named


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically (see the module docstring)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs) -> None:
    """Replace `path` with `obj` as JSON (indent 1 unless given, one trailing newline);
    `dumps_kwargs` go to json.dumps (e.g. default=float). Raises TypeError for objects JSON
    cannot encode, before anything is written."""
    dumps_kwargs.setdefault("indent", 1)
    atomic_write_bytes(path, (json.dumps(obj, **dumps_kwargs) + "\n").encode())


@contextlib.contextmanager
def replace_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path` to fill; when the block ends
    normally, it takes the place of `path` (an existing `path` is moved aside first and
    deleted after, so that `path` is complete at every moment but the two renames). A block
    that raises removes the temporary directory and leaves `path` as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():  # left by a crashed earlier attempt of this same process id
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _naming(e, path, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of the file at `path`, read `chunk` bytes at a time (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
