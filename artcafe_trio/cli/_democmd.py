"""``demo``: hands over to :mod:`artcafe_trio.demo` (loaded only for this command)."""

from __future__ import annotations

import argparse
import importlib

from ._common import EXIT_OK, EXIT_USAGE, _err

__all__ = ["_cmd_demo"]


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        module = importlib.import_module("artcafe_trio.demo._main")
    except ModuleNotFoundError as exc:
        if exc.name != "artcafe_trio.demo._main":
            raise
        _err("demo not available yet")
        return EXIT_USAGE
    result = module.main(args)
    return int(result) if isinstance(result, int) else EXIT_OK
