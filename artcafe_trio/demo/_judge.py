"""The judgement: each staged event's expectation against what was measured."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import attrs

from ._output import _Paint
from ._plan import EARLY, EXIT_FAILED, EXIT_OK, LATE

__all__ = ["Check", "judge"]


@attrs.frozen
class Check:
    """One expectation of the script and what was measured.

    ``low``/``high`` bound the measured value (seconds, or a count when
    ``unit`` is empty). ``measured`` is ``None`` when the event was not
    observed at all; ``problem`` fails the check whatever was measured.
    """

    event: str
    expectation: str
    low: float
    high: float
    measured: float | None
    unit: str = "s"
    note: str = ""
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.problem is None
            and self.measured is not None
            and self.low <= self.measured <= self.high
        )

    def measured_text(self) -> str:
        if self.measured is None:
            return "not seen"
        if self.unit:
            return f"{self.measured:.3f} {self.unit}"
        return f"{self.measured:g}"

    def failure(self) -> str:
        """One line saying why the check failed."""
        if self.problem is not None:
            return f"{self.event}: {self.problem}"
        if self.measured is None:
            return f"{self.event}: not observed (expected {self.expectation})"
        if self.unit:
            window = f"{self.low:.2f}..{self.high:.2f} {self.unit}"
        else:
            window = f"{self.low:g}" if self.low == self.high else f"{self.low:g}..{self.high:g}"
        return (
            f"{self.event}: measured {self.measured_text()}, expected {self.expectation} ({window})"
        )


def judge(checks: Sequence[Check], *, color: bool = False) -> tuple[int, list[str]]:
    """The summary lines for ``checks`` and the exit code: 0 only if every check passed."""
    paint = _Paint(color)
    event_width = max([len("event"), *(len(check.event) for check in checks)])
    expected_width = max([len("expected"), *(len(check.expectation) for check in checks)])
    lines = [
        paint.bold("Summary")
        + ": each staged event, what was configured, what was measured"
        + f" (tolerance: {EARLY:.1f} s early, {LATE:.1f} s late)",
        "",
        f"  {'':6}  {'event':{event_width}}  {'expected':{expected_width}}  {'measured':>9}",
    ]
    for check in checks:
        verdict = paint.green("ok    ") if check.ok else paint.red("FAILED")
        lines.append(
            f"  {verdict}  {check.event:{event_width}}  {check.expectation:{expected_width}}"
            f"  {check.measured_text():>9}"
        )
        for note in textwrap.wrap(check.note, 90):
            lines.append(f"  {'':6}  {paint.dim(note)}")
        if check.problem is not None:
            lines.append(f"  {'':6}  {paint.red(check.problem)}")
    lines.append("")
    failed = [check for check in checks if not check.ok]
    if not checks:
        lines.append(paint.red("FAILED: nothing was checked"))
        return EXIT_FAILED, lines
    if not failed:
        lines.append(
            paint.green(f"All {len(checks)} expectations met.")
            + " Presence was honest: every failure was detected when configured."
        )
        return EXIT_OK, lines
    for check in failed:
        lines.append(paint.red(f"FAILED: {check.failure()}"))
    lines.append(f"{len(failed)} of {len(checks)} expectations not met (exit {EXIT_FAILED}).")
    return EXIT_FAILED, lines
