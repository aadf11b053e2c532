"""SSH key material: Ed25519 key pairs in OpenSSH formats, and parsing them into paramiko keys."""

from __future__ import annotations

import base64
import binascii
import io

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from provisioning.errors import SshError


def generate_keypair(comment: str = "") -> tuple[str, str]:
    """A new Ed25519 key pair: (private key in OpenSSH PEM, public key as one OpenSSH line)."""
    # Serialised with cryptography: paramiko 5.1's Ed25519Key.write_private_key raises AttributeError.
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    return private, _public_line(key.public_key(), comment)


def public_key_line(private_pem: str, comment: str = "") -> str:
    """The OpenSSH public line of a private key in OpenSSH PEM (what goes into authorized_keys)."""
    try:
        key = serialization.load_ssh_private_key(private_pem.encode(), None)
    except (ValueError, TypeError) as e:
        raise SshError("not an unencrypted OpenSSH private key") from e  # never quote key material
    return _public_line(key.public_key(), comment)


def _public_line(key: PublicKeyTypes, comment: str) -> str:
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}".rstrip()


def parse_public_key(line: str) -> paramiko.PKey:
    """The key of an OpenSSH public line ("type base64 [comment]")."""
    parts = line.split()
    if len(parts) < 2:
        raise SshError("pinned host key is not an OpenSSH public key line")
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1], validate=True))
    except (binascii.Error, paramiko.SSHException, ValueError) as e:
        raise SshError(f"pinned host key of type {parts[0]!r} cannot be parsed") from e


def load_private_key(pem: str) -> paramiko.PKey:
    """The Ed25519 client key from its OpenSSH PEM."""
    try:
        return paramiko.Ed25519Key.from_private_key(io.StringIO(pem))
    except (paramiko.SSHException, ValueError) as e:
        # The message must not quote the PEM: it is key material.
        raise SshError("client key is not an unencrypted OpenSSH Ed25519 private key") from e
