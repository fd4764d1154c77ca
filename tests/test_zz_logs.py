"""Runs last (by name): nothing logged during the whole suite contains a secret."""

from __future__ import annotations

import re

from .conftest import LOG_CAPTURE

# A nonce is 43 url-safe base64 characters; signatures are 86+ base64 characters;
# PEM/OpenSSH private keys have a BEGIN line.
SECRET_PATTERNS = [
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"[A-Za-z0-9_\-]{43}(?![A-Za-z0-9_\-])"),
    re.compile(r"[A-Za-z0-9+/]{86,}={0,2}"),
]


def test_no_private_key_signature_or_nonce_in_any_log_line() -> None:
    assert LOG_CAPTURE.lines, "the suite should have produced log lines"
    for line in LOG_CAPTURE.lines:
        for pattern in SECRET_PATTERNS:
            assert not pattern.search(line), f"possible secret in log line: {line[:200]!r}"
