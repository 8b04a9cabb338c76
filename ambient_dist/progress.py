"""Progress reporting for every loop of the package: a tqdm bar on a terminal, log lines elsewhere.

    from ambient_dist.progress import progress
    for batch in progress(batches, desc="features", unit="batch", disable=not show): ...
    bar = progress(total=n, desc="sampling", unit="img"); bar.update(k); bar.close()

On a terminal this is a plain `tqdm.tqdm` (redrawn in place with carriage returns). When the
stream is not a terminal -- a cluster job's log file, a pipe, a captured stream -- redrawing
in place would write every refresh into the log (hundreds of `\\r` updates for one quickstart),
so the bar becomes a `LineProgress`: the same tqdm (same counters, rate, ETA, postfix, and
`tqdm.write` still works) whose display prints a whole line, at most one every `interval_s`
seconds or every `percent_step` percent of the total, whichever comes first, plus the final one.
"""
from __future__ import annotations

import os
import sys
from typing import IO, Iterable, Optional

from tqdm import tqdm

# A log line at most every this many seconds ...
INTERVAL_S = 30.0
# ... or when this many more percent of the total are done (bars with a known total).
PERCENT_STEP = 10.0


def is_terminal(stream: Optional[IO]) -> bool:
    """Whether `stream` (None: sys.stderr, tqdm's default) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress(tqdm):
    """tqdm for logs: each display is one line ending in a newline, never a carriage return.

    A line is written when `interval_s` seconds have passed since the last one, or the count
    has advanced by `percent_step` percent of `total` (when the total is known), and once more
    on `close()` with the overall rate. tqdm is told to refresh on every update
    (`mininterval=0`, `miniters=1`) so that this class alone decides; the check is a clock
    read and two comparisons, nothing is formatted for a skipped refresh.
    """

    def __init__(self, *args, interval_s: float = INTERVAL_S, percent_step: float = PERCENT_STEP,
                 **kwargs):
        self._interval_s, self._percent_step = interval_s, percent_step
        self._last_line_t: Optional[float] = None   # clock time of the last line written
        self._last_line_n: Optional[float] = None   # count shown on it
        self._line_open = False    # a line was written without its newline yet
        self._closing = False
        kwargs.update(mininterval=0, miniters=1, ascii=True)
        super().__init__(*args, **kwargs)

    def _due(self) -> bool:
        if self._last_line_t is None:
            return True
        if self._closing:   # the final line, unless the last one written is it and still open
            return self.n != self._last_line_n or not self._line_open
        if self._time() - self._last_line_t >= self._interval_s:
            return self.n != self._last_line_n
        if self.total and self._percent_step:
            return (self.n - self._last_line_n) * 100.0 >= self._percent_step * self.total
        return False

    def display(self, msg=None, pos=None):
        if msg == "":   # tqdm clearing its line (leave=False, tqdm.write): end ours instead
            self._end_line()
            return False  # returning True would make tqdm write a "\r"
        if msg is None and not self._due():
            return True
        self._end_line()
        # The newline of this line is written by the next line, by clear(), or by tqdm's own
        # close(), which ends the bar with "\n": every line ends up terminated exactly once.
        self.fp.write(self.__str__() if msg is None else msg)
        self.fp.flush()
        self._line_open = True
        self._last_line_t, self._last_line_n = self._time(), self.n
        return True

    def _end_line(self) -> None:
        if self._line_open:
            self.fp.write("\n")
            self.fp.flush()
            self._line_open = False

    def clear(self, nolock=False):
        # tqdm.write() calls this before printing its message (tqdm's own writes "\r").
        if not self.disable:
            self._end_line()

    def close(self):
        self._closing = True
        super().close()   # a last display(), then tqdm's "\n" that ends it (leave=True)
        self._line_open = False


def progress(iterable: Optional[Iterable] = None, *, total: Optional[float] = None,
             desc: Optional[str] = None, unit: str = "it", disable: bool = False,
             file: Optional[IO] = None, interval_s: float = INTERVAL_S,
             percent_step: float = PERCENT_STEP, **tqdm_kwargs) -> tqdm:
    """A progress bar over `iterable` (or updated by hand with `.update(n)` when None).

    `total`: the count at 100 % (default len(iterable) where it has one); `unit`: what is
    counted; `disable`: show nothing (e.g. on ranks other than 0); `file`: the stream
    (default sys.stderr). On a terminal the result is a `tqdm.tqdm`; otherwise a
    `LineProgress` writing at most one line per `interval_s` seconds or `percent_step`
    percent. Other keyword arguments go to tqdm (`initial`, `unit_scale`, `smoothing`, ...).
    """
    kwargs = dict(total=total, desc=desc, unit=unit, disable=disable, file=file, **tqdm_kwargs)
    if is_terminal(file):
        return tqdm(iterable, **kwargs)
    return LineProgress(iterable, interval_s=interval_s, percent_step=percent_step, **kwargs)


_SAID: set[str] = set()


def say_once(message: str) -> None:
    """Print `note: message` on stdout, once per process (the same note from a later call is
    not repeated) and only on the launcher's rank 0: what a command changed of the user's
    settings (a replaced or clamped value, an auto-resolved field), said where it happens.
    Goes through tqdm.write, so an open progress bar is redrawn below it."""
    if message in _SAID or os.environ.get("RANK", "0") not in ("", "0"):
        return
    _SAID.add(message)
    tqdm.write(f"note: {message}", file=sys.stdout)
