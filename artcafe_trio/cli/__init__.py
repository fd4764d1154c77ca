"""The ``artcafe-trio`` command line: ``hub``, ``agents``, ``status``, ``demo``..."""

from __future__ import annotations

from ._main import main

__all__ = ["main"]
