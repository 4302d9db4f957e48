"""engine/progress.py: a bar on a terminal, plain lines with an ETA elsewhere, nothing when off."""

from __future__ import annotations

import io

from ummae.engine.progress import Progress, eta_text, progress_mode, track


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_mode_follows_the_stream():
    assert progress_mode(True, Terminal()) == "bar"
    assert progress_mode(True, io.StringIO()) == "lines"
    assert progress_mode(False, Terminal()) == "off"


def test_lines_have_an_eta_and_no_carriage_return():
    log = io.StringIO()
    assert list(track(range(5), "extract train", progress_mode(True, log), unit="batch", stream=log,
                      every_s=0)) == list(range(5))
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 6  # one per item (every_s=0), then the closing line
    assert lines[0].startswith("extract train: 1/5 batch") and "ETA" in lines[0]
    assert lines[-1].startswith("extract train: 5 batch in")


def test_a_bar_on_a_terminal_redraws_with_carriage_returns():
    """The negative control of the test above: the same loop on a terminal is a tqdm bar."""
    tty = Terminal()
    list(track(range(5), "extract train", progress_mode(True, tty), stream=tty, every_s=0))
    assert "\r" in tty.getvalue()


def test_short_loops_print_nothing_and_off_is_silent():
    log = io.StringIO()
    list(track(range(3), "quick", "lines", stream=log))  # done before the first period
    list(track(range(3), "quiet", "off", stream=log, every_s=0))
    assert log.getvalue() == ""


def test_unknown_total_has_no_eta_figure():
    log = io.StringIO()
    progress = Progress(None, "shards", "lines", unit="img", stream=log, every_s=0)
    progress.update(3)
    assert log.getvalue().startswith("shards: 3 img") and "ETA -" in log.getvalue()


def test_eta_text():
    assert eta_text(3661) == "01:01:01"
    assert eta_text(86400 + 60) == "1d 00:01:00"
    assert eta_text(float("nan")) == "-"
