"""Tests for artcafe_trio.protocol._subjects: grammar, matching and the SubjectIndex trie."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from artcafe_trio._errors import ProtocolError
from artcafe_trio.protocol._subjects import (
    MAX_SUBJECT_LENGTH,
    MAX_SUBJECT_TOKENS,
    SubjectIndex,
    is_reserved,
    subject_matches,
    validate_pattern,
    validate_subject,
)

# --------------------------------------------------------------------------- references

_TOKEN_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F)) - set(".*>")


def ref_valid(value: object, *, pattern: bool) -> bool:
    """Independent statement of the grammar, token by token."""
    if not isinstance(value, str) or len(value) > MAX_SUBJECT_LENGTH:
        return False
    tokens = value.split(".")
    if len(tokens) > MAX_SUBJECT_TOKENS:
        return False
    for i, tok in enumerate(tokens):
        if pattern and (tok == "*" or (tok == ">" and i == len(tokens) - 1)):
            continue
        if not tok or not set(tok) <= _TOKEN_CHARS:
            return False
    return True


def ref_matches(pattern: str, subject: str) -> bool:
    """Reference matcher: translate the pattern into a regular expression."""
    parts = []
    for tok in pattern.split("."):
        if tok == "*":
            parts.append(r"[^.]+")
        elif tok == ">":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(re.escape(tok))
    regex = r"\.".join(parts)
    if pattern.split(".")[0] in ("*", ">"):
        regex = r"(?!\$)" + regex
    return re.fullmatch(regex, subject) is not None


# --------------------------------------------------------------------------- validation

LONGEST = ".".join(["a" * 15] * 16)  # 16 * 15 + 15 = 255 characters, 16 tokens
assert len(LONGEST) == 255

VALID_SUBJECTS = [
    "tasks",
    "tasks.new",
    "a.b.c.d",
    "$presence.agent-1",
    "$reply.s1.x",
    "a$.b$c",
    "Agent_1.~!#%&'()+,-/:;<=?@[]^`{|}\"\\",
    "x" * MAX_SUBJECT_LENGTH,
    "x" * (MAX_SUBJECT_LENGTH - 1) + "$",
    ".".join(["a"] * MAX_SUBJECT_TOKENS),
    LONGEST + "b",
]

VALID_PATTERN_ONLY = [
    "*",
    ">",
    "tasks.*",
    "tasks.>",
    "*.new",
    "*.*.>",
    "$presence.>",
    "a.*.b.>",
    ".".join(["*"] * MAX_SUBJECT_TOKENS),
    ".".join(["*"] * (MAX_SUBJECT_TOKENS - 1) + [">"]),
]

# (value, fragment expected in the message)
INVALID_BOTH: list[tuple[object, str]] = [
    ("", "is empty"),
    (".", "empty token at position 0"),
    (".tasks", "empty token at position 0"),
    ("tasks.", "empty token at position 1"),
    ("a..b", "empty token at position 1"),
    ("a b", "bad character ' ' at index 1"),
    ("tasks\x00", r"bad character '\x00' at index 5"),
    ("tab\there", r"bad character '\t' at index 3"),
    ("del\x7f", r"bad character '\x7f' at index 3"),
    ("café", "bad character 'é' at index 3"),
    ("émoji.🙂", "bad character 'é' at index 0"),
    ("x" * (MAX_SUBJECT_LENGTH + 1), "too long (257 > 256 characters)"),
    (".".join(["a"] * (MAX_SUBJECT_TOKENS + 1)), "too many tokens (17 > 16)"),
    (None, "must be a str, not NoneType"),
    (42, "must be a str, not int"),
    (b"tasks", "must be a str, not bytes"),
    (["tasks"], "must be a str, not list"),
]

INVALID_SUBJECT_ONLY: list[tuple[str, str]] = [
    ("*", "wildcard '*' at index 0 is not allowed in a concrete subject"),
    (">", "wildcard '>' at index 0 is not allowed in a concrete subject"),
    ("tasks.*", "wildcard '*' at index 6 is not allowed"),
    ("tasks.>", "wildcard '>' at index 6 is not allowed"),
    ("ta*sks", "wildcard '*' at index 2 is not allowed"),
]

INVALID_PATTERN_ONLY: list[tuple[str, str]] = [
    ("ta*sks", "wildcards must be whole tokens, got 'ta*sks' at position 0"),
    ("tasks.n>", "wildcards must be whole tokens, got 'n>' at position 1"),
    ("tasks.**", "wildcards must be whole tokens, got '**' at position 1"),
    ("a.>>", "wildcards must be whole tokens, got '>>' at position 1"),
    (">.tasks", "'>' must be the last token, found at position 0 of 2"),
    ("a.>.>", "'>' must be the last token, found at position 1 of 3"),
    ("a.*.", "empty token at position 2"),
    ("*..>", "empty token at position 1"),
    ("* .>", "bad character ' ' at index 1"),
    (".".join(["*"] * (MAX_SUBJECT_TOKENS + 1)), "too many tokens (17 > 16)"),
    ("*." + "x" * (MAX_SUBJECT_LENGTH - 1), "too long (257 > 256 characters)"),
]


@pytest.mark.parametrize("subject", VALID_SUBJECTS)
def test_valid_subjects(subject: str) -> None:
    assert validate_subject(subject) is subject
    assert validate_pattern(subject) is subject


@pytest.mark.parametrize("pattern", VALID_PATTERN_ONLY)
def test_valid_patterns(pattern: str) -> None:
    assert validate_pattern(pattern) is pattern
    with pytest.raises(ProtocolError, match="not allowed in a concrete subject"):
        validate_subject(pattern)


Validator = Callable[..., str]


@pytest.mark.parametrize(
    ("validate", "value", "fragment"),
    [(validate_subject, v, f) for v, f in INVALID_BOTH + INVALID_SUBJECT_ONLY]
    + [(validate_pattern, v, f) for v, f in INVALID_BOTH + INVALID_PATTERN_ONLY],
)
def test_invalid(validate: Validator, value: object, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        validate(value)
    assert info.value.code == "invalid_subject"
    assert fragment in info.value.message
    assert info.value.frame_id is None


def test_messages_name_the_kind() -> None:
    with pytest.raises(ProtocolError, match="subject must be a str"):
        validate_subject(1)
    with pytest.raises(ProtocolError, match="pattern must be a str"):
        validate_pattern(1)
    with pytest.raises(ProtocolError, match="pattern too long"):
        validate_pattern("x" * 300)


def test_long_values_are_shortened_in_messages() -> None:
    with pytest.raises(ProtocolError) as info:
        validate_subject("x" * 200 + "..y")
    assert "empty token at position 1" in info.value.message
    assert len(info.value.message) < 150


@pytest.mark.parametrize("validate", [validate_subject, validate_pattern])
def test_frame_id_propagates(validate: Validator) -> None:
    with pytest.raises(ProtocolError) as info:
        validate("a..b", frame_id="f-17")
    assert info.value.frame_id == "f-17"
    with pytest.raises(ProtocolError) as info:
        validate(None, frame_id="f-18")
    assert info.value.frame_id == "f-18"
    assert validate("ok", frame_id="f-19") == "ok"


def test_str_subclass_is_returned_as_plain_str() -> None:
    class Sub(str):
        pass

    for validate in (validate_subject, validate_pattern):
        result = validate(Sub("tasks.new"))
        assert type(result) is str
        assert result == "tasks.new"
        with pytest.raises(ProtocolError, match="empty token"):
            validate(Sub("tasks..new"))


def test_is_reserved() -> None:
    assert is_reserved("$presence.agent-1")
    assert is_reserved("$reply.s1.x")
    assert is_reserved("$")
    assert is_reserved("$presence.>")
    assert not is_reserved("tasks.$presence")
    assert not is_reserved("a$.b")
    assert not is_reserved(">")
    assert not is_reserved("*.x")


_fuzz_text = st.text(alphabet="ab$.*> \x00\x7fé", max_size=24)

_anything = st.one_of(
    st.text(),
    _fuzz_text,
    st.text(alphabet="ab.", min_size=240, max_size=270),
    st.integers(),
    st.floats(),
    st.none(),
    st.binary(),
    st.lists(st.text(max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@given(value=_anything)
@settings(max_examples=400)
def test_validators_agree_with_reference_and_only_raise_protocol_error(value: object) -> None:
    for validate, pattern in ((validate_subject, False), (validate_pattern, True)):
        if ref_valid(value, pattern=pattern):
            assert validate(value, frame_id="fz") == value
            continue
        # Anything but ProtocolError (TypeError, IndexError...) escapes and fails the test.
        with pytest.raises(ProtocolError) as info:
            validate(value, frame_id="fz")
        assert info.value.code == "invalid_subject"
        assert info.value.frame_id == "fz"
        assert info.value.message


# --------------------------------------------------------------------------- matching

MATCH_TABLE = [
    # pattern, subject, expected
    ("tasks.new", "tasks.new", True),
    ("tasks.*", "tasks.new", True),
    ("tasks.>", "tasks.new", True),
    ("*.new", "tasks.new", True),
    (">", "tasks.new", True),
    ("*.*", "tasks.new", True),
    ("*.>", "tasks.new", True),
    ("*", "tasks.new", False),
    ("*", "tasks", True),
    (">", "tasks", True),
    ("tasks.old", "tasks.new", False),
    ("tasks.new.x", "tasks.new", False),
    ("*.*.*", "tasks.new", False),
    ("tasks.*", "tasks.a.b", False),
    ("tasks.>", "tasks.a.b", True),
    ("tasks.*.b", "tasks.a.b", True),
    ("tasks.*.>", "tasks.a.b", True),
    ("tasks.*.>", "tasks.a", False),
    # the original platform's prefix bug
    ("tasks", "tasksXYZ", False),
    ("tasks", "tasks.new", False),
    ("task", "tasks", False),
    ("tasks.>", "tasks", False),
    ("tasks.*", "tasks", False),
    # reserved subjects: wildcards in the first token never match them
    (">", "$presence.agent-1", False),
    ("*.agent-1", "$presence.agent-1", False),
    ("*", "$presence", False),
    ("*.>", "$reply.s1.x", False),
    ("$presence.>", "$presence.agent-1", True),
    ("$presence.*", "$presence.agent-1", True),
    ("$presence.agent-1", "$presence.agent-1", True),
    ("$reply.*.x", "$reply.s1.x", True),
    ("$reply.>", "$reply", False),
    # '$' elsewhere is ordinary
    (">", "tasks.$presence", True),
    ("*.$x", "a.$x", True),
    ("*", "a$", True),
]


@pytest.mark.parametrize(("pattern", "subject", "expected"), MATCH_TABLE)
def test_subject_matches_table(pattern: str, subject: str, expected: bool) -> None:
    assert subject_matches(pattern, subject) is expected
    assert ref_matches(pattern, subject) is expected  # keep the reference honest
    index: SubjectIndex[str] = SubjectIndex()
    index.add(pattern, "s")
    assert index.match(subject) == ([(pattern, "s")] if expected else [])


_SUBJECT_TOKENS = ["a", "b", "$r", "x$"]
_PATTERN_TOKENS = [*_SUBJECT_TOKENS, "*", "*"]

subjects = st.lists(st.sampled_from(_SUBJECT_TOKENS), min_size=1, max_size=5).map(".".join)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(st.sampled_from(_PATTERN_TOKENS), min_size=0, max_size=4))
    if not tokens or draw(st.booleans()):
        tokens.append(">")
    return ".".join(tokens)


@given(pattern=patterns(), subject=subjects)
@settings(max_examples=1000)
def test_subject_matches_agrees_with_reference(pattern: str, subject: str) -> None:
    assert validate_pattern(pattern) == pattern
    assert validate_subject(subject) == subject
    assert subject_matches(pattern, subject) == ref_matches(pattern, subject)


@given(subject=subjects)
def test_literal_pattern_matches_itself_only(subject: str) -> None:
    assert subject_matches(subject, subject)
    assert not subject_matches(subject, subject + "x")
    assert not subject_matches(subject, subject + ".a")


# --------------------------------------------------------------------------- SubjectIndex

operations = st.lists(
    st.tuples(st.booleans(), patterns(), st.integers(min_value=0, max_value=3)),
    max_size=80,
)


@given(ops=operations, probes=st.lists(subjects, min_size=1, max_size=15))
@settings(max_examples=300)
def test_index_agrees_with_brute_force(ops: list[tuple[bool, str, int]], probes: list[str]) -> None:
    index: SubjectIndex[int] = SubjectIndex()
    model: set[tuple[str, int]] = set()
    for is_add, pattern, sub in ops:
        pair = (pattern, sub)
        if is_add:
            assert index.add(pattern, sub) is (pair not in model)
            model.add(pair)
        else:
            assert index.remove(pattern, sub) is (pair in model)
            model.discard(pair)
        assert len(index) == len(model)
    assert index.patterns() == {p for p, _ in model}
    for subject in probes:
        found = index.match(subject)
        assert len(found) == len(set(found)), "a pair was reported twice"
        assert set(found) == {(p, s) for p, s in model if ref_matches(p, subject)}
    for pattern, sub in model:
        assert index.remove(pattern, sub)
        assert not index.remove(pattern, sub)
    assert len(index) == 0
    assert index.patterns() == set()
    assert index._node_count() == 0
    for subject in probes:
        assert index.match(subject) == []


def test_index_basics() -> None:
    index: SubjectIndex[str] = SubjectIndex()
    assert len(index) == 0
    assert index.add("tasks.>", "alice")
    assert not index.add("tasks.>", "alice")
    assert index.add("tasks.*", "alice")
    assert index.add("tasks.new", "bob")
    assert index.add(">", "carol")
    assert index.add("$presence.>", "carol")
    assert len(index) == 5
    assert index.patterns() == {"tasks.>", "tasks.*", "tasks.new", ">", "$presence.>"}
    assert sorted(index.match("tasks.new")) == [
        (">", "carol"),
        ("tasks.*", "alice"),
        ("tasks.>", "alice"),
        ("tasks.new", "bob"),
    ]
    assert sorted(index.match("tasks.a.b")) == [(">", "carol"), ("tasks.>", "alice")]
    assert index.match("tasks") == [(">", "carol")]
    assert index.match("tasksXYZ") == [(">", "carol")]
    assert index.match("$presence.agent-1") == [("$presence.>", "carol")]
    assert index.match("$other") == []

    assert not index.remove("tasks.old", "bob")
    assert not index.remove("tasks.new", "alice")
    assert not index.remove("tasks.*.x", "alice")
    assert not index.remove("", "alice")
    index.remove_subscriber("alice", ["tasks.>", "tasks.*", "nope.>"])
    assert len(index) == 3
    assert index.remove("tasks.new", "bob")
    assert index._node_count() == 1  # the '$presence' node
    index.remove_subscriber("carol", index.patterns())
    assert len(index) == 0
    assert index._node_count() == 0
    assert repr(index) == "<SubjectIndex: 0 subscriptions>"


def test_index_prunes_only_empty_nodes() -> None:
    index: SubjectIndex[int] = SubjectIndex()
    index.add("a.b.c", 1)
    index.add("a.b", 2)
    index.add("a.*.c.>", 3)
    nodes = index._node_count()
    assert nodes == 5  # a, a.b, a.b.c, a.*, a.*.c (no node for the ">")
    index.remove("a.b.c", 1)
    assert index._node_count() == 4
    assert index.match("a.b") == [("a.b", 2)]
    assert index.match("a.z.c.d") == [("a.*.c.>", 3)]
    index.remove("a.b", 2)
    assert index._node_count() == 3
    index.remove("a.*.c.>", 3)
    assert index._node_count() == 0


def test_index_add_validates_and_leaves_no_trace() -> None:
    index: SubjectIndex[object] = SubjectIndex()
    with pytest.raises(ProtocolError) as info:
        index.add("a..b", "x")
    assert info.value.code == "invalid_subject"
    with pytest.raises(TypeError):
        index.add("a.b", [])
    assert len(index) == 0
    assert index._node_count() == 0


def test_index_churn_does_not_grow() -> None:
    index: SubjectIndex[int] = SubjectIndex()
    index.add("keep.>", 0)
    for i in range(2000):
        pattern = f"agents.{i}.*.inbox.>"
        index.add(pattern, i)
        assert index.match(f"agents.{i}.x.inbox.y") == [(pattern, i)]
        index.remove(pattern, i)
    assert len(index) == 1
    assert index._node_count() == 1
