"""``artcafe-trio demo``: end to end over real sockets, and its pure helpers."""

from __future__ import annotations

import argparse
import datetime
import io
import re

import pytest

from artcafe_trio import AgentHealth
from artcafe_trio.cli import _main as _cli
from artcafe_trio.demo import _main as _demo
from artcafe_trio.demo import _plan
from artcafe_trio.demo._cast import Link, Member
from artcafe_trio.demo._judge import Check, judge
from artcafe_trio.demo._observe import Observer
from artcafe_trio.demo._output import _Output
from artcafe_trio.demo._plan import EARLY, LATE, make_plan
from artcafe_trio.demo._screen import _layout

SUMMARY_ROW = re.compile(
    r"^  (?P<verdict>ok|FAILED)\s+(?P<event>\S.*?)\s{2,}(?P<expected>\S.*?)\s{2,}"
    r"(?P<measured>[\d.]+)(?: s)?$"
)


def _summary_rows(out: str) -> dict[str, tuple[str, str, float]]:
    rows = {}
    for line in out.splitlines():
        match = SUMMARY_ROW.match(line)
        if match:
            rows[match["event"]] = (match["verdict"], match["expected"], float(match["measured"]))
    return rows


def test_demo_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    """The whole demo through the CLI, with real TCP and short heartbeats (about 10 s;
    CI also runs the default demo, 1 s heartbeats, on its own). 0.5 s heartbeats, a
    1.5 s timeout: with 0.25 s (0.75 s) a loaded machine (the suite in three
    processes beside other jobs) made heartbeats late enough to time agents out."""
    interval = 0.5
    duration = "9.7"  # the shortest timeline that fits the stages, with the least pauses
    assert not make_plan(float(duration), 2, interval).stretched
    assert make_plan(float(duration), 2, interval).pause < _plan.MIN_PAUSE + 0.01
    args = ["demo", "--duration", duration, "--agents", "2", "--interval", str(interval)]
    code = _cli.main(args)
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out + captured.err
    assert "\x1b" not in out  # not a terminal: plain lines only, no ANSI
    assert "Traceback" not in out + captured.err
    # The live dashboard's URL (with a read-only token for the demo's tenant) is printed.
    assert re.search(r"web\s+dashboard at http://127\.0\.0\.1:\d+/\?token=actd_\S+ ", out)

    # The monitor alerted on each offline event, with the agent and the reason.
    alerts = re.findall(r"ALERT\s+(\S+) is offline: (\w+)", out)
    assert alerts == [
        ("hung-worker", "timeout"),
        ("flaky-worker", "disconnected"),
        ("leaving-worker", "left"),
    ]
    for line in out.splitlines():  # event lines are timestamped
        if " is offline: " in line:
            assert re.match(r"^\s+\d+\.\d\ds  ALERT ", line), line

    # The summary: each staged event, its expectation, the measured time, within tolerance.
    rows = _summary_rows(out)
    timeout, grace = interval * 3, interval * 2
    verdict, expected, measured = rows["hang: hub says hung-worker offline"]
    assert verdict == "ok" and "timeout" in expected
    assert timeout - EARLY <= measured <= timeout + LATE
    verdict, expected, measured = rows["hang: hung-worker's own ACK watchdog"]
    assert verdict == "ok"
    assert timeout - EARLY <= measured <= timeout + LATE
    verdict, expected, measured = rows["blip: no flap"]
    assert verdict == "ok" and "grace" in expected
    assert 0 <= measured <= grace
    verdict, expected, measured = rows["outage: hub says flaky-worker offline"]
    assert verdict == "ok" and "disconnected" in expected
    assert grace - EARLY <= measured <= grace + LATE
    verdict, _, measured = rows["outage: flaky-worker back online"]
    assert verdict == "ok"
    verdict, expected, measured = rows["leave: hub says leaving-worker offline"]
    assert verdict == "ok" and "left" in expected
    assert 0 <= measured <= LATE
    verdict, _, measured = rows["monitor: one ALERT per offline"]
    assert verdict == "ok" and measured == 3
    assert all(verdict == "ok" for verdict, _, _ in rows.values())
    assert len(rows) == 8
    assert "All 8 expectations met" in out
    assert "FAILED" not in out
    # The table's columns are explained; the hang's note reads as a time after the hang.
    assert "TASKS: tasks.new messages it has handled" in out
    assert re.search(r"offline \d+\.\d\d s after the hang began; the monitor's ALERT", out)
    assert "silenced" not in out


# --------------------------------------------------------------------------- the judgement


