"""Choosing an alias variant: sticky per user, proportional to weights, minimal movement.

Weighted rendezvous hashing: every (user, variant) pair gets a uniform hash u in (0, 1);
the user goes to the variant with the smallest -ln(u) / weight. Each variant then wins a
share of users equal to its share of the weights, a user's choice depends only on their
own hashes (sticky while weights stay), and when one variant's weight grows the only
users who move are those moving *into* it (90/10 -> 50/50 moves 40% of users, all of
them into the grown arm): the least movement any assignment can achieve.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

from adapters_registry.records import Variant

_TWO_64 = float(1 << 64)


def _uniform(alias: str, variant: str, user: str) -> float:
    digest = hashlib.blake2b(f"{alias}\0{variant}\0{user}".encode(), digest_size=8).digest()
    # +0.5 keeps u strictly inside (0, 1), so ln(u) is finite.
    return (int.from_bytes(digest, "big") + 0.5) / _TWO_64


def choose(
    alias: str, variants: Sequence[Variant], user: str | None, rng: random.Random | None = None
) -> Variant:
    """The variant of `alias` that serves `user`; random by weight when there is no user."""
    live = [v for v in variants if v.weight > 0]
    if not live:
        raise ValueError(f"alias {alias!r} has no variant with a positive weight")
    if user is None:
        return (rng or random).choices(live, weights=[v.weight for v in live])[0]
    return min(live, key=lambda v: -math.log(_uniform(alias, v.key, user)) / v.weight)
