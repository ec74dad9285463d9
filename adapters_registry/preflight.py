"""The server's checks of an adapter, run where it was trained, before uploading it.

`loraswap adapters push` runs this on a PEFT `save_pretrained` output (e.g. a Trainer's
`checkpoint-500` folder): the same `inspect_adapter` the server runs, on the two files
the push uploads (the optimizer state and other pickles beside them are not uploaded,
so they are not held against it). Without the base model at hand, the base is taken to
be whatever the adapter's own tensors describe: every check runs but "fits the base",
which the server makes on arrival.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from adapters_registry.base_model import BaseModelShapes
from adapters_registry.errors import MalformedAdapter
from adapters_registry.safetensors_header import read_header
from adapters_registry.spec import AdapterSpec
from adapters_registry.validate import CONFIG_FILE, WEIGHTS_FILE, Limits, inspect_adapter

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# vLLM's largest LoRA rank; the server's own maximum may be lower (it says so).
MAX_RANK = 512


def preflight(
    folder: Path,
    *,
    name: str,
    base: BaseModelShapes | None = None,
    max_rank: int = MAX_RANK,
    max_bytes: int = 1 << 40,
) -> AdapterSpec:
    """Validate `folder`'s adapter_config.json + adapter_model.safetensors; their spec
    (sha256 included). Raises the same errors as a registration would."""
    with tempfile.TemporaryDirectory(prefix="loraswap-push-") as tmp:
        view = Path(tmp)
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / file).is_file():
                raise MalformedAdapter(
                    f"{folder} has no {file}: is it a PEFT save_pretrained folder?"
                )
            (view / file).symlink_to((folder / file).resolve())
        shapes = base or _own_shapes(view / WEIGHTS_FILE)
        spec = inspect_adapter(
            view, name=name, base=shapes, limits=Limits(max_rank=max_rank, max_bytes=max_bytes)
        )
    return spec


def _own_shapes(weights: Path) -> BaseModelShapes:
    """A base model that every module the adapter targets fits: (out, in) from B and A."""
    a: dict[str, int] = {}
    b: dict[str, int] = {}
    for key, info in read_header(weights).items():
        match = _LORA_KEY.match(key)
        if match is None or len(info.shape) != 2:
            continue  # the server's checks name what is wrong with it
        if match["ab"] == "A":
            a[match["module"]] = info.shape[1]
        else:
            b[match["module"]] = info.shape[0]
    linear = {m: (b[m], a[m]) for m in a.keys() & b.keys()}
    return BaseModelShapes(name="(any base)", linear=linear)
