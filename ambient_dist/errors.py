"""The one base class of the errors a user can fix (bad data, bad config, bad files), and
the one place that decides whether an exception is such an error and what its message is.

Every launcher turns a user error into one `error: <message>` line and exit status 2; any
other exception is a bug in our code and keeps its traceback. The subclasses live beside the
code that raises them (ConfigError in config, ShardError in data.shards, ...); this module
imports nothing of the project, so every layer can use it.

`user_error_message(e)` is the message a launcher prints, or None for a bug. Besides a
`UserError` it recognises

- a UserError (or user OSError) raised in a torch DataLoader worker: torch re-raises it in
  the main process with the original type but the message "Caught X in DataLoader worker
  process N.\\nOriginal Traceback ...: <message>"; the worker's own message is recovered;
- an OSError about the user's files or disks (USER_ERRNOS: a path that is missing, vanished,
  not a directory, not permitted, read-only, full, over quota, too long, or an I/O error of
  the device), said as `<path>: <strerror>`. Other OSErrors (a bad file descriptor, an
  invalid argument, too many open files) are bugs of ours and keep their traceback.
"""
from __future__ import annotations

import errno
import re
from typing import Optional


class UserError(ValueError):
    """An expected failure caused by the user's input; the message says what and where."""


# The OSErrors a user fixes (a path, a permission, a disk), by errno.
USER_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENOENT", "ESTALE", "ENOTDIR", "EISDIR", "EEXIST", "ENOTEMPTY", "EACCES", "EPERM", "EROFS",
    "ENOSPC", "EDQUOT", "EFBIG", "ENAMETOOLONG", "ELOOP", "EIO", "ENXIO", "ENODEV")
    if hasattr(errno, name))

# torch.utils.data._utils (ExceptionWrapper.reraise): "Caught ShardError in DataLoader worker
# process 0.\nOriginal Traceback (most recent call last):\n  File ...\nmodule.ShardError: msg"
_WRAPPED = re.compile(r"Caught (?P<type>\w+) (?P<where>in [^\n]*?)\.\nOriginal Traceback "
                      r"\(most recent call last\):\n", re.DOTALL)
_CHAINED = ("\nThe above exception was the direct cause of the following exception:\n",
            "\nDuring handling of the above exception, another exception occurred:\n")
_OS_TEXT = re.compile(r"\[Errno (?P<errno>\d+)\] (?P<strerror>.*?)(?:: '(?P<filename>.*)')?",
                      re.DOTALL)


def original_message(e: BaseException) -> str:
    """str(e); for an exception torch re-raised from a DataLoader worker (or its pin-memory
    thread), the message the worker's exception had (the last line(s) of its traceback)."""
    text = str(e.args[0]) if len(e.args) == 1 else str(e)   # KeyError: no repr quotes
    m = _WRAPPED.match(text)
    if m is None or m["type"] != type(e).__name__:
        return str(e)
    tb = text[m.end():]
    for marker in _CHAINED:   # the exception raised last is the last of a chain
        tb = tb.rsplit(marker, 1)[-1]
    cls = type(e)
    name = cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else \
        f"{cls.__module__}.{cls.__qualname__}"
    lines = tb.split("\n")
    for i, line in enumerate(lines):
        # Frames and source lines are indented; the exception's own line is not.
        if line == name or line.startswith(name + ": "):
            message = "\n".join([line[len(name) + 2:], *lines[i + 1:]])
            return message.rstrip("\n")
    return str(e)


def _os_error_message(e: OSError, text: str) -> Optional[str]:
    code, strerror, filename, filename2 = e.errno, e.strerror, e.filename, e.filename2
    if code is None:   # re-raised from a worker with the text only: "[Errno 2] ...: 'path'"
        m = _OS_TEXT.fullmatch(text)
        if m is None:
            return None
        code, strerror, filename = int(m["errno"]), m["strerror"], m["filename"]
    if code not in USER_ERRNOS:
        return None
    strerror = strerror or errno.errorcode.get(code, str(code))
    if filename is None:
        return strerror
    where = f"{filename} -> {filename2}" if filename2 is not None else f"{filename}"
    return f"{where}: {strerror}"


def user_error_message(e: BaseException, also: tuple[type[BaseException], ...] = ()) -> Optional[str]:
    """The one-line message to show for `e` if it is a user error (a UserError, one of the
    types in `also`, or a user OSError, also when a DataLoader worker raised it), else None:
    `e` is a bug and keeps its traceback."""
    text = original_message(e)
    if isinstance(e, OSError):
        message = _os_error_message(e, text)
        if message is not None:
            return message
    if isinstance(e, (UserError, *also)):
        return text
    return None
