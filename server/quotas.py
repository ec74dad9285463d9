"""Per-tenant quotas and the global bound on work, decided before a request reaches vLLM.

- Concurrency: at most `max_concurrent` requests of a tenant run at once.
- Tokens: a token bucket of `tokens_per_minute` (prompt + completion). A request reserves
  prompt + n * max_tokens up front, so a burst can never overshoot the budget, and gets
  back what it did not use when it ends.
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

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.quotas._release(self)


class Quotas:
    def __init__(self, max_in_flight: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._limits: dict[str, TenantRecord] = {}

    def admit(self, tenant: TenantRecord | None, estimate: int) -> Ticket:
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
        reserved = 0
        if tenant.tokens_per_minute is not None:
            rate = tenant.tokens_per_minute / 60.0
            if estimate > tenant.tokens_per_minute:
                # Can never pass, however long the client waits: a 400, not a 429.
                raise InvalidRequest(
                    f"this request may use {estimate} tokens (prompt + n * max_tokens), above "
                    f"tenant {tenant.name!r}'s limit of {tenant.tokens_per_minute} per minute; "
                    "lower max_tokens",
                    param="max_tokens",
                )
            if bucket.tokens < estimate:
                wait = math.ceil((estimate - bucket.tokens) / rate)
                raise RateLimited(
                    f"tenant {tenant.name!r} is over its limit of "
                    f"{tenant.tokens_per_minute} tokens per minute",
                    retry_after=wait,
                )
            bucket.tokens -= estimate
            reserved = estimate
        priority = bucket.in_flight
        bucket.in_flight += 1
        self.in_flight += 1
        return Ticket(self, tenant.name, reserved, priority=priority)

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
