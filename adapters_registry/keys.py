"""Tenant API keys: `lsk_<id>_<secret>`. Only sha256(secret) is stored.

The secret has 256 bits of entropy, so a fast hash is enough (there is nothing to brute
force, unlike a password); the public id lets us find the row without a scan and can be
listed and logged. The whole key is shown once, at creation.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

_KEY = re.compile(r"^lsk_(?P<id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{43})$")


def new_key() -> tuple[str, str, str]:
    """(key_id, full key to hand out once, sha256 of the secret to store)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return key_id, f"lsk_{key_id}_{secret}", hash_secret(secret)


def parse(key: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    match = _KEY.fullmatch(key)
    return None if match is None else (match["id"], match["secret"])


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, stored_sha256: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_sha256)
