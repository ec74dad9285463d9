"""Old import paths of modules that moved (issue 18's new folders).

A moved module leaves at its old path a shim of two lines whose every name is looked up
in the new module, with a DeprecationWarning naming the new path:

    from server.moved import forward_to

    __getattr__ = forward_to("server.scaleout.placement", __name__)

Lazy (PEP 562: a module's `__getattr__` is asked only for names it lacks), so that the
shim imports nothing until a name is used, and lists no names that could fall behind.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def forward_to(new: str, old: str) -> Callable[[str], Any]:
    """The module `__getattr__` of the shim left at `old` for the module now at `new`."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):  # probes such as __all__ or __path__: not moved names
            raise AttributeError(name)
        warnings.warn(
            f"{old} moved to {new}; import {name} from there",
            DeprecationWarning,
            stacklevel=2,  # the line that used the old path
        )
        return getattr(importlib.import_module(new), name)

    return __getattr__
