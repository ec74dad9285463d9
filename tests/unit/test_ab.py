"""Alias assignment: proportional, sticky, and minimal movement when weights change."""

from __future__ import annotations

import random
from collections import Counter

from adapters_registry.ab import choose
from adapters_registry.records import Variant

USERS = [f"user-{i}" for i in range(2000)]


def arms(a: int, b: int) -> tuple[Variant, ...]:
    return (Variant("pirate", 3, a), Variant("formal", 1, b))


def assign(weights: tuple[Variant, ...]) -> dict[str, str]:
    return {u: choose("support-bot", weights, u).key for u in USERS}


def test_split_within_three_points_of_weights() -> None:
    for a, b in [(90, 10), (50, 50), (70, 30)]:
        counts = Counter(assign(arms(a, b)).values())
        share = 100 * counts["pirate@3"] / len(USERS)
        assert abs(share - a) <= 3, (a, share)


def test_sticky_while_weights_stay() -> None:
    assert assign(arms(90, 10)) == assign(arms(90, 10))


def test_moving_weights_moves_only_users_into_the_grown_arm() -> None:
    before, after = assign(arms(90, 10)), assign(arms(50, 50))
    moved = {u for u in USERS if before[u] != after[u]}
    assert all(before[u] == "pirate@3" and after[u] == "formal@1" for u in moved)
    # About 40% must move (90 -> 50); fewer cannot reach the new split.
    assert abs(100 * len(moved) / len(USERS) - 40) <= 3


def test_alias_name_salts_the_assignment() -> None:
    a = {u: choose("alias-a", arms(50, 50), u).key for u in USERS}
    b = {u: choose("alias-b", arms(50, 50), u).key for u in USERS}
    assert a != b


def test_without_user_random_by_weight() -> None:
    rng = random.Random(1)
    counts = Counter(choose("x", arms(80, 20), None, rng).key for _ in range(5000))
    assert abs(counts["pirate@3"] / 5000 - 0.8) < 0.03


def test_zero_weight_arm_is_never_chosen() -> None:
    assert set(assign(arms(100, 0)).values()) == {"pirate@3"}
