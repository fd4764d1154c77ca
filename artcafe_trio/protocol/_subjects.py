"""Subjects, subscription patterns and the index that matches one against the other.

Grammar (protocol v1, NATS-style)
---------------------------------
A *subject* is a string of dot-separated tokens, e.g. ``tasks.new``. Every token is
non-empty and made of printable ASCII ``0x21``-``0x7E`` except ``.``, ``*`` and ``>``
(so no spaces, no control characters, no non-ASCII). A subject has at most
:data:`MAX_SUBJECT_LENGTH` characters and at most :data:`MAX_SUBJECT_TOKENS` tokens.

A subscription *pattern* follows the same rules but may also contain wildcards, each
only as a whole token (``ta*sks`` is invalid):

* ``*`` matches exactly one token: ``tasks.*`` matches ``tasks.new`` but neither
  ``tasks`` nor ``tasks.a.b``; ``*`` alone matches any one-token subject.
* ``>`` matches one or more remaining tokens and must be the last token:
  ``tasks.>`` matches ``tasks.new`` and ``tasks.a.b`` but not ``tasks``; ``>`` alone
  matches every subject (except reserved ones, see below).

A pattern without wildcards matches only the identical subject: ``tasks`` matches
neither ``tasks.new`` nor ``tasksXYZ``.

Reserved subjects
-----------------
A subject whose *first* token starts with ``$`` (``$presence.agent-1``,
``$reply.s1.x``) is reserved for the hub; see :func:`is_reserved`. ``$`` anywhere
else is an ordinary character. As with NATS's ``$SYS`` convention, a wildcard in the
first token of a pattern never matches a reserved first token: ``>``, ``*`` and
``*.x`` do not match ``$presence.x``. An agent that wants presence events must
subscribe to ``$presence.>`` (or a more specific pattern) explicitly.

Errors
------
:func:`validate_subject` and :func:`validate_pattern` raise
:class:`~artcafe_trio.LocalProtocolError` with code ``invalid_subject`` and a
message naming the first problem found. Indexes and positions in messages are 0-based.

This module imports neither trio nor any I/O library; everything here is on the hub's
per-message hot path, so the common (valid) case is kept to a few C-level string scans.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, NoReturn, TypeVar

from .._errors import LocalProtocolError

__all__ = [
    "MAX_SUBJECT_LENGTH",
    "MAX_SUBJECT_TOKENS",
    "SubjectIndex",
    "is_reserved",
    "subject_matches",
    "validate_pattern",
    "validate_subject",
]

MAX_SUBJECT_LENGTH = 256
"""Maximum length of a subject or pattern, in characters."""

MAX_SUBJECT_TOKENS = 16
"""Maximum number of dot-separated tokens in a subject or pattern."""

T = TypeVar("T", bound=Hashable)

_CODE = "invalid_subject"
_PREVIEW = 48


def _preview(s: str) -> str:
    """``repr`` of *s*, shortened for error messages."""
    if len(s) <= _PREVIEW:
        return repr(s)
    return repr(s[:_PREVIEW]) + "..."


def _fail(kind: str, value: object, wild: bool, frame_id: str | None) -> NoReturn:
    """Find the first problem with *value* and raise ``ProtocolError`` describing it.

    Only called once the fast path has rejected *value*, so it may be slow.
    """

    def err(message: str) -> NoReturn:
        raise LocalProtocolError(_CODE, message, frame_id=frame_id)

    if not isinstance(value, str):
        err(f"{kind} must be a str, not {type(value).__name__}")
    s = value
    if not s:
        err(f"{kind} is empty")
    if len(s) > MAX_SUBJECT_LENGTH:
        err(f"{kind} too long ({len(s)} > {MAX_SUBJECT_LENGTH} characters)")
    for i, ch in enumerate(s):
        if not "!" <= ch <= "~":
            err(
                f"bad character {ch!r} at index {i} in {kind} {_preview(s)} "
                "(only printable ASCII without spaces is allowed)"
            )
        if not wild and (ch == "*" or ch == ">"):
            err(f"wildcard {ch!r} at index {i} is not allowed in a concrete subject {_preview(s)}")
    tokens = s.split(".")
    if len(tokens) > MAX_SUBJECT_TOKENS:
        err(f"{kind} has too many tokens ({len(tokens)} > {MAX_SUBJECT_TOKENS})")
    last = len(tokens) - 1
    for i, tok in enumerate(tokens):
        if not tok:
            err(
                f"empty token at position {i} in {kind} {_preview(s)} "
                "(no leading, trailing or doubled '.')"
            )
        if tok == "*" or (tok == ">" and i == last):
            continue
        if tok == ">":
            err(f"'>' must be the last token, found at position {i} of {last + 1} in {_preview(s)}")
        if "*" in tok or ">" in tok:
            err(f"wildcards must be whole tokens, got {tok!r} at position {i} in {_preview(s)}")
    raise AssertionError(f"{kind} {s!r} rejected without a reason")  # pragma: no cover


def _plain_ok(s: str) -> bool:
    """Whether the exact ``str`` *s* is a valid subject, assuming no ``*`` or ``>``."""
    return (
        0 < len(s) <= MAX_SUBJECT_LENGTH
        and s.isascii()
        and s.isprintable()  # for ASCII: 0x20-0x7E
        and " " not in s
        and s.count(".") < MAX_SUBJECT_TOKENS
        and s[0] != "."
        and s[-1] != "."
        and ".." not in s
    )


def validate_subject(subject: object, *, frame_id: str | None = None) -> str:
    """Return *subject* if it is a valid concrete subject (no wildcards).

    A ``str`` subclass is returned as a plain ``str``. Raises ``ProtocolError``
    (``invalid_subject``, carrying *frame_id*) otherwise.
    """
    if type(subject) is str:
        if "*" not in subject and ">" not in subject and _plain_ok(subject):
            return subject
    elif isinstance(subject, str):
        return validate_subject(str.__str__(subject), frame_id=frame_id)
    _fail("subject", subject, False, frame_id)


def validate_pattern(pattern: object, *, frame_id: str | None = None) -> str:
    """Return *pattern* if it is a valid subscription pattern.

    Like :func:`validate_subject`, but ``*`` may appear as any whole token and ``>``
    as the whole last token.
    """
    if type(pattern) is str:
        if "*" not in pattern and ">" not in pattern:
            if _plain_ok(pattern):
                return pattern
        elif (
            len(pattern) <= MAX_SUBJECT_LENGTH
            and pattern.isascii()
            and pattern.isprintable()
            and " " not in pattern
        ):
            tokens = pattern.split(".")
            if len(tokens) <= MAX_SUBJECT_TOKENS:
                if tokens[-1] == ">":
                    tokens.pop()
                for tok in tokens:
                    if tok != "*" and (not tok or "*" in tok or ">" in tok):
                        break
                else:
                    return pattern
    elif isinstance(pattern, str):
        return validate_pattern(str.__str__(pattern), frame_id=frame_id)
    _fail("pattern", pattern, True, frame_id)


def is_reserved(subject: str) -> bool:
    """Whether *subject* (or pattern) is reserved for the hub: its first token starts with ``$``."""
    return subject.startswith("$")


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether *pattern* matches *subject*; both are assumed valid.

    Wildcards in the first token of *pattern* never match a reserved subject.
    """
    if pattern == subject:
        return True
    ptoks = pattern.split(".")
    stoks = subject.split(".")
    if subject.startswith("$") and (ptoks[0] == "*" or ptoks[0] == ">"):
        return False
    n = len(stoks)
    for i, tok in enumerate(ptoks):
        if tok == ">":
            return i < n
        if i >= n or (tok != "*" and tok != stoks[i]):
            return False
    return len(ptoks) == n


