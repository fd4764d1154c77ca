"""``keygen``: write a key pair or print a key file's fingerprint; loading keys for the CLI."""

from __future__ import annotations

import argparse
import os

from artcafe_trio import KeyLoadError, PrivateKey, generate_private_key, load_private_key
from artcafe_trio.protocol import load_public_key

from .._util import write_private_file
from ._common import EXIT_OK, EXIT_USAGE, CliError, _note, _password_from_env

__all__ = ["_cmd_keygen", "_load_key_for_cli", "_looks_private"]


def _cmd_keygen(args: argparse.Namespace) -> int:
    if args.fingerprint is not None:
        return _print_fingerprint(args.fingerprint, args.password_env)
    if args.out is None:
        raise CliError("keygen needs --out PATH (or --fingerprint PATH)", EXIT_USAGE)
    out: str = os.path.abspath(args.out)
    pub = out + ".pub"
    password = _password_from_env(args.password_env)
    if not args.force:
        for path in (out, pub):
            if os.path.lexists(path):
                raise CliError(f"{path} already exists (use --force to overwrite)")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise CliError(f"directory {directory} does not exist")
    key = generate_private_key(args.type, rsa_bits=args.bits)
    pem = key.to_pem(password)
    _write_private(out, pem, force=args.force)
    line = key.public_key.to_openssh(comment=os.path.basename(out)) + "\n"
    with open(pub, "w", encoding="ascii") as f:
        f.write(line)
    print(key.public_key.fingerprint)
    kind = "encrypted " if password else ""
    _note(f"wrote {kind}{args.type} private key {out} (mode 0600) and public key {pub}")
    return EXIT_OK


def _print_fingerprint(path: str, password_env: str | None) -> int:
    """``keygen --fingerprint PATH``: the fingerprint of a private or public key file,
    as ``agents list`` shows it."""
    absolute = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(absolute):
        raise CliError(f"key file not found: {absolute}")
    if not _looks_private(absolute):
        print(load_public_key(absolute).fingerprint)
        return EXIT_OK
    pub = absolute + ".pub"
    quiet = password_env is None and os.path.exists(pub)
    key = _load_key_for_cli(absolute, password_env, quiet_if_encrypted=quiet)
    if key is None:  # encrypted, no password: its .pub file tells the same
        print(load_public_key(pub).fingerprint)
        _note(f"read from {pub} (the private key is encrypted)")
        return EXIT_OK
    print(key.public_key.fingerprint)
    return EXIT_OK


def _load_key_for_cli(
    path: str, password_env: str | None, *, quiet_if_encrypted: bool = False
) -> PrivateKey | None:
    """Load a private key, telling problems with the command line's own words.

    An encrypted key without ``--password-env`` names the flag; a password given for
    a key that is not encrypted is a warning (``None``: encrypted and ``quiet_if_encrypted``).
    """
    password = _password_from_env(password_env)
    absolute = os.path.abspath(os.path.expanduser(path))
    try:
        key = load_private_key(absolute)
    except KeyLoadError as exc:
        if exc.reason != "password_required":
            raise
        if quiet_if_encrypted and password is None:
            return None
        if password is None:
            raise CliError(
                f"private key {absolute} is encrypted: give its password with"
                " --password-env VAR (VAR: an environment variable that holds it)"
            ) from None
        try:
            return load_private_key(absolute, password)
        except KeyLoadError as wrong:
            if wrong.reason != "wrong_password":
                raise
            raise CliError(
                f"cannot decrypt private key {absolute}: wrong password in"
                f" --password-env {password_env}"
            ) from None
    if password is not None:
        _note(
            f"warning: private key {absolute} is not encrypted;"
            f" --password-env {password_env} is ignored"
        )
    return key


def _write_private(path: str, data: bytes, *, force: bool) -> None:
    """Write ``data`` to a new file created with mode 0600 (atomically replaced with force)."""
    if force:
        write_private_file(path, data)
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(path, flags, 0o600), "wb") as f:
        f.write(data)


def _looks_private(path: str) -> bool:
    """Whether ``path`` holds a private key (PEM or OpenSSH ``... PRIVATE KEY-----``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024)
    except OSError:
        return False
    return b"PRIVATE KEY-----" in head