def _check(measured: float | None, **fields: object) -> Check:
    values: dict[str, object] = {
        "event": "hang: hub says hung-worker offline",
        "expectation": "timeout, 3.00 s after its last frame",
        "low": 3.0 - EARLY,
        "high": 3.0 + LATE,
        "measured": measured,
    }
    values.update(fields)
    return Check(**values)  # type: ignore[arg-type]


def test_judge_all_met() -> None:
    code, lines = judge([_check(3.004), _check(0.2, event="leave", low=0.0, high=1.0)])
    assert code == 0
    assert lines[-1].startswith("All 2 expectations met")
    assert not any("FAILED" in line for line in lines)
    assert not any("\x1b" in line for line in lines)


def test_judge_late_detection_fails_with_a_clear_line() -> None:
    code, lines = judge([_check(5.21), _check(0.2, event="leave", low=0.0, high=1.0)])
    assert code == 1
    failures = [line for line in lines if line.startswith("FAILED:")]
    assert failures == [
        "FAILED: hang: hub says hung-worker offline: measured 5.210 s, "
        "expected timeout, 3.00 s after its last frame (2.90..4.00 s)"
    ]
    assert lines[-1] == "1 of 2 expectations not met (exit 1)."


def test_judge_early_detection_fails() -> None:
    code, _ = judge([_check(2.5)])  # offline too early would be a flap
    assert code == 1


def test_judge_not_observed_fails() -> None:
    code, lines = judge([_check(None)])
    assert code == 1
    assert any("not observed" in line and "not seen" not in line for line in lines)
    assert any(line.rstrip().endswith("not seen") for line in lines)


def test_judge_problem_fails_whatever_was_measured() -> None:
    code, lines = judge([_check(3.0, problem="reason was 'disconnected', expected 'timeout'")])
    assert code == 1
    assert "FAILED: hang: hub says hung-worker offline: reason was 'disconnected'" in "\n".join(
        lines
    )


def test_judge_counts_and_nothing_checked() -> None:
    alerts = _check(2, event="alerts", expectation="3 ALERTs", low=3, high=3, unit="")
    code, lines = judge([alerts])
    assert code == 1
    assert "FAILED: alerts: measured 2, expected 3 ALERTs (3)" in lines
    assert judge([])[0] == 1


def test_judge_colour_only_when_asked() -> None:
    _, plain = judge([_check(3.0)])
    _, coloured = judge([_check(3.0)], color=True)
    assert not any("\x1b" in line for line in plain)
    assert any("\x1b[" in line for line in coloured)


# --------------------------------------------------------------------------- the plan


def test_default_plan_takes_20_to_30_seconds() -> None:
    plan = make_plan(None, 3, 1.0)
    assert 20 <= plan.duration <= 30
    assert plan.timeout == 3.0 and plan.grace == 2.0
    assert not plan.stretched
    assert plan.pause >= _plan.DEFAULT_PAUSE - 1e-9


def test_plan_fits_a_requested_duration() -> None:
    plan = make_plan(40, 3, 1.0)
    assert plan.duration == 40 and not plan.stretched
    assert plan.pause > _plan.DEFAULT_PAUSE
    busy = sum(_plan.stage_estimates(1.0).values())
    assert busy + 5 * plan.pause == pytest.approx(40)


def test_plan_stretches_a_duration_too_short_for_the_stages() -> None:
    plan = make_plan(2, 3, 1.0)
    assert plan.stretched
    assert plan.duration > 2
    assert plan.pause == pytest.approx(_plan.MIN_PAUSE)


