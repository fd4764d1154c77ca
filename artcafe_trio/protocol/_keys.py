"""Agent keys: loading, saving, signing and verifying.

Two algorithms are supported: Ed25519 (``"ed25519"``) and RSA with PKCS#1 v1.5
signatures over SHA-256 (``"rsa-pkcs1-sha256"``, at least 2048 bits).

Private keys load from PEM PKCS#1 (``BEGIN RSA PRIVATE KEY``, also legacy
encrypted with ``Proc-Type`` headers), PEM PKCS#8 (plain or ``BEGIN ENCRYPTED
PRIVATE KEY``) and the OpenSSH format (``BEGIN OPENSSH PRIVATE KEY``).
Encrypted OpenSSH keys need the optional ``bcrypt`` package. Public keys are
OpenSSH lines such as ``ssh-ed25519 AAAA... comment``.

Every failure raises :class:`KeyLoadError` whose ``reason`` is one of:

``missing_file``
    the key file does not exist
``unreadable_file``
    the key file exists but cannot be read (permissions, a directory...)
``unreadable_format``
    the data is not a key, or is corrupted
``password_required``
    the private key is encrypted and no password was given
``wrong_password``
    the private key could not be decrypted with the given password
``unsupported_key_type``
    a valid key of another type (EC, DSA, Ed448, an unknown SSH type...)
``rsa_key_too_small``
    an RSA key shorter than ``MIN_RSA_BITS``
``missing_dependency``
    encrypted OpenSSH private keys need ``bcrypt``, which is not installed

A password may be ``str`` (encoded as UTF-8) or ``bytes``; an empty password
means no password. A password given for a key that is not encrypted is ignored,
with a warning on the ``artcafe_trio.keys`` logger. File paths in messages are
absolute. Messages never contain key material or passwords.

The module imports neither trio nor any socket library.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import TypeAlias

import attrs
from cryptography.exceptions import InternalError, InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from .._errors import KeyLoadError

__all__ = [
    "ALGORITHM_ED25519",
    "ALGORITHM_RSA",
    "AUTH_LABEL",
    "MIN_RSA_BITS",
    "PrivateKey",
    "PublicKey",
    "auth_payload",
    "generate_private_key",
    "load_private_key",
    "load_private_key_bytes",
    "load_public_key",
    "parse_public_key",
]

ALGORITHM_ED25519 = "ed25519"
ALGORITHM_RSA = "rsa-pkcs1-sha256"
AUTH_LABEL = "artcafe-trio/v1 auth"
MIN_RSA_BITS = 2048

log = logging.getLogger("artcafe_trio.keys")

_SSH_KEY_TYPES = {"ssh-ed25519": ALGORITHM_ED25519, "ssh-rsa": ALGORITHM_RSA}
_ALGORITHM_ALIASES = {
    ALGORITHM_ED25519: ALGORITHM_ED25519,
    "rsa": ALGORITHM_RSA,
    ALGORITHM_RSA: ALGORITHM_RSA,
}

_CryptoPublicKey: TypeAlias = ed25519.Ed25519PublicKey | rsa.RSAPublicKey
_CryptoPrivateKey: TypeAlias = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def auth_payload(tenant_id: str, agent_id: str, nonce: str) -> bytes:
    """Return the bytes an agent signs to authenticate to the hub."""
    return f"{AUTH_LABEL}\n{tenant_id}\n{agent_id}\n{nonce}".encode()


# --------------------------------------------------------------------------- helpers


def _ssh_blob(key: _CryptoPublicKey) -> bytes:
    """Return the SSH wire encoding of ``key`` (what fingerprints are computed on)."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return base64.b64decode(line.split()[1])


def _private_blob(key: _CryptoPrivateKey) -> bytes:
    return _ssh_blob(key.public_key())


def _algorithm_of(key: _CryptoPublicKey | _CryptoPrivateKey) -> str:
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return ALGORITHM_ED25519
    return ALGORITHM_RSA


