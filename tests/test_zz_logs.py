"""Runs last (by name): nothing logged during the whole suite contains a secret."""

from __future__ import annotations

import re

import pytest

from .conftest import LOG_CAPTURE

# A nonce is 43 url-safe base64 characters; signatures are 86+ base64 characters;
# PEM/OpenSSH private keys have a BEGIN line.
# Random tokens mix upper case, lower case and digits; identifiers in log lines do not.
RANDOM = r"(?=[^ ]*[A-Z])(?=[^ ]*[a-z])(?=[^ ]*[0-9])"
SECRET_PATTERNS = [
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?<![A-Za-z0-9_\-:])" + RANDOM + r"[A-Za-z0-9_\-]{43}(?![A-Za-z0-9_\-])"),
    re.compile(RANDOM + r"[A-Za-z0-9+/]{86,}={0,2}"),
]


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
    # Produce at least the log lines of an authentication failure and a session, in
    # case this file runs alone; in a full run every earlier test's lines are here too.
    from artcafe_trio import AuthenticationError
    from artcafe_trio.testing import open_test_hub

    async with open_test_hub() as hub:
        stranger = hub.register("other", "x")
        with pytest.raises(AuthenticationError):
            async with hub.open_agent("a1", private_key=stranger):
                pass
        async with hub.open_agent("a1"):
            pass
    assert any("authentication refused" in line for line in LOG_CAPTURE.lines)
    for line in LOG_CAPTURE.lines:
        for pattern in SECRET_PATTERNS:
            assert not pattern.search(line), f"possible secret in log line: {line[:200]!r}"
