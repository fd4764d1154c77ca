"""``python -m artcafe_trio ...``: the ``artcafe-trio`` command line (``artcafe_trio.cli.main``)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
