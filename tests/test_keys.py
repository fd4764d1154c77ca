"""Tests for artcafe_trio.protocol._keys: formats, signatures, auth payloads and every error reason."""

from __future__ import annotations

import base64
import importlib.util
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa, x25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from artcafe_trio._errors import ArtcafeError, KeyLoadError
from artcafe_trio.protocol._keys import (
    ALGORITHM_ED25519,
    ALGORITHM_RSA,
    AUTH_LABEL,
    MIN_RSA_BITS,
    PrivateKey,
    PublicKey,
    auth_payload,
    generate_private_key,
    load_private_key,
    load_private_key_bytes,
    load_public_key,
    parse_public_key,
)

# bcrypt is a core dependency: encrypted OpenSSH private keys need it.
HAVE_BCRYPT = importlib.util.find_spec("bcrypt") is not None
FINGERPRINT_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")
PASSWORD = "correct horse"
HYPOTHESIS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def rsa_crypto() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)


@pytest.fixture(scope="module")
def rsa_key(rsa_crypto: rsa.RSAPrivateKey) -> PrivateKey:
    return PrivateKey(rsa_crypto)


@pytest.fixture(scope="module")
def rsa_1024() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


@pytest.fixture(scope="module")
def ed_key() -> PrivateKey:
    return generate_private_key()


@pytest.fixture(params=["ed25519", "rsa"])
def any_key(request: pytest.FixtureRequest, ed_key: PrivateKey, rsa_key: PrivateKey) -> PrivateKey:
    return ed_key if request.param == "ed25519" else rsa_key


def reason(fn: Callable[[], object]) -> KeyLoadError:
    """Run ``fn`` and return the KeyLoadError it must raise."""
    with pytest.raises(KeyLoadError) as info:
        fn()
    assert isinstance(info.value, ArtcafeError)
    return info.value


