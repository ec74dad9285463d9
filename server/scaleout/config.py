"""Settings for Ray's own tooling: `serve run server.scaleout.ray_serve:app_builder k=v ...`, or a
`serve` config file's `args` (what a KubeRay RayService runs).

One Settings object, as everywhere: the environment first (LORASWAP_*, e.g. the
`runtime_env.env_vars` of a config file), then the builder's args on top. An arg names a
field by its path, dotted or as in the environment (`engine.kv_cache_gib=1`,
`engine__kv_cache_gib=1`), or as nested mappings (a config file's YAML). A name that is
not a field is refused: a typo in a deployment file must not pass silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.settings import Settings


def settings_from_args(args: Mapping[str, Any]) -> Settings:
    """The Settings of an application built by Ray's tooling from `args`."""
    values = Settings().model_dump()
    _merge(values, args, ())
    return Settings.model_validate(values)


def _merge(values: dict[str, Any], args: Mapping[str, Any], at: tuple[str, ...]) -> None:
    for key, value in args.items():
        path = [*at, *str(key).replace("__", ".").split(".")]
        node = values
        for i, part in enumerate(path):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"unknown setting {'.'.join(path[: i + 1])!r}")
            if i < len(path) - 1:
                node = node[part]
        if isinstance(value, Mapping):
            if not isinstance(node[path[-1]], dict):
                raise ValueError(f"setting {'.'.join(path)!r} takes a value, not a mapping")
            _merge(values, value, tuple(path))
        else:
            node[path[-1]] = value
