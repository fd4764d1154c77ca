"""What a secret in a log line looks like, and the check every test's log lines pass.

``tests/conftest.py`` collects every record the ``artcafe_trio`` loggers emit during the
session and checks the new lines at the end of each test phase (setup, call, teardown), so
the check holds in every process of a parallel run (pytest-xdist) and names the test that
logged the secret.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# A nonce is 43 url-safe base64 characters; signatures are 86+ base64 characters;
# PEM/OpenSSH private keys have a BEGIN line.
# Random tokens mix upper case, lower case and digits; identifiers in log lines do not.
RANDOM = r"(?=[^ ]*[A-Z])(?=[^ ]*[a-z])(?=[^ ]*[0-9])"
SECRET_PATTERNS = [
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?<![A-Za-z0-9_\-:])" + RANDOM + r"[A-Za-z0-9_\-]{43}(?![A-Za-z0-9_\-])"),
    re.compile(RANDOM + r"[A-Za-z0-9+/]{86,}={0,2}"),
]


def secret_lines(lines: Iterable[str]) -> list[str]:
    """The lines that may contain a private key, a signature or a nonce."""
    return [line for line in lines if any(p.search(line) for p in SECRET_PATTERNS)]
