"""Encryption at rest of the secrets the orchestrator must use again (engine keys): Fernet under the server secret."""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken

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