def pem(key: object, fmt: serialization.PrivateFormat, password: bytes | None = None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    assert hasattr(key, "private_bytes")
    data: bytes = key.private_bytes(serialization.Encoding.PEM, fmt, enc)
    return data


def ssh_string(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


# --------------------------------------------------------------------------- generation, signing


def test_generate_algorithms() -> None:
    assert generate_private_key().algorithm == ALGORITHM_ED25519
    assert generate_private_key("ed25519").algorithm == ALGORITHM_ED25519


@pytest.mark.parametrize("name", ["rsa", ALGORITHM_RSA])
def test_generate_rsa(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Avoid a slow real generation: check the requested size is passed through.
    calls: list[int] = []
    real = rsa.generate_private_key

    def fake(public_exponent: int, key_size: int) -> rsa.RSAPrivateKey:
        calls.append(key_size)
        return real(public_exponent=public_exponent, key_size=MIN_RSA_BITS)

    monkeypatch.setattr(rsa, "generate_private_key", fake)
    key = generate_private_key(name)
    assert key.algorithm == ALGORITHM_RSA
    assert calls == [3072]
    generate_private_key(name, rsa_bits=4096)
    assert calls == [3072, 4096]


def test_sign_verify(any_key: PrivateKey) -> None:
    data = b"hello hub"
    sig = any_key.sign(data)
    assert len(sig) == (64 if any_key.algorithm == ALGORITHM_ED25519 else MIN_RSA_BITS // 8)
    pub = any_key.public_key
    assert pub.algorithm == any_key.algorithm
    assert pub.verify(sig, data)
    assert not pub.verify(sig, data + b"!")
    assert not pub.verify(b"", data)
    assert not pub.verify(sig[:-1], data)
    other = generate_private_key()
    assert not other.public_key.verify(sig, data)


def test_rsa_signature_is_pkcs1v15_sha256(
    rsa_crypto: rsa.RSAPrivateKey, rsa_key: PrivateKey
) -> None:
    sig = rsa_key.sign(b"payload")
    rsa_crypto.public_key().verify(sig, b"payload", padding.PKCS1v15(), hashes.SHA256())


def test_ed25519_rfc8032_vector() -> None:
    secret = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    key = PrivateKey(ed25519.Ed25519PrivateKey.from_private_bytes(secret))
    expected = bytes.fromhex(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065"
        "224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    assert key.sign(b"") == expected
    assert key.public_key.verify(expected, b"")


@HYPOTHESIS
@given(signature=st.binary(max_size=600), data=st.binary(max_size=64))
def test_verify_never_raises(any_key: PrivateKey, signature: bytes, data: bytes) -> None:
    assert any_key.public_key.verify(signature, data) is False


# --------------------------------------------------------------------------- auth


def test_auth_payload_layout() -> None:
    assert AUTH_LABEL == "artcafe-trio/v1 auth"
    assert auth_payload("t1", "a1", "n1") == b"artcafe-trio/v1 auth\nt1\na1\nn1"
    assert auth_payload("t\u00e9", "", "x") == "artcafe-trio/v1 auth\nt\u00e9\n\nx".encode()


@HYPOTHESIS
@given(tenant=st.text(), agent=st.text(), nonce=st.text())
def test_auth_payload_property(ed_key: PrivateKey, tenant: str, agent: str, nonce: str) -> None:
    payload = auth_payload(tenant, agent, nonce)
    assert payload == f"{AUTH_LABEL}\n{tenant}\n{agent}\n{nonce}".encode()
    sig = ed_key.sign_auth(tenant_id=tenant, agent_id=agent, nonce=nonce)
    assert base64.b64decode(sig, validate=True) == ed_key.sign(payload)
    assert ed_key.public_key.verify_auth(sig, tenant_id=tenant, agent_id=agent, nonce=nonce)


def test_verify_auth(any_key: PrivateKey) -> None:
    ids = {"tenant_id": "tenant-1", "agent_id": "agent-1", "nonce": "bm9uY2U"}
    sig = any_key.sign_auth(**ids)
    pub = any_key.public_key
    assert pub.verify_auth(sig, **ids)
    assert not pub.verify_auth(sig, **{**ids, "tenant_id": "tenant-2"})
    assert not pub.verify_auth(sig, **{**ids, "agent_id": "agent-2"})
    assert not pub.verify_auth(sig, **{**ids, "nonce": "other"})

    raw = bytearray(base64.b64decode(sig))
    raw[len(raw) // 2] ^= 0x01
    assert not pub.verify_auth(base64.b64encode(bytes(raw)).decode(), **ids)

    other = generate_private_key()
    assert not pub.verify_auth(other.sign_auth(**ids), **ids)

    for bad in ["", "!!!!", sig[:-1], sig + "A", sig.replace("=", ""), "\u00e9\u00e9\u00e9\u00e9"]:
        if bad != sig:
            assert not pub.verify_auth(bad, **ids)


@HYPOTHESIS
@given(text=st.text(max_size=400))
def test_verify_auth_never_raises(any_key: PrivateKey, text: str) -> None:
    assert not any_key.public_key.verify_auth(text, tenant_id="t", agent_id="a", nonce="n")


# --------------------------------------------------------------------------- private key formats


def _roundtrip(key: PrivateKey, data: bytes, password: str | bytes | None) -> None:
    loaded = load_private_key_bytes(data, password)
    assert loaded == key
    assert loaded.algorithm == key.algorithm
    assert loaded.public_key == key.public_key
    assert key.public_key.verify(loaded.sign(b"x"), b"x")


@pytest.mark.parametrize("password", [None, PASSWORD, PASSWORD.encode()])
def test_pkcs8_roundtrip(any_key: PrivateKey, password: str | bytes | None) -> None:
    data = any_key.to_pem(password)
    header = b"ENCRYPTED PRIVATE KEY" if password else b"-----BEGIN PRIVATE KEY-----"
    assert header in data
    _roundtrip(any_key, data, password)


def test_to_pem_empty_password_means_plain(ed_key: PrivateKey) -> None:
    assert b"-----BEGIN PRIVATE KEY-----" in ed_key.to_pem("")


@pytest.mark.parametrize("password", [None, PASSWORD])
def test_pkcs1_roundtrip(
    rsa_crypto: rsa.RSAPrivateKey, rsa_key: PrivateKey, password: str | None
) -> None:
    pw = password.encode() if password else None
    data = pem(rsa_crypto, serialization.PrivateFormat.TraditionalOpenSSL, pw)
    assert data.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    if password:
        assert b"Proc-Type: 4,ENCRYPTED" in data
    _roundtrip(rsa_key, data, password)


def test_openssh_roundtrip(any_key: PrivateKey) -> None:
    data = any_key.to_openssh()
    assert data.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    _roundtrip(any_key, data, None)


def test_bcrypt_is_installed_as_a_core_dependency() -> None:
    assert HAVE_BCRYPT


@pytest.mark.parametrize("password", [PASSWORD, PASSWORD.encode()])
def test_openssh_encrypted_roundtrip(ed_key: PrivateKey, password: str | bytes) -> None:
    data = ed_key.to_openssh(password)
    _roundtrip(ed_key, data, password)
    assert reason(lambda: load_private_key_bytes(data)).reason == "password_required"
    assert reason(lambda: load_private_key_bytes(data, "nope")).reason == "wrong_password"


def test_password_ignored_for_plain_key(any_key: PrivateKey) -> None:
    _roundtrip(any_key, any_key.to_pem(), PASSWORD)
    _roundtrip(any_key, any_key.to_openssh(), PASSWORD)


def test_load_private_key_file(tmp_path: Path, ed_key: PrivateKey) -> None:
    path = tmp_path / "agent.pem"
    path.write_bytes(ed_key.to_pem(PASSWORD))
    assert load_private_key(path, PASSWORD) == ed_key
    assert load_private_key(str(path), PASSWORD.encode()) == ed_key


def test_load_private_key_expands_user(
    tmp_path: Path, ed_key: PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "id").write_bytes(ed_key.to_openssh())
    assert load_private_key("~/id") == ed_key


def test_private_key_repr_has_no_key_material(any_key: PrivateKey) -> None:
    fp = any_key.public_key.fingerprint
    expected = f"PrivateKey(algorithm={any_key.algorithm!r}, fingerprint={fp!r})"
    assert repr(any_key) == expected
    assert str(any_key) == expected
    secret_body = b"".join(any_key.to_pem().splitlines()[1:-1]).decode()
    for chunk in (secret_body[i : i + 16] for i in range(0, len(secret_body) - 16, 16)):
        assert chunk not in repr(any_key)
    assert repr(any_key.public_key) == (
        f"PublicKey(algorithm={any_key.algorithm!r}, fingerprint={fp!r})"
    )


def test_equality_and_hash(ed_key: PrivateKey, rsa_key: PrivateKey) -> None:
    again = load_private_key_bytes(ed_key.to_pem())
    assert again == ed_key and hash(again) == hash(ed_key)
    assert again.public_key == ed_key.public_key
    assert hash(again.public_key) == hash(ed_key.public_key)
    assert ed_key != rsa_key and ed_key.public_key != rsa_key.public_key
    assert ed_key != generate_private_key()


# --------------------------------------------------------------------------- public keys


def test_public_openssh_roundtrip(any_key: PrivateKey) -> None:
    pub = any_key.public_key
    line = pub.to_openssh()
    prefix = "ssh-ed25519 AAAA" if pub.algorithm == ALGORITHM_ED25519 else "ssh-rsa AAAA"
    assert line.startswith(prefix)
    assert line == line.strip() and len(line.split()) == 2
    assert pub.to_openssh("agent@host") == f"{line} agent@host"
    assert parse_public_key(line) == pub
    assert parse_public_key(f"  {line} agent key with spaces \n") == pub
    assert parse_public_key(pub.to_openssh("c")).algorithm == pub.algorithm


def test_public_comment_rejects_newline(ed_key: PrivateKey) -> None:
    with pytest.raises(ValueError, match="line break"):
        ed_key.public_key.to_openssh("a\nb")


def test_fingerprint(any_key: PrivateKey) -> None:
    pub = any_key.public_key
    assert FINGERPRINT_RE.match(pub.fingerprint)
    import hashlib

    blob = base64.b64decode(pub.to_openssh().split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert pub.fingerprint == f"SHA256:{digest}"


def test_load_public_key_file(tmp_path: Path, ed_key: PrivateKey) -> None:
    path = tmp_path / "agent.pub"
    path.write_text(f"# my agent\n\n   \n{ed_key.public_key.to_openssh('c')}\n# trailing\n")
    assert load_public_key(path) == ed_key.public_key
    assert load_public_key(str(path)) == ed_key.public_key


# --------------------------------------------------------------------------- error reasons


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pem"
    err = reason(lambda: load_private_key(path))
    assert err.reason == "missing_file"
    assert str(path) in str(err)
    err = reason(lambda: load_public_key(path))
    assert err.reason == "missing_file"
    assert str(path) in str(err)


def test_unreadable_file(tmp_path: Path) -> None:
    # A directory cannot be read as a file (permission tricks do not work as root).
    assert reason(lambda: load_private_key(tmp_path)).reason == "unreadable_file"
    assert reason(lambda: load_public_key(tmp_path)).reason == "unreadable_file"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        bytes(range(256)),
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN RSA PRIVATE KEY-----\nnot base64!\n-----END RSA PRIVATE KEY-----\n",
        b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ],
)
def test_garbage_private_key(data: bytes, tmp_path: Path) -> None:
    assert reason(lambda: load_private_key_bytes(data)).reason == "unreadable_format"
    assert reason(lambda: load_private_key_bytes(data, PASSWORD)).reason == "unreadable_format"
    path = tmp_path / "key"
    path.write_bytes(data)
    err = reason(lambda: load_private_key(path))
    assert err.reason == "unreadable_format" and str(path) in str(err)


def test_public_key_given_as_private_key(ed_key: PrivateKey) -> None:
    err = reason(lambda: load_private_key_bytes(ed_key.public_key.to_openssh("c").encode()))
    assert err.reason == "unreadable_format"
    assert "public key" in str(err)


def _flip(data: bytes, index: int) -> bytes:
    lines = data.splitlines(keepends=True)
    body = bytearray(b"".join(lines[1:-1]))
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    positions = [i for i, c in enumerate(body) if c in alphabet]
    pos = positions[index % len(positions)]
    body[pos] = alphabet[(alphabet.index(body[pos]) + 1) % 64]
    return lines[0] + bytes(body) + lines[-1]


@HYPOTHESIS
@given(index=st.integers(min_value=0), fmt=st.sampled_from(["pem", "pem-enc", "openssh"]))
def test_corrupted_private_key_raises_only_key_load_error(
    ed_key: PrivateKey, index: int, fmt: str
) -> None:
    password = PASSWORD if fmt == "pem-enc" else None
    data = ed_key.to_openssh() if fmt == "openssh" else ed_key.to_pem(password)
    try:
        load_private_key_bytes(_flip(data, index), password)
    except KeyLoadError as exc:
        assert exc.reason in {"unreadable_format", "wrong_password", "unsupported_key_type"}


@pytest.mark.parametrize("password", ["", None])
def test_password_required(
    rsa_crypto: rsa.RSAPrivateKey, ed_key: PrivateKey, tmp_path: Path, password: str | None
) -> None:
    pkcs1 = pem(rsa_crypto, serialization.PrivateFormat.TraditionalOpenSSL, PASSWORD.encode())
    for data in (ed_key.to_pem(PASSWORD), pkcs1):
        err = reason(lambda: load_private_key_bytes(data, password))  # noqa: B023
        assert err.reason == "password_required"
        assert "private_key_password" in str(err)
    path = tmp_path / "enc.pem"
    path.write_bytes(ed_key.to_pem(PASSWORD))
    err = reason(lambda: load_private_key(path, password))
    assert err.reason == "password_required"
    assert str(err) == f"private key {path} is encrypted: pass private_key_password"


def test_wrong_password(rsa_crypto: rsa.RSAPrivateKey, ed_key: PrivateKey) -> None:
    pkcs1 = pem(rsa_crypto, serialization.PrivateFormat.TraditionalOpenSSL, PASSWORD.encode())
    for data in (ed_key.to_pem(PASSWORD), pkcs1):
        for wrong in ("wrong password", b"wrong password"):
            err = reason(lambda: load_private_key_bytes(data, wrong))  # noqa: B023
            assert err.reason == "wrong_password"
            assert "wrong password" not in str(err) and PASSWORD not in str(err)


def _unsupported_keys() -> list[tuple[str, object]]:
    return [
        ("EC (secp256r1)", ec.generate_private_key(ec.SECP256R1())),
        ("Ed448", ed448.Ed448PrivateKey.generate()),
        ("X25519", x25519.X25519PrivateKey.generate()),
        ("DSA", dsa.generate_private_key(1024)),
    ]


@pytest.mark.parametrize(("name", "key"), _unsupported_keys())
def test_unsupported_private_key(name: str, key: object) -> None:
    data = pem(key, serialization.PrivateFormat.PKCS8)
    err = reason(lambda: load_private_key_bytes(data))
    assert err.reason == "unsupported_key_type"
    assert name in str(err)
    err = reason(lambda: PrivateKey(key))  # type: ignore[arg-type]
    assert err.reason == "unsupported_key_type"


def test_unsupported_openssh_private_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    data = pem(key, serialization.PrivateFormat.OpenSSH)
    err = reason(lambda: load_private_key_bytes(data))
    assert err.reason == "unsupported_key_type"
    assert "EC (secp256r1)" in str(err)


def test_unsupported_public_keys() -> None:
    ec_line = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    err = reason(lambda: parse_public_key(ec_line))
    assert err.reason == "unsupported_key_type"
    assert "ecdsa-sha2-nistp256" in str(err)

    blob = ssh_string(b"ssh-foo") + ssh_string(b"whatever")
    err = reason(lambda: parse_public_key(f"ssh-foo {base64.b64encode(blob).decode()} c"))
    assert err.reason == "unsupported_key_type"
    assert "ssh-foo" in str(err)

    ec_pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert reason(lambda: PublicKey(ec_pub)).reason == "unsupported_key_type"  # type: ignore[arg-type]


def test_rsa_too_small(rsa_1024: rsa.RSAPrivateKey) -> None:
    for data in (
        pem(rsa_1024, serialization.PrivateFormat.PKCS8),
        pem(rsa_1024, serialization.PrivateFormat.TraditionalOpenSSL),
        pem(rsa_1024, serialization.PrivateFormat.OpenSSH),
    ):
        err = reason(lambda: load_private_key_bytes(data))  # noqa: B023
        assert err.reason == "rsa_key_too_small"
        assert "1024" in str(err)
    line = (
        rsa_1024.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    err = reason(lambda: parse_public_key(line))
    assert err.reason == "rsa_key_too_small" and "1024" in str(err)
    assert reason(lambda: PrivateKey(rsa_1024)).reason == "rsa_key_too_small"
    assert reason(lambda: PublicKey(rsa_1024.public_key())).reason == "rsa_key_too_small"
    err = reason(lambda: generate_private_key("rsa", rsa_bits=1024))
    assert err.reason == "rsa_key_too_small" and "1024" in str(err)


def test_generate_unknown_algorithm() -> None:
    err = reason(lambda: generate_private_key("ecdsa"))
    assert err.reason == "unsupported_key_type"
    assert "ecdsa" in str(err)


def test_garbage_public_key_lines(ed_key: PrivateKey, rsa_key: PrivateKey, tmp_path: Path) -> None:
    ed_b64 = ed_key.public_key.to_openssh().split()[1]
    rsa_b64 = rsa_key.public_key.to_openssh().split()[1]
    truncated = base64.b64encode(base64.b64decode(ed_b64)[:-5]).decode()
    for line in [
        "",
        "   ",
        "hello",
        "hello world",
        "ssh-ed25519",
        "ssh-ed25519 !!!notbase64",
        "ssh-ed25519 AAAA",
        f"ssh-rsa {ed_b64}",  # type name does not match the data
        f"ssh-ed25519 {rsa_b64}",
        f"ssh-ed25519 {truncated}",
        f"ssh-ed25519 {ed_b64[:-4]}",
    ]:
        err = reason(lambda: parse_public_key(line))  # noqa: B023
        assert err.reason == "unreadable_format", line

    path = tmp_path / "empty.pub"
    path.write_text("# only a comment\n\n")
    err = reason(lambda: load_public_key(path))
    assert err.reason == "unreadable_format" and str(path) in str(err)
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert reason(lambda: load_public_key(path)).reason == "unreadable_format"


@HYPOTHESIS
@given(line=st.text(max_size=200))
def test_parse_public_key_raises_only_key_load_error(line: str) -> None:
    try:
        parse_public_key(line)
    except KeyLoadError as exc:
        assert exc.reason in {"unreadable_format", "unsupported_key_type", "rsa_key_too_small"}


# --------------------------------------------------------------------------- ssh-keygen interop


@pytest.fixture
def ssh_keygen() -> str:
    path = shutil.which("ssh-keygen")
    if path is None:
        pytest.skip("ssh-keygen not found on PATH (install openssh-client to run interop tests)")
    return path


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=60).stdout


def _keygen_fingerprint(ssh_keygen: str, pub_path: Path) -> str:
    return _run(ssh_keygen, "-l", "-E", "sha256", "-f", str(pub_path)).split()[1]


@pytest.mark.parametrize(
    ("key_type", "fmt", "passphrase"),
    [
        ("ed25519", None, ""),
        ("ed25519", None, PASSWORD),
        ("rsa", None, ""),
        ("rsa", "PEM", ""),
        ("rsa", "PEM", PASSWORD),
        ("rsa", "PKCS8", PASSWORD),
    ],
)
def test_ssh_keygen_keys(
    ssh_keygen: str, tmp_path: Path, key_type: str, fmt: str | None, passphrase: str
) -> None:
    path = tmp_path / f"id_{key_type}"
    args = [ssh_keygen, "-q", "-t", key_type, "-N", passphrase, "-C", "me@host", "-f", str(path)]
    if key_type == "rsa":
        args += ["-b", "2048"]
    if fmt:
        args += ["-m", fmt]
    _run(*args)
    head = path.read_bytes().splitlines()[0]
    expected_head = {
        None: b"-----BEGIN OPENSSH PRIVATE KEY-----",
        "PEM": b"-----BEGIN RSA PRIVATE KEY-----",
        "PKCS8": b"-----BEGIN ENCRYPTED PRIVATE KEY-----",
    }[fmt]
    assert head == expected_head

    pub_path = path.with_name(path.name + ".pub")
    if passphrase:
        assert reason(lambda: load_private_key(path)).reason == "password_required"
        assert reason(lambda: load_private_key(path, "wrong password")).reason == "wrong_password"

    key = load_private_key(path, passphrase or None)
    expected_alg = ALGORITHM_ED25519 if key_type == "ed25519" else ALGORITHM_RSA
    assert key.algorithm == expected_alg
    pub = load_public_key(pub_path)
    assert key.public_key == pub
    assert pub.fingerprint == _keygen_fingerprint(ssh_keygen, pub_path)
    assert key.public_key.fingerprint == pub.fingerprint
    assert pub.to_openssh("me@host") == pub_path.read_text().strip()
    sig = key.sign_auth(tenant_id="t", agent_id="a", nonce="n")
    assert parse_public_key(pub_path.read_text()).verify_auth(
        sig, tenant_id="t", agent_id="a", nonce="n"
    )


def _export_cases() -> list[tuple[str, str, str | None]]:
    # OpenSSH before 9.6 cannot read PKCS#8 Ed25519 keys at all, so ssh-keygen checks
    # Ed25519 in its own format only; PKCS#8 Ed25519 is covered by the round trips above.
    cases: list[tuple[str, str, str | None]] = [("rsa", "pem", None), ("rsa", "pem", PASSWORD)]
    for algorithm in ("rsa", "ed25519"):
        cases += [(algorithm, "openssh", None), (algorithm, "openssh", PASSWORD)]
    return cases


@pytest.mark.parametrize(("algorithm", "fmt", "password"), _export_cases())
def test_ssh_keygen_reads_our_keys(
    ssh_keygen: str,
    tmp_path: Path,
    ed_key: PrivateKey,
    rsa_key: PrivateKey,
    algorithm: str,
    fmt: str,
    password: str | None,
) -> None:
    any_key = ed_key if algorithm == "ed25519" else rsa_key
    path = tmp_path / "ours"
    data = any_key.to_pem(password) if fmt == "pem" else any_key.to_openssh(password)
    path.write_bytes(data)
    path.chmod(0o600)
    cmd = [ssh_keygen, "-y", "-P", password or "", "-f", str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    derived = result.stdout.strip()
    assert parse_public_key(derived) == any_key.public_key
    assert derived.split()[:2] == any_key.public_key.to_openssh().split()

    pub_path = tmp_path / "ours.pub"
    pub_path.write_text(any_key.public_key.to_openssh("x") + "\n")
    assert _keygen_fingerprint(ssh_keygen, pub_path) == any_key.public_key.fingerprint
