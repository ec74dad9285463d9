"""Quotas and `max_in_flight` for the whole application, not per replica.

One `Coordinator` per application (server/scaleout/ray_serve.py runs it as a small named Ray
actor) holds the one `Quotas` state: a tenant with `max_concurrent=4` gets 4 across all
replicas, and `max_in_flight` bounds the application. `Quotas` stays the one
implementation of the rules; the coordinator only gives its tickets ids and owners.
Each replica's Gateway reaches it through `SharedQuotas`, the same `Admission` interface
as the in-process `Quotas`.

Why an actor and not the registry database: admission is on every request's path, an
actor call is a sub-millisecond message to memory, and concurrency counts are state
that must vanish with the replica holding them (a database row would outlive a killed
replica and need the same expiry anyway). What is lost when the actor restarts is the
running counts and the token buckets' levels (they start full, as at server start).

- **Owners and expiry.** Every ticket belongs to the replica that took it. Replicas
  `beat` every `beat_interval_s` (renewing their tickets, publishing their metrics); a
  replica silent for `replica_ttl_s` is gone: its tickets are freed (a killed replica's
  running requests no longer count against its tenants) and its metrics dropped.
- **Unreachable coordinator: fail closed.** Admission that cannot reach it answers 503
  `quotas_unavailable` (QuotasUnavailable); a quota nobody can check is not granted. A
  lost release is recovered by the owner's expiry.
- **Token reservations** of the prompt (`Ticket.reserve`, called synchronously by the
  engine seam once vLLM has tokenized the prompt) cross to the coordinator only for a
  tenant with a token budget: one blocking round trip for those requests, none for the
  others.
- **Metrics**: the latest exposition each live replica published, for the one
  application-wide `/metrics` (server/scaleout/metrics_merge.py).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

from adapters_registry.records import TenantRecord
from server.errors import InvalidRequest, Overloaded, QuotasUnavailable, RateLimited, ServerError
from server.quotas import Quotas, Ticket

_REFUSALS: dict[str, type[ServerError]] = {
    cls.__name__: cls for cls in (InvalidRequest, Overloaded, RateLimited)
}


@dataclass(frozen=True)
class Refusal:
    """A quota refusal as it crosses processes (the exception's fields, not the object)."""

    kind: str
    message: str
    param: str | None = None
    retry_after: float | None = None

    @classmethod
    def of(cls, exc: ServerError) -> Refusal:
        return cls(type(exc).__name__, exc.message, exc.param, exc.retry_after)

    def throw(self) -> NoReturn:
        raise _REFUSALS[self.kind](self.message, param=self.param, retry_after=self.retry_after)


@dataclass(frozen=True)
class Grant:
    ticket: int
    priority: int


@dataclass(frozen=True)
class Snapshot:
    in_flight: int
    tenants: dict[str, int]  # requests running per tenant, all replicas
    metrics: dict[str, bytes]  # replica name -> its latest exposition


class Coordinator:
    """The application's one quota state (and metrics board); no I/O, no Ray."""

    def __init__(
        self, max_in_flight: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.quotas = Quotas(max_in_flight, clock)
        self._ttl_s = ttl_s
        self._clock = clock
        self._ids = itertools.count(1)
        self._tickets: dict[int, tuple[str, Ticket]] = {}
        self._seen: dict[str, float] = {}  # owner -> last heard of
        self._metrics: dict[str, tuple[str, bytes]] = {}  # owner -> (replica name, text)

    def configure(self, max_in_flight: int) -> None:
        self.quotas.max_in_flight = max_in_flight

    def admit(self, owner: str, tenant: TenantRecord | None, estimate: int) -> Grant | Refusal:
        self._heard(owner)
        try:
            ticket = self.quotas.admit(tenant, estimate)
        except (InvalidRequest, Overloaded, RateLimited) as exc:
            return Refusal.of(exc)
        number = next(self._ids)
        self._tickets[number] = (owner, ticket)
        return Grant(number, ticket.priority)

    def reserve(self, number: int, total: int) -> Refusal | None:
        held = self._tickets.get(number)
        if held is None:  # expired with its owner, or before a restart: nothing to hold
            return None
        try:
            held[1].reserve(total)
        except (InvalidRequest, RateLimited) as exc:
            return Refusal.of(exc)
        return None

    def release(self, number: int, used_tokens: int | None) -> None:
        held = self._tickets.pop(number, None)
        if held is not None:
            held[1].used_tokens = used_tokens
            held[1].release()

    def beat(self, owner: str, name: str, metrics: bytes | None) -> None:
        self._heard(owner)
        if metrics is not None:
            self._metrics[owner] = (name, metrics)

    def snapshot(self) -> Snapshot:
        self.expire()
        tenants: dict[str, int] = {}
        for _, ticket in self._tickets.values():
            if ticket.tenant is not None:
                tenants[ticket.tenant] = tenants.get(ticket.tenant, 0) + 1
        metrics = dict(self._metrics.values())
        return Snapshot(self.quotas.in_flight, tenants, metrics)

    def expire(self) -> list[str]:
        """Forget the owners silent for longer than the TTL, freeing their tickets."""
        now = self._clock()
        gone = [o for o, seen in self._seen.items() if now - seen > self._ttl_s]
        for owner in gone:
            del self._seen[owner]
            self._metrics.pop(owner, None)
            for number in [n for n, (o, _) in self._tickets.items() if o == owner]:
                self.release(number, None)
        return gone

    def _heard(self, owner: str) -> None:
        self.expire()
        self._seen[owner] = self._clock()


def unreachable() -> QuotasUnavailable:
    """What a request gets when the coordinator cannot be reached: fail closed."""
    return QuotasUnavailable("the application's quota state is unreachable; retry", retry_after=1)


class CoordinatorCalls(Protocol):
    """How a replica reaches the coordinator. Raises QuotasUnavailable when it cannot."""

    def admit(
        self, owner: str, tenant: TenantRecord | None, estimate: int
    ) -> Awaitable[Grant | Refusal]: ...

    def reserve(self, number: int, total: int) -> Refusal | None:
        """Blocking: called from the engine seam, which is synchronous."""

    def release(self, number: int, used_tokens: int | None) -> None:
        """Fire and forget: a lost release is recovered by the owner's expiry."""

    def snapshot(self) -> Awaitable[Snapshot]: ...


@dataclass
class SharedTicket:
    """A `Ticket` held by the coordinator; the same three uses as the in-process one."""

    owner: SharedQuotas
    number: int
    tenant: TenantRecord | None
    priority: int
    used_tokens: int | None = None
    _released: bool = field(default=False, repr=False)

    def reserve(self, total: int) -> None:
        # Quotas takes nothing from a tenant without a token budget: no round trip.
        if self.tenant is None or self.tenant.tokens_per_minute is None:
            return
        refusal = self.owner.calls.reserve(self.number, total)
        if refusal is not None:
            refusal.throw()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.owner.in_flight -= 1
            self.owner.calls.release(self.number, self.used_tokens)


class SharedQuotas:
    """One replica's view of the application's quotas (server/quotas.py: Admission).

    `in_flight` counts this replica's admitted requests (its metrics gauge; the replicas'
    gauges add up to the application's); `tenant_in_flight` is the application's count
    as of the last `sync` (the replica syncs before answering an admin call)."""

    def __init__(self, calls: CoordinatorCalls, owner: str) -> None:
        self.calls = calls
        self.owner = owner
        self.in_flight = 0
        self._tenants: dict[str, int] = {}

    async def enter(self, tenant: TenantRecord | None, estimate: int) -> SharedTicket:
        result = await self.calls.admit(self.owner, tenant, estimate)
        if isinstance(result, Refusal):
            result.throw()
        self.in_flight += 1
        return SharedTicket(self, result.ticket, tenant, result.priority)

    def tenant_in_flight(self, name: str) -> int:
        return self._tenants.get(name, 0)

    async def sync(self) -> Snapshot:
        snapshot = await self.calls.snapshot()
        self._tenants = snapshot.tenants
        return snapshot
