"""Small shared helpers."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import trio

__all__ = ["collapse_exception_groups", "flatten_exceptions", "write_private_file"]

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
        # Raising sets ``__context__`` to the group being handled (which contains
        # ``chosen``: a cycle); even outside this block the caller's ``with`` still
        # handles the group. So the member keeps its own context, restored as it
        # propagates; its ``__cause__`` and ``__suppress_context__`` are untouched.
        context = chosen.__context__
        try:
            raise chosen
        finally:
            chosen.__context__ = context
            del chosen, context, group, leaves, interrupts, errors  # no frame cycles


def write_private_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` atomically with ``data``, readable by this user only.

    The data goes to a new temporary file of our own next to it (random name, created
    exclusively, never through a link, mode 0600 whatever the umask), then a rename: a
    file or link planted at any name next to it cannot choose the mode or the target.
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{os.path.basename(target)}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o600)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 64 random bits
        raise FileExistsError(f"cannot create a temporary file next to {target}")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
