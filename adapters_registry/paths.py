"""Confine user-influenced paths to configured roots."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from adapters_registry.errors import InvalidSource, PathOutsideRoots


def confine(path: Path, roots: Iterable[Path]) -> Path:
    """Resolve `path` (following every symlink) and return it if it lies inside a root.

    Resolving first is what defeats both `..` segments and symlinks that point out of
    the root: the check is made on the real location, not on the spelling.
    """
    try:
        real = path.resolve(strict=False)
    except (ValueError, OSError) as exc:  # NUL bytes, symlink loops, names too long
        raise InvalidSource(f"invalid path {str(path)!r}: {exc}") from exc
    for root in roots:
        if real.is_relative_to(root.resolve(strict=False)):
            return real
    raise PathOutsideRoots(f"path {str(path)!r} is outside the allowed adapter roots")
