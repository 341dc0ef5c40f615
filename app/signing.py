"""Short-lived signed tokens for URLs the API serves itself (the local storage backend).

A token is ``base64url(json payload) . base64url(HMAC-SHA256)``; the payload carries the object
key, the operation and an expiry. Tampering with either part or using it late fails verification.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any


class InvalidToken(Exception):  # noqa: N818
    pass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(secret: str, payload: dict[str, Any], ttl_s: int) -> str:
    body = dict(payload, exp=int(time.time()) + ttl_s)
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    mac = hmac.new(secret.encode(), raw, hashlib.sha256).digest()
    return f"{_b64(raw)}.{_b64(mac)}"


def verify(secret: str, token: str) -> dict[str, Any]:
    """Return the payload of a valid, unexpired token; raise :class:`InvalidToken` otherwise."""
    try:
        raw_b64, mac_b64 = token.split(".", 1)
        raw, mac = _unb64(raw_b64), _unb64(mac_b64)
    except (ValueError, base64.binascii.Error) as exc:  # type: ignore[attr-defined]
        raise InvalidToken("malformed token") from exc
    expected = hmac.new(secret.encode(), raw, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise InvalidToken("bad signature")
    payload: dict[str, Any] = json.loads(raw)
    if payload.get("exp", 0) < time.time():
        raise InvalidToken("expired")
    return payload