def _type_name(key: object) -> str:
    """Describe a cryptography key object for an error message."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"EC ({key.curve.name})"
    name = type(key).__name__
    for suffix in ("PrivateKey", "PublicKey"):
        name = name.removesuffix(suffix)
    return name or "unknown"


def _check_supported(key: object, what: str) -> None:
    """Raise ``KeyLoadError`` unless ``key`` is an Ed25519 or large enough RSA key."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyLoadError(
                "rsa_key_too_small",
                f"{what} is a {key.key_size}-bit RSA key; "
                f"at least {MIN_RSA_BITS} bits are required",
            )
        return
    if isinstance(
        key,
        ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey,
    ):
        return
    raise KeyLoadError(
        "unsupported_key_type",
        f"{what} is an unsupported key type: {_type_name(key)} (use Ed25519 or RSA)",
    )


def _password_bytes(password: str | bytes | None) -> bytes | None:
    if password is None:
        return None
    if isinstance(password, str):
        password = password.encode()
    return password or None


def _encryption(password: str | bytes | None) -> serialization.KeySerializationEncryption:
    pw = _password_bytes(password)
    if pw is None:
        return serialization.NoEncryption()
    return serialization.BestAvailableEncryption(pw)


def _have_bcrypt() -> bool:
    return importlib.util.find_spec("bcrypt") is not None


_BCRYPT_HINT = "encrypted OpenSSH private keys need the 'bcrypt' package (pip install bcrypt)"


# --------------------------------------------------------------------------- key classes


