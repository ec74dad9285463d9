"""Adapters discovered from a directory of PEFT `save_pretrained` folders.

Each sub-folder whose name is a valid adapter name is an adapter. Folders are only
listed at discovery; each is validated on first use and the result cached until the
folder's weights or config change on disk (size or mtime), so a bad adapter is refused with its
exact problem while every other adapter keeps working.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from adapters_registry.base_model import BaseModelShapes
from adapters_registry.errors import AdapterError, AdapterNotFound, InvalidAdapterName
from adapters_registry.names import check_name
from adapters_registry.paths import confine
from adapters_registry.spec import AdapterSpec
from adapters_registry.validate import CONFIG_FILE, WEIGHTS_FILE, Limits, inspect_adapter


@dataclass(frozen=True)
class _Stamp:
    size: int
    mtime_ns: int


class DirectoryCatalog:
    def __init__(self, root: Path, base: BaseModelShapes, limits: Limits) -> None:
        self._root = root.resolve()
        self._base = base
        self._limits = limits
        self._lock = threading.Lock()
        self._cache: dict[
            str, tuple[tuple[_Stamp | None, _Stamp | None], AdapterSpec | AdapterError]
        ] = {}

    @property
    def root(self) -> Path:
        return self._root

    def names(self) -> list[str]:
        """Every folder under the root that is named like an adapter, sorted."""
        if not self._root.is_dir():
            return []
        found = []
        for child in self._root.iterdir():
            try:
                check_name(child.name)
            except InvalidAdapterName:
                continue
            if child.is_dir():
                found.append(child.name)
        return sorted(found)

    def get(self, name: str) -> AdapterSpec:
        """The validated spec of adapter `name`; raises an AdapterError naming the problem."""
        check_name(name)
        path = confine(self._root / name, [self._root])
        if not path.is_dir():
            raise AdapterNotFound(f"adapter {name!r} not found", adapter=name)
        # Both files: a config edited in place (another lora_alpha) is other content.
        stamp = (_stamp(path / WEIGHTS_FILE), _stamp(path / CONFIG_FILE))
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and cached[0] == stamp:
            result = cached[1]
        else:
            try:
                result = inspect_adapter(path, name=name, base=self._base, limits=self._limits)
            except AdapterError as exc:
                result = exc
            with self._lock:
                self._cache[name] = (stamp, result)
        if isinstance(result, AdapterError):
            # A fresh instance each time: re-raising one cached object would keep
            # growing its traceback.
            raise type(result)(result.message, adapter=result.adapter)
        return result


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return _Stamp(size=st.st_size, mtime_ns=st.st_mtime_ns)
