"""Small shared helpers."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import trio

__all__ = ["collapse_exception_groups", "flatten_exceptions"]

log = logging.getLogger("artcafe_trio")


def flatten_exceptions(exc: BaseException) -> list[BaseException]:
    """The leaf exceptions of a (possibly nested) exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in flatten_exceptions(inner)]
    return [exc]


@contextmanager
def collapse_exception_groups() -> Iterator[None]:
    """Re-raise a nursery's ExceptionGroup as the one exception that matters.

    The public API never leaks ExceptionGroups. Preference: KeyboardInterrupt,
    then the first error that is not ``trio.Cancelled``, then a ``Cancelled``
    (which belongs to an enclosing scope). Further errors are logged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = flatten_exceptions(group)
        interrupts = [e for e in leaves if isinstance(e, KeyboardInterrupt)]
        errors = [e for e in leaves if not isinstance(e, trio.Cancelled | KeyboardInterrupt)]
        chosen = (interrupts or errors or leaves)[0]
        for other in errors:
            if other is not chosen:
                log.error("further error while stopping", exc_info=other)
        raise chosen from chosen.__cause__  # keep its own cause; drop the group