@attrs.frozen(repr=False)
class PublicKey:
    """An Ed25519 or RSA public key.

    Build one with :func:`parse_public_key`, :func:`load_public_key` or
    :attr:`PrivateKey.public_key`. Keys compare equal when their public bytes are equal.
    """

    _key: _CryptoPublicKey = attrs.field(eq=_ssh_blob)
    algorithm: str = attrs.field(
        init=False, default=attrs.Factory(lambda self: _algorithm_of(self._key), takes_self=True)
    )

    @_key.validator
    def _validate_key(self, _attribute: object, value: object) -> None:
        _check_supported(value, "public key")

    def __repr__(self) -> str:
        return f"PublicKey(algorithm={self.algorithm!r}, fingerprint={self.fingerprint!r})"

    @property
    def fingerprint(self) -> str:
        """The SHA-256 fingerprint as ``ssh-keygen -l`` prints it: ``SHA256:...``."""
        digest = hashlib.sha256(_ssh_blob(self._key)).digest()
        return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")

    def to_openssh(self, comment: str = "") -> str:
        """Return the OpenSSH public key line, e.g. ``ssh-ed25519 AAAA... comment``."""
        if "\n" in comment or "\r" in comment:
            raise ValueError("an OpenSSH public key comment cannot contain a line break")
        line = self._key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ).decode("ascii")
        return f"{line} {comment}" if comment else line

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Return whether ``signature`` is a valid signature of ``data`` by this key."""
        try:
            if isinstance(self._key, ed25519.Ed25519PublicKey):
                self._key.verify(signature, data)
            else:
                self._key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, ValueError):
            return False
        return True

    def verify_auth(self, signature_b64: str, *, tenant_id: str, agent_id: str, nonce: str) -> bool:
        """Check a base64 signature of :func:`auth_payload`; malformed base64 gives ``False``."""
        try:
            signature = base64.b64decode(signature_b64, validate=True)
        except (binascii.Error, ValueError):
            return False
        return self.verify(signature, auth_payload(tenant_id, agent_id, nonce))


@attrs.frozen(repr=False)
class PrivateKey:
    """An Ed25519 or RSA private key. Its repr shows only the algorithm and fingerprint."""

    _key: _CryptoPrivateKey = attrs.field(eq=_private_blob)
    algorithm: str = attrs.field(
        init=False, default=attrs.Factory(lambda self: _algorithm_of(self._key), takes_self=True)
    )

    @_key.validator
    def _validate_key(self, _attribute: object, value: object) -> None:
        _check_supported(value, "private key")

    def __repr__(self) -> str:
        return (
            f"PrivateKey(algorithm={self.algorithm!r}, fingerprint={self.public_key.fingerprint!r})"
        )

    @property
    def public_key(self) -> PublicKey:
        """The matching public key."""
        return PublicKey(self._key.public_key())

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` (Ed25519, or RSA PKCS#1 v1.5 with SHA-256)."""
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(data)
        return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def sign_auth(self, *, tenant_id: str, agent_id: str, nonce: str) -> str:
        """Return the standard-base64 signature of :func:`auth_payload`."""
        signature = self.sign(auth_payload(tenant_id, agent_id, nonce))
        return base64.b64encode(signature).decode("ascii")

    def to_pem(self, password: str | bytes | None = None) -> bytes:
        """Serialize as PKCS#8 PEM, encrypted when a password is given."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            _encryption(password),
        )

    def to_openssh(self, password: str | bytes | None = None) -> bytes:
        """Serialize in the OpenSSH private key format, encrypted when a password is given.

        Encryption needs the ``bcrypt`` package (reason ``missing_dependency`` without it).
        """
        try:
            return self._key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                _encryption(password),
            )
        except UnsupportedAlgorithm as exc:
            raise KeyLoadError("missing_dependency", f"cannot encrypt: {_BCRYPT_HINT}") from exc


# --------------------------------------------------------------------------- private keys


def generate_private_key(algorithm: str = ALGORITHM_ED25519, *, rsa_bits: int = 3072) -> PrivateKey:
    """Generate a new key; ``algorithm`` is ``"ed25519"``, ``"rsa"`` or ``ALGORITHM_RSA``."""
    normalized = _ALGORITHM_ALIASES.get(algorithm.strip().lower())
    if normalized == ALGORITHM_ED25519:
        return PrivateKey(ed25519.Ed25519PrivateKey.generate())
    if normalized == ALGORITHM_RSA:
        if rsa_bits < MIN_RSA_BITS:
            raise KeyLoadError(
                "rsa_key_too_small",
                f"cannot generate a {rsa_bits}-bit RSA key; "
                f"at least {MIN_RSA_BITS} bits are required",
            )
        return PrivateKey(rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits))
    raise KeyLoadError(
        "unsupported_key_type",
        f"cannot generate a key of unsupported type {algorithm!r} "
        f"(use {ALGORITHM_ED25519!r} or 'rsa')",
    )


_Loader: TypeAlias = Callable[[bytes, bytes | None], object]


def _load_pem(data: bytes, password: bytes | None) -> object:
    return serialization.load_pem_private_key(data, password)


def _load_openssh(data: bytes, password: bytes | None) -> object:
    return serialization.load_ssh_private_key(data, password)


def _is_encrypted(loader: _Loader, data: bytes) -> bool:
    """Whether loading ``data`` without a password complains that it is encrypted."""
    try:
        loader(data, None)
    except TypeError:
        return True
    except (ValueError, UnsupportedAlgorithm, InternalError):
        return False
    return False


def _decode(loader: _Loader, data: bytes, password: bytes | None, what: str) -> object:
    """Run ``loader`` and translate cryptography's exceptions into ``KeyLoadError``."""
    openssh = loader is _load_openssh
    try:
        return loader(data, password)
    except TypeError:
        # cryptography raises TypeError both for "encrypted but no password" and
        # "password given but not encrypted"; tell them apart by what we passed.
        if password is None:
            raise KeyLoadError(
                "password_required", f"{what} is encrypted: pass private_key_password"
            ) from None  # the message says it all: no chained traceback
        key = _decode(loader, data, None, what)
        log.warning("%s is not encrypted: the password given is ignored", what)
        return key
    except UnsupportedAlgorithm as exc:
        if openssh and password is not None and not _have_bcrypt():
            raise KeyLoadError("missing_dependency", f"cannot load {what}: {_BCRYPT_HINT}") from exc
        raise KeyLoadError(
            "unsupported_key_type", f"{what} uses an unsupported key type or cipher: {exc}"
        ) from exc
    except (ValueError, InternalError) as exc:
        # InternalError: OpenSSL rejects some corrupted keys with an unclassified error.
        if password is not None and _is_encrypted(loader, data):
            raise KeyLoadError(
                "wrong_password", f"cannot decrypt {what}: wrong private_key_password"
            ) from None
        raise KeyLoadError(
            "unreadable_format", f"{what} is corrupted or not a valid private key"
        ) from exc


