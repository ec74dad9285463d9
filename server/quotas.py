"""Per-tenant quotas and the global bound on work, decided before a request reaches vLLM.

- Concurrency: at most `max_concurrent` requests of a tenant run at once.
- Tokens: a token bucket of `tokens_per_minute` (prompt + completion). A request reserves
  n * max_tokens when admitted (before any work is done for it), and the prompt's tokens
  once vLLM has tokenized it, before the engine sees it; so a burst can never overshoot
  the budget. It gets back what it did not use when it ends.
- Global: at most `max_in_flight` requests in the server; past that, 503 at once, so a
  flood costs a few microseconds per refused request and no memory.
- Fairness: each admitted request gets an engine priority equal to the number of requests
  its tenant already has running. vLLM's priority scheduler serves lower numbers first,
  so a tenant sending its first request goes ahead of the queue built by a flooding one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from adapters_registry.records import TenantRecord
from server.errors import InvalidRequest, Overloaded, RateLimited


@dataclass
class _Bucket:
    in_flight: int = 0
    tokens: float = 0.0
    updated: float = 0.0


@dataclass
class Ticket:
    """One admitted request. `release` is idempotent: the middleware always calls it."""

    quotas: Quotas
    tenant: str | None
    reserved: int
    priority: int
    used_tokens: int | None = None  # set by serving when known
    _released: bool = field(default=False, repr=False)

    def reserve(self, total: int) -> None:
        """Hold `total` tokens in all (prompt + n * max_tokens, once known): takes what
        admission did not, or raises RateLimited / InvalidRequest, taking nothing."""
        self.quotas._reserve(self, total)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.quotas._release(self)


class Admitted(Protocol):
    """What the Gateway holds for an admitted request (a Ticket, or a shared one)."""

    priority: int
    used_tokens: int | None

    def reserve(self, total: int) -> None: ...

    def release(self) -> None: ...


class Admission(Protocol):
    """Admission as the Gateway, /metrics and /admin use it: these per-process Quotas, or
    the application-wide ones of Ray replicas (server/scaleout/coordinator.py)."""

    @property
    def in_flight(self) -> int: ...

    def tenant_in_flight(self, name: str) -> int: ...

    async def enter(self, tenant: TenantRecord | None, estimate: int) -> Admitted: ...


class Quotas:
    def __init__(self, max_in_flight: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._limits: dict[str, TenantRecord] = {}

    async def enter(self, tenant: TenantRecord | None, estimate: int) -> Ticket:
        """`admit`, as the Admission interface spells it."""
        return self.admit(tenant, estimate)

    def admit(self, tenant: TenantRecord | None, estimate: int) -> Ticket:
        """Admit one request before any work is done for it, reserving `estimate` tokens
        (what is known before tokenizing); `Ticket.reserve` takes the rest once the
        prompt's length is known, still before the engine sees the request."""
        if self.in_flight >= self.max_in_flight:
            raise Overloaded(
                f"the server is at its limit of {self.max_in_flight} requests in flight",
                retry_after=1,
            )
        if tenant is None:
            self.in_flight += 1
            return Ticket(self, None, 0, priority=0)
        bucket = self._bucket(tenant)
        if tenant.max_concurrent is not None and bucket.in_flight >= tenant.max_concurrent:
            raise RateLimited(
                f"tenant {tenant.name!r} already has {bucket.in_flight} requests running, "
                f"its limit",
                retry_after=1,
            )
        self._take(tenant, bucket, estimate)
        priority = bucket.in_flight
        bucket.in_flight += 1
        self.in_flight += 1
        return Ticket(self, tenant.name, estimate, priority=priority)

    def _take(self, tenant: TenantRecord, bucket: _Bucket, tokens: int) -> None:
        """Take `tokens` from the tenant's bucket, or raise without taking any."""
        if tenant.tokens_per_minute is None or tokens <= 0:
            return
        rate = tenant.tokens_per_minute / 60.0
        if tokens > tenant.tokens_per_minute:
            # Can never pass, however long the client waits: a 400, not a 429.
            raise InvalidRequest(
                f"this request may use {tokens} tokens (prompt + n * max_tokens), above "
                f"tenant {tenant.name!r}'s limit of {tenant.tokens_per_minute} per minute; "
                "lower max_tokens",
                param="max_tokens",
            )
        if bucket.tokens < tokens:
            wait = math.ceil((tokens - bucket.tokens) / rate)
            raise RateLimited(
                f"tenant {tenant.name!r} is over its limit of "
                f"{tenant.tokens_per_minute} tokens per minute",
                retry_after=wait,
            )
        bucket.tokens -= tokens

    def _reserve(self, ticket: Ticket, total: int) -> None:
        if ticket.tenant is None or total <= ticket.reserved:
            return
        tenant = self._limits[ticket.tenant]
        if tenant.tokens_per_minute is None:
            return
        self._take(tenant, self._bucket(tenant), total - ticket.reserved)
        ticket.reserved = total

    def _bucket(self, tenant: TenantRecord) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(tenant.name)
        capacity = float(tenant.tokens_per_minute or 0)
        if bucket is None:
            bucket = self._buckets[tenant.name] = _Bucket(tokens=capacity, updated=now)
        elif tenant.tokens_per_minute is not None:
            refill = (now - bucket.updated) * tenant.tokens_per_minute / 60.0
            bucket.tokens = min(capacity, bucket.tokens + refill)
        bucket.updated = now
        self._limits[tenant.name] = tenant
        return bucket

    def _release(self, ticket: Ticket) -> None:
        self.in_flight -= 1
        if ticket.tenant is None:
            return
        bucket = self._buckets[ticket.tenant]
        bucket.in_flight -= 1
        if ticket.reserved and ticket.used_tokens is not None:
            limit = self._limits[ticket.tenant].tokens_per_minute or 0
            refund = max(0, ticket.reserved - ticket.used_tokens)
            bucket.tokens = min(float(limit), bucket.tokens + refund)

    def tenant_in_flight(self, name: str) -> int:
        bucket = self._buckets.get(name)
        return 0 if bucket is None else bucket.in_flight
