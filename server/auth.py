"""Who is calling: the operator (admin key), a tenant (API key), or anyone (open mode).

Keys are compared in constant time; tenant keys are checked against stored hashes
(adapters_registry/keys.py). With no tenant in the registry the server is open on loopback;
beyond loopback it then accepts only the admin key (see app.py).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from adapters_registry.records import TenantRecord
from adapters_registry.registry import Registry
from server.errors import AdminDisabled, InvalidApiKey, Unauthorized, WrongAdminKey


@dataclass(frozen=True)
class Principal:
    tenant: TenantRecord | None  # None: the operator, or anyone in open mode

    @property
    def tenant_name(self) -> str | None:
        return None if self.tenant is None else self.tenant.name


def _bearer(request: Request) -> str | None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given.strip() or None if scheme.lower() == "bearer" else None


def _is_admin(given: str | None, request: Request) -> bool:
    expected: str | None = request.app.state.admin_key
    return (
        given is not None
        and expected is not None
        and hmac.compare_digest(given.encode(), expected.encode())
    )


def require_admin(request: Request) -> None:
    """401 without a key, 403 with a wrong one (or when no admin key is configured)."""
    given = _bearer(request)
    if given is None:
        raise Unauthorized("admin API: send 'Authorization: Bearer <admin key>'")
    if request.app.state.admin_key is None:
        raise AdminDisabled(
            "admin API is disabled: no admin key is configured (LORASWAP_ADMIN_KEY)"
        )
    if not _is_admin(given, request):
        raise WrongAdminKey("admin API: wrong admin key")


def authenticate(request: Request) -> Principal:
    """The caller of an inference route; 401 when keys exist and none valid was sent."""
    given = _bearer(request)
    if _is_admin(given, request):
        return Principal(tenant=None)
    registry: Registry = request.app.state.router.registry
    if given is not None:
        tenant = registry.authenticate(given)
        if tenant is not None:
            return Principal(tenant=tenant)
    if not registry.has_tenants():
        if request.app.state.open_mode_allowed:
            return Principal(tenant=None)  # open mode: any or no key
        raise Unauthorized(
            "no tenants are configured and this server is not on loopback: "
            "only the admin key is accepted"
        )
    if given is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    raise InvalidApiKey("invalid API key")
