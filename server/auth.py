"""Who is calling: the operator (admin key), a tenant (API key), or anyone (open mode).

Keys are compared in constant time; tenant keys are checked against stored hashes
(adapters_registry/keys.py). With no tenant in the registry the server is open, but only
to local callers (see `local_caller`) unless the operator opened it to the network
(`--unsafe-allow-open-network`); beyond loopback it then accepts only the admin key (see
app.py). /metrics takes the metrics key or the admin key (`require_metrics`).

The decisions are functions of plain values (`principal_for`, `admin_refusal`), so that
the admission middleware (server/lifecycle.py) and the Ray ingress (server/ingress.py)
make exactly the decisions the routes make, before reading a body or routing anything.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from fastapi import Request

from adapters_registry.records import TenantRecord
from adapters_registry.registry import Registry
from server.errors import (
    AdminDisabled,
    Forbidden,
    InvalidApiKey,
    ServerError,
    Unauthorized,
    WrongAdminKey,
)

OpenMode = Literal["off", "local", "any"]
"""Whether a server without tenants serves anyone: "local" callers only (bound to
loopback), "any" (the operator passed --unsafe-allow-open-network), or nobody ("off")."""

# Headers a reverse proxy adds. A local proxy connects from loopback, so its requests
# would pass for local ones: open mode refuses any request that carries one of these.
PROXY_HEADERS = frozenset({b"forwarded", b"x-forwarded-for", b"x-real-ip"})


@dataclass(frozen=True)
class Principal:
    tenant: TenantRecord | None  # None: the operator, or anyone in open mode

    @property
    def tenant_name(self) -> str | None:
        return None if self.tenant is None else self.tenant.name


def bearer(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The token of `Authorization: Bearer <token>` among raw ASGI headers, if any."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, given = value.decode("latin-1").partition(" ")
            return given.strip() or None if scheme.lower() == "bearer" else None
    return None


def same_key(given: str | None, expected: str | None) -> bool:
    return (
        given is not None
        and expected is not None
        and hmac.compare_digest(given.encode(), expected.encode())
    )


def local_caller(client: tuple[str, int] | None, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether open mode may serve this request: it came from a loopback peer, and no
    proxy relayed it (a same-host proxy, sidecar or tunnel connects from loopback too).

    `client` is the TCP peer the server saw (never taken from a header). A peer that is
    not an IP address is no network peer at all: a Unix socket (None) or an in-process
    transport (Starlette's TestClient says "testclient"); TCP servers always give an IP.
    """
    if any(name.lower() in PROXY_HEADERS for name, _ in headers):
        return False
    if client is None:
        return True
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return True
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def principal_for(
    given: str | None,
    *,
    admin_key: str | None,
    registry: Registry,
    open_mode: OpenMode,
    local: bool,
) -> Principal:
    """The caller of an inference route; raises 401 when keys exist and none valid was
    sent, or when open mode does not extend to this caller."""
    if same_key(given, admin_key):
        return Principal(tenant=None)
    if given is not None:
        tenant = registry.authenticate(given)
        if tenant is not None:
            return Principal(tenant=tenant)
    if not registry.has_tenants():
        if open_mode == "any" or (open_mode == "local" and local):
            return Principal(tenant=None)  # open mode: any or no key
        if open_mode == "local":
            raise Unauthorized(
                "no tenants are configured: without a key this server serves only local "
                "callers, not requests from other hosts or relayed by a proxy"
            )
        raise Unauthorized(
            "no tenants are configured and this server is not on loopback: "
            "only the admin key is accepted"
        )
    if given is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    raise InvalidApiKey("invalid API key")


def admin_refusal(given: str | None, admin_key: str | None) -> ServerError | None:
    """Why a call to the admin API is refused (None: it is the admin): 401 without a key,
    403 with a wrong one, or when no admin key is configured."""
    if given is None:
        return Unauthorized("admin API: send 'Authorization: Bearer <admin key>'")
    if admin_key is None:
        return AdminDisabled(
            "admin API is disabled: no admin key is configured (LORASWAP_ADMIN_KEY)"
        )
    if not same_key(given, admin_key):
        return WrongAdminKey("admin API: wrong admin key")
    return None


def _client(request: Request) -> tuple[str, int] | None:
    client = request.scope.get("client")
    return None if client is None else (str(client[0]), int(client[1]))


def _is_local(request: Request) -> bool:
    return local_caller(_client(request), request.scope.get("headers", []))


def require_admin(request: Request) -> None:
    """401 without a key, 403 with a wrong one (or when no admin key is configured)."""
    refused = admin_refusal(bearer(request.scope.get("headers", [])), request.app.state.admin_key)
    if refused is not None:
        raise refused


def authenticate(request: Request) -> Principal:
    """The caller of an inference route; 401 when keys exist and none valid was sent."""
    state = request.app.state
    return principal_for(
        bearer(request.scope.get("headers", [])),
        admin_key=state.admin_key,
        registry=state.router.registry,
        open_mode=state.open_mode,
        local=_is_local(request),
    )


def require_metrics(request: Request) -> None:
    """/metrics names private adapters, tenants and their usage: the metrics key or the
    admin key. With neither configured, only the callers open mode serves (local, no
    tenants): they may already use every adapter, so the metrics tell them nothing more."""
    state = request.app.state
    given = bearer(request.scope.get("headers", []))
    metrics_key: str | None = state.metrics_key
    admin_key: str | None = state.admin_key
    if same_key(given, metrics_key) or same_key(given, admin_key):
        return
    if metrics_key is None and admin_key is None:
        registry: Registry = state.router.registry
        mode: OpenMode = state.open_mode
        if not registry.has_tenants() and (
            mode == "any" or (mode == "local" and _is_local(request))
        ):
            return
        raise Forbidden(
            "metrics are disabled for this caller: set LORASWAP_METRICS_KEY and send it as "
            "'Authorization: Bearer <metrics key>'"
        )
    if given is None:
        raise Unauthorized("metrics: send 'Authorization: Bearer <metrics key>'")
    raise InvalidApiKey("metrics: wrong key")