def _load_private(data: bytes, password: str | bytes | None, what: str) -> PrivateKey:
    stripped = data.lstrip()
    if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
        loader: _Loader = _load_openssh
    elif b"-----BEGIN " in data and b" PRIVATE KEY-----" in data:
        loader = _load_pem
    elif any(stripped.startswith(t.encode()) for t in ("ssh-", "ecdsa-", "sk-")):
        raise KeyLoadError(
            "unreadable_format", f"{what} is an OpenSSH public key, not a private key"
        )
    else:
        raise KeyLoadError(
            "unreadable_format",
            f"{what} is not in a supported format "
            "(expected PEM PKCS#1, PEM PKCS#8 or OpenSSH private key)",
        )
    key = _decode(loader, data, _password_bytes(password), what)
    _check_supported(key, what)
    assert isinstance(key, ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey)
    return PrivateKey(key)


def load_private_key_bytes(data: bytes, password: str | bytes | None = None) -> PrivateKey:
    """Load a private key from PEM PKCS#1, PEM PKCS#8 or OpenSSH bytes."""
    return _load_private(data, password, "private key")


def _read_file(path: str | os.PathLike[str], what: str) -> tuple[str, bytes]:
    name = os.path.abspath(os.path.expanduser(os.fspath(path)))  # absolute in messages
    try:
        with open(name, "rb") as f:
            return name, f.read()
    except FileNotFoundError:
        raise KeyLoadError("missing_file", f"{what} file not found: {name}") from None
    except OSError as exc:
        raise KeyLoadError(
            "unreadable_file", f"cannot read {what} file {name}: {exc.strerror or exc}"
        ) from None


def load_private_key(
    path: str | os.PathLike[str], password: str | bytes | None = None
) -> PrivateKey:
    """Load a private key file (``~`` is expanded); see :func:`load_private_key_bytes`."""
    name, data = _read_file(path, "private key")
    return _load_private(data, password, f"private key {name}")


# --------------------------------------------------------------------------- public keys


def _blob_key_type(blob: bytes) -> bytes | None:
    """Return the key type string at the start of an SSH wire blob, if well formed."""
    if len(blob) < 4:
        return None
    length = int.from_bytes(blob[:4], "big")
    if length == 0 or len(blob) < 4 + length:
        return None
    return blob[4 : 4 + length]


def _parse_public(line: str, what: str) -> PublicKey:
    parts = line.strip().split(None, 2)
    if len(parts) < 2:
        raise KeyLoadError("unreadable_format", f"{what} is not an OpenSSH public key line")
    key_type, b64 = parts[0], parts[1]
    try:
        blob = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyLoadError(
            "unreadable_format", f"{what} is not an OpenSSH public key line (bad base64)"
        ) from exc
    if _blob_key_type(blob) != key_type.encode():
        raise KeyLoadError(
            "unreadable_format", f"{what} is not an OpenSSH public key line (corrupted key data)"
        )
    if key_type not in _SSH_KEY_TYPES:
        raise KeyLoadError(
            "unsupported_key_type",
            f"{what} is an unsupported key type: {key_type[:64]!r} (use ssh-ed25519 or ssh-rsa)",
        )
    try:
        key = serialization.load_ssh_public_key(f"{key_type} {b64}".encode())
    except UnsupportedAlgorithm as exc:
        raise KeyLoadError(
            "unsupported_key_type", f"{what} is an unsupported key type: {key_type!r}"
        ) from exc
    except ValueError as exc:
        raise KeyLoadError("unreadable_format", f"{what} has corrupted key data") from exc
    _check_supported(key, what)
    assert isinstance(key, ed25519.Ed25519PublicKey | rsa.RSAPublicKey)
    return PublicKey(key)


def parse_public_key(line: str) -> PublicKey:
    """Parse an OpenSSH public key line such as ``ssh-ed25519 AAAA... comment``."""
    return _parse_public(line, "public key")


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    """Load the first non-empty, non-comment line of an OpenSSH public key file."""
    name, data = _read_file(path, "public key")
    what = f"public key {name}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeyLoadError("unreadable_format", f"{what} is not a text file") from exc
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return _parse_public(stripped, what)
    raise KeyLoadError("unreadable_format", f"{what} contains no key")
