"""Secrets: the client API keys' material (generation, the keyed hash stored in place of a key, constant-time
checks, the allowlist of where a key may be used from), and the encryption at rest of the secrets the orchestrator
must use again (engine keys, bot and endpoint tokens): Fernet under a key derived from the server secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import string

from cryptography.fernet import Fernet, InvalidToken

API_KEY_PREFIX = "sk-"
CONNECTOR_KEY_PREFIX = "br-"
_ALPHANUMERIC = string.ascii_letters + string.digits


def new_api_key() -> str:
    """A fresh client key; 256 bits of entropy behind a recognisable prefix."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def new_connector_key() -> str:
    """A key of the connector surface: `br-` and 29 alphanumerics (~172 bits), the connector's own shape."""
    return CONNECTOR_KEY_PREFIX + "".join(secrets.choice(_ALPHANUMERIC) for _ in range(29))


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def hash_api_key(secret_key: str, api_key: str) -> str:
    """HMAC-SHA256 of the key under the server secret: a leaked table reveals no usable key."""
    return hmac.new(secret_key.encode(), api_key.encode(), hashlib.sha256).hexdigest()


def key_hint(api_key: str) -> str:
    """The last four characters, enough for an operator to tell keys apart in a listing."""
    return api_key[-4:]


def same_secret(given: str, expected: str) -> bool:
    """Compare two secrets in time independent of where they differ."""
    return hmac.compare_digest(given.encode(), expected.encode())


MAX_ALLOWED_IPS = 100


def allowlist(entries: list[str]) -> list[str]:
    """IP addresses or networks a key may be used from, normalised ("10.0.0.1" -> "10.0.0.1/32"); ValueError
    names the first entry that is neither. Stored comma-joined; an empty list means anywhere."""
    if len(entries) > MAX_ALLOWED_IPS:
        raise ValueError(f"at most {MAX_ALLOWED_IPS} entries")
    out = []
    for entry in entries:
        try:
            out.append(str(ipaddress.ip_network(entry.strip(), strict=False)))
        except ValueError as e:
            raise ValueError(f"{entry!r} is not an IP address or network") from e
    return out


_CONTEXT = b"orchestrator/secrets-at-rest/v1"

MASK = "********"
"""What a read shows for a stored secret; sent back unchanged on a save, it keeps the stored one."""


class SecretBox:
    def __init__(self, secret_key: str) -> None:
        # A key of its own, derived from the server secret: the HMAC of API keys never shares a key with this.
        derived = hashlib.sha256(_CONTEXT + secret_key.encode()).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(derived))

    def seal(self, plain: str) -> str:
        return self._fernet.encrypt(plain.encode()).decode()

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken as e:
            raise ValueError("a secret could not be decrypted: was ORCH_SECRET_KEY changed?") from e
