"""Encryption at rest for secrets the service must read back.

A webhook signing secret cannot be hashed like an API key: every delivery signs with it (HMAC). It
is stored encrypted instead, with Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``) under
the keys in ``MODELPRESS_ENCRYPTION_KEYS``: the first key encrypts, every listed key decrypts, so a
key is rotated by putting the new one first and keeping the old one listed until
``modelpress admin rotate-encryption-key`` has re-encrypted the rows. A database dump alone reveals
no secret.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import Text
from sqlalchemy.types import TypeDecorator

from app.config import get_settings


class SecretDecryptionError(RuntimeError):
    """A stored secret was encrypted under a key that is not in ``MODELPRESS_ENCRYPTION_KEYS``."""


@lru_cache
def _fernet(configured: str, data_dir: str) -> MultiFernet:
    # The two settings decide the keys; caching on them spares a key-file read per secret.
    return MultiFernet([Fernet(key.encode()) for key in get_settings().resolved_encryption_keys()])


def fernet() -> MultiFernet:
    """The configured keys (first encrypts, all decrypt)."""
    settings = get_settings()
    return _fernet(settings.encryption_keys, str(settings.data_dir.resolve()))


def encrypt(plaintext: str) -> str:
    return fernet().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return fernet().decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise SecretDecryptionError(
            "a stored secret cannot be decrypted: MODELPRESS_ENCRYPTION_KEYS lacks the key it was encrypted with"
        ) from exc


def reencrypt(token: str) -> str:
    """The same secret under the first (newest) key."""
    try:
        return fernet().rotate(token.encode()).decode()
    except InvalidToken as exc:
        raise SecretDecryptionError("a stored secret cannot be decrypted with MODELPRESS_ENCRYPTION_KEYS") from exc


class EncryptedText(TypeDecorator[str]):
    """A text column holding a Fernet token; Python code sees the plaintext."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else encrypt(value)

    def process_result_value(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else decrypt(value)
