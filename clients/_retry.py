"""When a failed attempt is tried again, and after how long. No I/O here: the sync and
async clients run the same decisions and differ only in how they sleep and send.

What is safe to try again depends on whether the first attempt may have done its work:

- **Replayable** calls (reads, PUTs that set a state, warm, and inference, which changes
  nothing on the server) are retried on any transient failure: connection errors,
  timeouts, and the statuses 429, 502, 503 and 504. Running one twice gives the same
  state as running it once.
- **Once-only** calls (POSTs that create an adapter or a version, DELETEs) are retried
  only when the server surely did not act: the connection was never made, or it answered
  429. Not on 503: the server commits an admin change and only then talks to the engine,
  so an engine error (500 today, 503 once dead engines are reported as such, or a
  gateway's 503) can follow a committed change; a second add-version would then create a
  second version, and a second delete answer 404 for a delete that worked.

`Retry-After` (seconds or an HTTP date) is honoured when the server sends it; otherwise
the wait grows exponentially, with jitter so that many clients do not retry in step.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timezone
from email.utils import parsedate_to_datetime

import httpx

REPLAYABLE_STATUSES = frozenset({429, 502, 503, 504})
ONCE_ONLY_STATUSES = frozenset({429})

# The request never reached the server: safe to send again whatever it was.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# May have reached it; safe only for replayable calls.
_TRANSIENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


@dataclass(frozen=True)
class RetryPolicy:
    """How many times and how long to wait. `max_retries=0` turns retrying off."""

    max_retries: int = 2
    initial_delay: float = 0.5  # seconds before the first retry (before jitter)
    max_delay: float = 8.0  # cap of the exponential wait
    max_retry_after: float = 60.0  # a longer Retry-After is not waited for: the error is raised
    rand: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be 0 or more")

    def delay(
        self, retries_done: int, outcome: httpx.Response | Exception, *, replayable: bool
    ) -> float | None:
        """Seconds to wait before trying again, or None to stop with this outcome."""
        if retries_done >= self.max_retries or not _retryable(outcome, replayable):
            return None
        if isinstance(outcome, httpx.Response):
            after = parse_retry_after(outcome.headers.get("retry-after"))
            if after is not None:
                return after if after <= self.max_retry_after else None
        backoff = min(self.max_delay, self.initial_delay * 2.0**retries_done)
        # Jitter keeps half of the wait: never much sooner than asked, never in lockstep.
        return backoff * (0.5 + 0.5 * self.rand())


def _retryable(outcome: httpx.Response | Exception, replayable: bool) -> bool:
    if isinstance(outcome, httpx.Response):
        return outcome.status_code in (REPLAYABLE_STATUSES if replayable else ONCE_ONLY_STATUSES)
    return isinstance(outcome, _TRANSIENT if replayable else _NOT_SENT)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` in seconds from now: a number of seconds or an HTTP date (RFC 9110).

    None when absent or unreadable; a date in the past (or a negative number) is 0.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" gives a naive datetime; RFC 9110 dates are GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
