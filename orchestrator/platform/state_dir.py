"""The state directory: where the server keeps the keys it generated for itself on first start."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.platform.secrets import new_api_key, new_secret
from orchestrator.platform.settings import Settings

ADMIN_KEY_FILE = "admin_api_key"
SECRET_KEY_FILE = "secret_key"  # noqa: S105  (a file name, not a secret)


@dataclass(frozen=True)
class ServerKeys:
    admin_api_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    generated_admin_key: bool
    """True only on the start that created the admin key file: the one time it is shown."""
    admin_key_path: Path | None
    """Where the admin key lives when it came from the state directory."""


def _read_or_create(path: Path) -> tuple[str, bool]:
    """Read a secret file, or create it with mode 0600 (O_EXCL: two starting servers agree on one)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        value = path.read_text().strip()
        if not value:
            raise RuntimeError(f"{path} is empty; delete it to generate a new key") from None
        return value, False
    value = new_api_key() if path.name == ADMIN_KEY_FILE else new_secret()
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value, True


def ensure_server_keys(settings: Settings) -> ServerKeys:
    """Keys from the environment win; otherwise they live in the state directory."""
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if settings.secret_key is not None:
        secret = settings.secret_key.get_secret_value()
    else:
        secret, _ = _read_or_create(settings.state_dir / SECRET_KEY_FILE)
    if settings.admin_api_key is not None:
        return ServerKeys(settings.admin_api_key.get_secret_value(), secret, False, None)
    admin_path = settings.state_dir / ADMIN_KEY_FILE
    admin, generated = _read_or_create(admin_path)
    return ServerKeys(admin, secret, generated, admin_path)
