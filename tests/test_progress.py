"""ambient_dist.progress: a tqdm bar on a terminal, a bounded number of whole lines elsewhere."""
from __future__ import annotations

import io

import tqdm

from ambient_dist.progress import LineProgress, progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines_of(text: str) -> list[str]:
    assert "\r" not in text and text.endswith("\n")
    return text.splitlines()


def test_a_log_gets_one_line_per_percent_step_not_one_per_update():
    log = io.StringIO()
    bar = progress(total=1000, desc="sampling", unit="img", file=log)
    assert isinstance(bar, LineProgress)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    lines = lines_of(log.getvalue())
    # 0 %, every 10 %, nothing more: instantaneous updates never reach the 30 s interval
    assert len(lines) == 11
    assert lines[0].startswith("sampling:   0%") and "1000/1000" in lines[-1]
    assert all(line.startswith("sampling:") for line in lines)


def test_a_log_gets_a_line_every_interval_when_percent_lines_are_off(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])   # the clock tqdm and the lines read
    log = io.StringIO()
    for _ in progress(range(1000), file=log, percent_step=0, interval_s=100):
        now[0] += 1.0                                      # one second per item
    lines = lines_of(log.getvalue())
    # 1000 s at one line per 100 s: the first line, ten more (the last at 1000/1000)
    assert len(lines) == 11
    assert lines[0].startswith("  0%") and "1000/1000" in lines[-1]
    assert [int(line.split("|")[2].split("/")[0]) for line in lines[1:-1]] == list(range(100, 1000, 100))


def test_messages_between_lines_keep_every_line_whole():
    log = io.StringIO()
    bar = progress(total=10, file=log)
    bar.update(3)
    tqdm.tqdm.write("checkpoint saved", file=log)
    bar.update(7)
    bar.close()
    lines = lines_of(log.getvalue())
    assert "checkpoint saved" in lines and "10/10" in lines[-1] and "" not in lines


def test_disabled_bar_writes_nothing():
    log = io.StringIO()
    for _ in progress(range(5), file=log, disable=True):
        pass
    assert log.getvalue() == ""


def test_a_terminal_gets_the_ordinary_tqdm_bar():
    term = FakeTerminal()
    bar = progress(total=100, file=term, mininterval=0)
    assert type(bar) is tqdm.tqdm
    for _ in range(100):
        bar.update(1)
    bar.close()
    assert term.getvalue().count("\r") > 10   # redrawn in place
