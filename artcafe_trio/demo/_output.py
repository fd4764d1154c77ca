"""Where the demo writes: timestamped event lines, colours, the terminal's alternate screen,
and the library's own warnings turned into event lines."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import TextIO

import attrs

__all__ = ["_Output", "_Paint", "_fit", "_library_logs_to"]


class _Paint:
    """ANSI styles, or nothing when colour is off."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.on and text else text

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    def red(self, text: str) -> str:
        return self._wrap("31", text)

    def green(self, text: str) -> str:
        return self._wrap("32", text)

    def yellow(self, text: str) -> str:
        return self._wrap("33", text)

    def magenta(self, text: str) -> str:
        return self._wrap("35", text)

    def cyan(self, text: str) -> str:
        return self._wrap("36", text)

    def alert(self, text: str) -> str:
        return self._wrap("1;31", text)


@attrs.frozen
class _Line:
    at: float
    tag: str
    text: str


_TAG_STYLE: dict[str, Callable[[_Paint, str], str]] = {
    "stage": _Paint.bold,
    "ALERT": _Paint.alert,
    "online": _Paint.green,
    "agent": _Paint.yellow,
    "fault": _Paint.magenta,
    "hub": _Paint.cyan,
    "log": _Paint.dim,
}


class _Output:
    """Where the demo writes: event lines, and on a terminal a live screen."""

    def __init__(self, stream: TextIO, *, live: bool, color: bool) -> None:
        self.stream = stream
        self.live = live
        self.paint = _Paint(color)
        self.fancy = (getattr(stream, "encoding", None) or "").lower().replace("-", "") in (
            "utf8",
            "utf8sig",
        )
        self.started = time.time()
        self.lines: list[_Line] = []
        self._screen_on = False

    def elapsed(self, at: float | None = None) -> float:
        return (time.time() if at is None else at) - self.started

    def event(self, tag: str, text: str) -> None:
        line = _Line(time.time(), tag, text)
        self.lines.append(line)
        if not self.live:
            self.write(self.format(line))

    def format(self, line: _Line, *, plain: bool = False) -> str:
        text = f"{self.elapsed(line.at):7.2f}s  {line.tag:<6}  {line.text}"
        return text if plain else self.style(line, text)

    def style(self, line: _Line, text: str) -> str:
        style = _TAG_STYLE.get(line.tag)
        return style(self.paint, text) if style else text

    def write(self, text: str = "") -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def enter_screen(self) -> None:
        if self.live and not self._screen_on:
            self._screen_on = True
            self.stream.write("\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J")  # alternate screen, no cursor
            self.stream.flush()

    def leave_screen(self) -> None:
        if self._screen_on:
            self._screen_on = False
            self.stream.write("\x1b[?25h\x1b[?1049l")
            self.stream.flush()

    def draw(self, frame: list[str]) -> None:
        """Redraw the live screen in one write (no blank flash)."""
        self.stream.write("\x1b[H" + "".join(f"{line}\x1b[K\n" for line in frame) + "\x1b[J")
        self.stream.flush()

    @property
    def glyph_x(self) -> str:
        return "\u00d7" if self.fancy else "x"

    @property
    def glyph_rule(self) -> str:
        return "\u2500" if self.fancy else "-"

    @property
    def glyph_none(self) -> str:
        return "\u2014" if self.fancy else "-"


_UNIT = re.compile(r"(\d) (m?s\b)")
"""A number and its unit, kept together when the live view wraps lines."""


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "~"


class _FeedHandler(logging.Handler):
    """Shows the library's warnings as event lines instead of scribbling over the screen."""

    def __init__(self, output: _Output) -> None:
        super().__init__(logging.WARNING)
        self.output = output

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a broken log call must not break the demo
            text = str(record.msg)
        source = record.name.rsplit(".", 1)[-1]
        level = "" if record.levelno == logging.WARNING else f"{record.levelname}: "
        self.output.event("log", f"{level}{source}: {text}")


@contextlib.contextmanager
def _library_logs_to(output: _Output) -> Iterator[None]:
    logger = logging.getLogger("artcafe_trio")
    handler = _FeedHandler(output)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