@pytest.mark.parametrize(
    ("duration", "agents", "interval", "message"),
    [
        (None, 3, 0.01, "--interval"),
        (None, 3, 60.0, "--interval"),
        (None, 0, 1.0, "--agents"),
        (None, 1000, 1.0, "--agents"),
        (-1.0, 3, 1.0, "--duration"),
    ],
)
def test_bad_options_are_usage_errors(
    capsys: pytest.CaptureFixture[str],
    duration: float | None,
    agents: int,
    interval: float,
    message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        make_plan(duration, agents, interval)
    args = argparse.Namespace(duration=duration, agents=agents, interval=interval)
    assert _demo.main(args) == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- output


@pytest.mark.parametrize("width", [80, 100, 140])
def test_table_layout_fits_the_terminal(width: int) -> None:
    layout = _layout(width)
    header = layout.row({c.name: c.name for c in layout.columns})
    assert len(header) <= width
    assert len(layout.groups("-")) <= width
    assert ("TASKS" in header) == (width >= 100)


def test_plain_output_prints_events_at_once_and_live_output_does_not() -> None:
    plain = io.StringIO()
    out = _Output(plain, live=False, color=False)
    out.event("ALERT", "hung-worker is offline: timeout")
    assert re.match(r"^\s+\d+\.\d\ds  ALERT   hung-worker is offline: timeout\n$", plain.getvalue())

    screen = io.StringIO()
    live = _Output(screen, live=True, color=True)
    live.event("ALERT", "hung-worker is offline: timeout")
    assert screen.getvalue() == ""  # drawn by the next redraw, not scribbled over the screen
    live.enter_screen()
    live.leave_screen()
    live.leave_screen()  # idempotent
    assert screen.getvalue() == "\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J\x1b[?25h\x1b[?1049l"


def _health(session_id: str, *, last_ack: float, last_disconnect: float | None) -> AgentHealth:
    def moment(seconds: float) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)

    return AgentHealth(
        state="connected",
        connected=True,
        healthy=True,
        session_id=session_id,
        connected_since=None,
        last_ack=moment(last_ack),
        seconds_since_ack=0.0,
        rtt=None,
        rtt_smoothed=None,
        reconnect_attempts=0,
        total_reconnects=0,
        next_retry_in=None,
        waiting_publishes=0,
        messages_in=0,
        messages_out=0,
        messages_dropped=0,
        handler_errors=0,
        heartbeat_interval=0.5,
        heartbeat_timeout=1.5,
        last_disconnect=None if last_disconnect is None else moment(last_disconnect),
        last_disconnect_reason=None if last_disconnect is None else "no heartbeat ACK for 1.5 s",
    )


def test_observer_sees_a_loss_that_reconnected_between_two_samples() -> None:
    """A fresh-clone CI run: the watchdog fired and the agent reconnected within one
    20 ms sample, and the demo reported the watchdog 'not seen'. A new session id says
    the connection was lost; health() says when."""
    plain = io.StringIO()
    member = Member("hung-worker", Link("127.0.0.1", 9), "unused.pem")
    observer = Observer(_Output(plain, live=False, color=False), {member.name: member})
    observer.observe(member, _health("s-1", last_ack=100.0, last_disconnect=None), 100.2)
    observer.observe(member, _health("s-2", last_ack=101.52, last_disconnect=101.5), 101.53)
    assert (member.ack_before_loss, member.lost_at) == (100.0, 101.5)
    text = plain.getvalue()
    assert "hung-worker: no heartbeat ACK for 1.50 s: its own watchdog drops the connection" in text
    assert "hung-worker: connected again (session s-2)" in text


@pytest.mark.timeout(90)
def test_demo_cluster_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    """``demo --cluster`` through the CLI at its shortest: a real nats-server, hubs h1 and
    h2 in process, h3 a hub process SIGKILLed mid-run (about 6 s)."""
    code = _cli.main(["demo", "--cluster", "--duration", "1", "--agents", "2", "--interval", "0.5"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out + captured.err
    assert "Traceback" not in out + captured.err
    assert re.search(r"hub\s+h3 listening on ws://127\.0\.0\.1:\d+", out)
    assert "hub h3 killed (SIGKILL)" in out
    # The one agent that could not come back is the one ALERT, with the reason hub_lost.
    alerts = re.findall(r"ALERT\s+(\S+) is offline: (\w+)", out)
    assert alerts == [("lost-worker", "hub_lost")]
    assert re.search(r"moving-worker is now on h[12] \(session s-", out)

    rows = _summary_rows(out)
    assert all(verdict == "ok" for verdict, _, _ in rows.values()), rows
    ttl, grace = 0.5 * 4, 0.5 * 2
    assert rows["online: monitor sees every agent"][2] == 4
    _, expected, measured = rows["across: one publish reaches every hub"]
    assert "3 hubs" in expected and 0 <= measured <= LATE
    assert rows["table: one presence table"][1:] == ("the same table on 3 hubs", 3)
    _, expected, measured = rows["kill: 2 agents move hubs"]
    assert "grace" in expected and 0 <= measured <= grace
    _, expected, measured = rows["kill: lost-worker reported offline"]
    assert "hub_lost" in expected and "3.00 s" in expected
    assert ttl * 2 / 3 + grace - EARLY <= measured <= ttl + grace + LATE
    assert rows["kill: survivors agree"][1:] == ("the same table on 2 hubs", 2)
    assert rows["monitor: one ALERT per offline"][2] == 1
    assert "All 7 expectations met." in out


def test_demo_cluster_without_nats_server(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the ``cluster`` extra's binary: a usage error naming the extra."""
    from artcafe_trio.demo import _natsserver

    monkeypatch.setattr(_natsserver.sys, "executable", "/nonexistent/python")
    monkeypatch.setenv("PATH", "/nonexistent")
    code = _cli.main(["demo", "--cluster"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pip install 'artcafe-trio[cluster]'" in err
