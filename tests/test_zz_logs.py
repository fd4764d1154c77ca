"""Nothing logged contains a secret: the patterns, and the check ``conftest.py`` runs on
every test's log lines at the end of each of its phases (in every xdist worker)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from .conftest import LOG_CAPTURE
from .logsecrets import SECRET_PATTERNS


def test_the_patterns_catch_real_secrets() -> None:
    import secrets

    from artcafe_trio import generate_private_key

    key = generate_private_key()
    nonce = "aB3" + secrets.token_urlsafe(30)[:40]  # 43 characters, every class present
    signature = generate_private_key("rsa").sign_auth(tenant_id="t", agent_id="a", nonce=nonce)
    samples = [f"nonce {nonce} here", f"sig={signature}", key.to_pem().decode()]
    for sample in samples:
        assert any(p.search(sample) for p in SECRET_PATTERNS), sample
    assert not any(
        p.search("handler test_handlers_are_ordered_per_subscription_and_errors")
        for p in SECRET_PATTERNS
    )
    fingerprint = "ignoring unreadable key SHA256:7OuA9FEid4YWYGlrQYMpNpba3CaHo3Ol1SOm489Hu7c of a"
    assert not any(p.search(fingerprint) for p in SECRET_PATTERNS)  # fingerprints are public


async def test_no_private_key_signature_or_nonce_in_any_log_line() -> None:
    # Produce at least the log lines of an authentication failure and a session; every
    # other test's lines are checked by the conftest hook as that test ends.
    from artcafe_trio import AuthenticationError
    from artcafe_trio.testing import open_test_hub

    first = len(LOG_CAPTURE.lines)
    async with open_test_hub() as hub:
        stranger = hub.register("other", "x")
        with pytest.raises(AuthenticationError):
            async with hub.open_agent("a1", private_key=stranger):
                pass
        async with hub.open_agent("a1"):
            pass
    ours = LOG_CAPTURE.lines[first:]
    assert any("authentication refused" in line for line in ours)
    # Every line this process logged so far (the whole session in a serial run).
    for line in LOG_CAPTURE.lines:
        for pattern in SECRET_PATTERNS:
            assert not pattern.search(line), f"possible secret in log line: {line[:200]!r}"


def test_a_secret_in_a_log_line_fails_the_test_that_logged_it(pytester: pytest.Pytester) -> None:
    """The conftest hook, run in a session of its own: a test that logs a private key
    fails (in the phase that logged it, naming the line); a clean test passes."""
    here = Path(__file__).parent
    pytester.makeconftest((here / "conftest.py").read_text().replace("from .", "from "))
    pytester.makepyfile(logsecrets=(here / "logsecrets.py").read_text())
    pytester.makepyfile(
        test_leak="""
        import logging

        import pytest

        log = logging.getLogger("artcafe_trio.leak")

        def test_clean():
            log.info("agent a1 online")

        def test_leaks_in_call():
            log.info("key -----BEGIN OPENSSH PRIVATE KEY----- here")

        @pytest.fixture
        def leaky():
            yield
            log.warning("-----BEGIN PRIVATE KEY-----")

        def test_leaks_in_teardown(leaky):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(passed=2, failed=1, errors=1)
    result.stdout.fnmatch_lines(  # pytest shows errors (teardown) before failures
        [
            "*ERROR at teardown of test_leaks_in_teardown*",
            "possible secret in 1 log line(s) (teardown):",
            "'-----BEGIN PRIVATE KEY-----'",
            "*_ test_leaks_in_call _*",
            "possible secret in 1 log line(s) (call):",
            "'key -----BEGIN OPENSSH PRIVATE KEY----- here'",
        ]
    )
    assert logging.getLogger("artcafe_trio").handlers  # the capture is still installed