class _Node(Generic[T]):
    """A trie node: the patterns whose tokens so far lead here.

    ``subs`` are subscribers of the pattern ending exactly here (``pattern``),
    ``fwc`` those of the pattern ending here with ``>`` (``fwc_pattern``).
    Empty sets are stored as ``None`` so that idle nodes stay small.
    """

    __slots__ = ("children", "fwc", "fwc_pattern", "pattern", "star", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.star: _Node[T] | None = None
        self.subs: set[T] | None = None
        self.pattern = ""
        self.fwc: set[T] | None = None
        self.fwc_pattern = ""

    def is_empty(self) -> bool:
        return not (self.children or self.star or self.subs or self.fwc)


class SubjectIndex(Generic[T]):
    """Maps subscription patterns to sets of subscribers.

    :meth:`match` finds every subscriber whose pattern matches a concrete subject
    without scanning every pattern: patterns are stored in a token trie where each
    node has children by literal token, a ``*`` child and a ``>`` subscriber set.
    Work per match is proportional to the number of trie paths the subject can
    follow, not to the number of patterns. Subscribers must be hashable.
    """

    __slots__ = ("_len", "_root")

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._len = 0

    def __len__(self) -> int:
        """Number of (pattern, subscriber) pairs."""
        return self._len

    def __repr__(self) -> str:
        return f"<SubjectIndex: {self._len} subscriptions>"

    def add(self, pattern: str, subscriber: T) -> bool:
        """Subscribe *subscriber* to *pattern*; return ``False`` if it already was.

        *pattern* is validated (``ProtocolError`` if invalid).
        """
        validate_pattern(pattern)
        hash(subscriber)  # fail before touching the trie
        tokens = pattern.split(".")
        fwc = tokens[-1] == ">"
        if fwc:
            tokens.pop()
        node = self._root
        for tok in tokens:
            if tok == "*":
                child = node.star
                if child is None:
                    child = node.star = _Node()
            else:
                child = node.children.get(tok)
                if child is None:
                    child = node.children[tok] = _Node()
            node = child
        if fwc:
            subs = node.fwc
            if subs is None:
                subs = node.fwc = set()
                node.fwc_pattern = pattern
        else:
            subs = node.subs
            if subs is None:
                subs = node.subs = set()
                node.pattern = pattern
        if subscriber in subs:
            return False
        subs.add(subscriber)
        self._len += 1
        return True

    def remove(self, pattern: str, subscriber: T) -> bool:
        """Unsubscribe *subscriber* from *pattern*; return whether it was subscribed.

        Nodes left empty are pruned, so memory does not grow with subscription churn.
        """
        tokens = pattern.split(".")
        fwc = tokens[-1] == ">"
        if fwc:
            tokens.pop()
        path: list[tuple[_Node[T], str]] = []
        node = self._root
        for tok in tokens:
            child = node.star if tok == "*" else node.children.get(tok)
            if child is None:
                return False
            path.append((node, tok))
            node = child
        subs = node.fwc if fwc else node.subs
        if not subs or subscriber not in subs:
            return False
        subs.remove(subscriber)
        self._len -= 1
        if not subs:
            if fwc:
                node.fwc = None
                node.fwc_pattern = ""
            else:
                node.subs = None
                node.pattern = ""
            while path and node.is_empty():
                parent, tok = path.pop()
                if tok == "*":
                    parent.star = None
                else:
                    del parent.children[tok]
                node = parent
        return True

    def remove_subscriber(self, subscriber: T, patterns: Iterable[str]) -> None:
        """Unsubscribe *subscriber* from each of *patterns* (absent ones are ignored)."""
        for pattern in patterns:
            self.remove(pattern, subscriber)

    def match(self, subject: str) -> list[tuple[str, T]]:
        """Every ``(pattern, subscriber)`` pair whose pattern matches *subject*.

        *subject* is assumed valid. Each pair appears once; order is unspecified.
        """
        tokens = subject.split(".")
        out: list[tuple[str, T]] = []
        root = self._root
        first = tokens[0]
        nodes: list[_Node[T]] = []
        # The first token is handled apart: wildcards there skip reserved subjects.
        child = root.children.get(first)
        if child is not None:
            nodes.append(child)
        if not first.startswith("$"):
            if root.star is not None:
                nodes.append(root.star)
            subs = root.fwc
            if subs:
                pattern = root.fwc_pattern
                out += [(pattern, s) for s in subs]
        for i in range(1, len(tokens)):
            if not nodes:
                return out
            tok = tokens[i]
            nxt: list[_Node[T]] = []
            for node in nodes:
                subs = node.fwc
                if subs:
                    pattern = node.fwc_pattern
                    out += [(pattern, s) for s in subs]
                child = node.children.get(tok)
                if child is not None:
                    nxt.append(child)
                if node.star is not None:
                    nxt.append(node.star)
            nodes = nxt
        for node in nodes:
            subs = node.subs
            if subs:
                pattern = node.pattern
                out += [(pattern, s) for s in subs]
        return out

    def patterns(self) -> set[str]:
        """All patterns with at least one subscriber."""
        result: set[str] = set()
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.subs:
                result.add(node.pattern)
            if node.fwc:
                result.add(node.fwc_pattern)
            stack.extend(node.children.values())
            if node.star is not None:
                stack.append(node.star)
        return result

    def _node_count(self) -> int:
        """Number of trie nodes besides the root (0 when the index is empty); for tests."""
        count = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            count += len(node.children) + (node.star is not None)
            stack.extend(node.children.values())
            if node.star is not None:
                stack.append(node.star)
        return count
