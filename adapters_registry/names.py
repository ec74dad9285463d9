"""Adapter names: one pattern, checked before a name touches a path or the engine."""

from __future__ import annotations

import re

from adapters_registry.errors import InvalidAdapterName

# Lower-case letters, digits, '-', '_' and '.', starting with a letter or digit: safe as
# a directory name and inside `<base>:<adapter>`, and never '.', '..' or a path.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def check_name(name: str) -> str:
    """Return `name` if it is a valid adapter name, else raise InvalidAdapterName."""
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: use 1-64 of a-z 0-9 . _ -, "
            "starting with a letter or digit",
            adapter=name,
        )
    return name
