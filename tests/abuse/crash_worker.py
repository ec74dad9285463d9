"""A process that registers adapters until it is killed: the other half of test_crash.py.

Usage: python -m tests.abuse.crash_worker <spec.json>. For each i from `start`: register
adapter `a<i>` (an upload or a local path, alternately), print `ACK a<i> <version>
<content digest>`; every third one is deleted again and `DEL a<i>` printed, and half of
those registered again under the same name. Each call is announced by `TRY a<i>`, and
its ACK or DEL printed only once it returned: what that names was acknowledged.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from adapters_registry import BaseModelShapes, Limits
from adapters_registry.registry import Registry, RegistryConfig


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    base = BaseModelShapes.from_dir(Path(spec["base"]), "tiny")
    config = RegistryConfig(
        database=spec["database"] if "://" in spec["database"] else Path(spec["database"]),
        storage_dir=Path(spec["storage"]),
        allowed_roots=(Path(spec["allowed"]),),
        cache_max_bytes=10**8,
        limits=Limits(max_rank=16, max_bytes=10**7),
    )
    registry = Registry(config, base)
    folders = sorted(Path(spec["allowed"]).iterdir())
    for i in range(spec["start"], spec["start"] + 1000):
        folder = folders[i % len(folders)]
        name = f"a{i}"
        print(f"TRY {name}", flush=True)
        if i % 2:
            files = {
                n: io.BytesIO((folder / n).read_bytes())
                for n in ("adapter_config.json", "adapter_model.safetensors")
            }
            v = registry.register_upload(name, files)  # type: ignore[arg-type]
        else:
            v = registry.register(name, str(folder))
        print(f"ACK {name} {v.version} {v.content_digest}", flush=True)
        if i % 3 == 0:
            print(f"TRY {name}", flush=True)
            registry.delete_adapter(name)
            print(f"DEL {name}", flush=True)
            if i % 2 == 0:  # the same name again, other weights: a new number
                print(f"TRY {name}", flush=True)
                v = registry.register(name, str(folders[(i + 1) % len(folders)]))
                print(f"ACK {name} {v.version} {v.content_digest}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
