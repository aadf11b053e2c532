"""Server keys: generated once into the state directory with mode 0600, or taken from the environment."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import SecretStr

from orchestrator.platform.secrets import hash_api_key, same_secret
from orchestrator.platform.settings import Settings
from orchestrator.platform.state_dir import ensure_server_keys


def test_first_start_generates_keys_with_mode_0600(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state", admin_api_key=None, secret_key=None)
    keys = ensure_server_keys(settings)
    assert keys.generated_admin_key
    assert keys.admin_key_path == tmp_path / "state" / "admin_api_key"
    for name in ("admin_api_key", "secret_key"):
        mode = stat.S_IMODE((tmp_path / "state" / name).stat().st_mode)
        assert mode == 0o600, name
    assert (tmp_path / "state" / "admin_api_key").read_text().strip() == keys.admin_api_key
    assert keys.admin_api_key not in repr(keys)
    assert keys.secret_key not in repr(keys)

    again = ensure_server_keys(settings)
    assert not again.generated_admin_key
    assert (again.admin_api_key, again.secret_key) == (keys.admin_api_key, keys.secret_key)


def test_environment_keys_win_and_nothing_is_written(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, admin_api_key=SecretStr("admin-x"), secret_key=SecretStr("secret-y"))
    keys = ensure_server_keys(settings)
    assert (keys.admin_api_key, keys.secret_key, keys.generated_admin_key) == ("admin-x", "secret-y", False)
    assert not (tmp_path / "admin_api_key").exists()
    assert not (tmp_path / "secret_key").exists()


def test_empty_key_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "admin_api_key").write_text("")
    with pytest.raises(RuntimeError, match="admin_api_key is empty"):
        ensure_server_keys(Settings(state_dir=tmp_path, admin_api_key=None, secret_key=SecretStr("s")))


def test_hmac_depends_on_the_secret_and_the_key() -> None:
    assert hash_api_key("s1", "k") != hash_api_key("s2", "k")
    assert hash_api_key("s1", "k") != hash_api_key("s1", "k2")
    assert len(hash_api_key("s1", "k")) == 64
    assert same_secret("abc", "abc")
    assert not same_secret("abc", "abd")


def test_default_database_is_sqlite_under_the_state_dir(tmp_path: Path) -> None:
    assert Settings(state_dir=tmp_path, database_url=None).resolved_database_url == (
        f"sqlite+aiosqlite:///{tmp_path}/orchestrator.db"
    )
