"""Encryption at rest: embedded key files, round trips, rotation, and a clear error for a missing key."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from app.config import Settings, get_settings
from app.crypto import SecretDecryptionError, decrypt, encrypt, reencrypt


def test_embedded_key_file_is_private_shared_and_a_fernet_key(tmp_path: Path) -> None:
    first = Settings(data_dir=tmp_path).resolved_encryption_keys()
    again = Settings(data_dir=tmp_path).resolved_encryption_keys()
    assert first == again and len(first) == 1
    Fernet(first[0].encode())  # raises if it is not a valid key
    assert stat.S_IMODE((tmp_path / "encryption.key").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encryption.key"]  # no draft left behind


def test_round_trip_rotation_and_missing_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()

    def use(keys: str) -> None:
        monkeypatch.setenv("MODELPRESS_ENCRYPTION_KEYS", keys)
        monkeypatch.setenv("MODELPRESS_DATA_DIR", str(tmp_path))
        get_settings.cache_clear()

    use(old)
    token = encrypt("whsec_secret")
    assert "whsec_secret" not in token and decrypt(token) == "whsec_secret"
    use(f"{new},{old}")
    assert decrypt(token) == "whsec_secret"  # old tokens still read
    rotated = reencrypt(token)
    use(new)
    assert decrypt(rotated) == "whsec_secret"
    with pytest.raises(SecretDecryptionError, match="MODELPRESS_ENCRYPTION_KEYS"):
        decrypt(token)
    get_settings.cache_clear()
