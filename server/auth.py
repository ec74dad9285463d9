"""Admin authentication: a bearer key from settings, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.errors import AdminDisabled, Forbidden, Unauthorized


def require_admin(request: Request) -> None:
    """401 without a key, 403 with a wrong one (or when no admin key is configured)."""
    expected: str | None = request.app.state.admin_key
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("admin API: send 'Authorization: Bearer <admin key>'")
    if expected is None:
        raise AdminDisabled(
            "admin API is disabled: no admin key is configured (LORASWAP_ADMIN_KEY)"
        )
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Forbidden("admin API: wrong admin key")
