"""OpenAI compatibility, side by side: one probe set (loadtests/compat_probes.py) against
plain `vllm serve --enable-lora` and against loraswap, same model, adapters and options.

    python -m loadtests compat --out build/compat

Columns: plain vLLM with its LoRA module name (`pirate`) and its base name; ours with
`base:adapter`, with the bare adapter name, and with the base. Both servers get the same
tool and structured-output options (`vllm serve` flags; ours reads the same names):
pythonic tool parser with auto tool choice, xgrammar with compact JSON. They run one
after the other, never at once. Writes `results.json` and `results.md` to `--out`.
This is a benchmark of behaviour, not a test: nothing here gates CI.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import openai

from loadtests import servers
from loadtests.bench import demo_adapter
from loadtests.cli import Scenario, delegate
from loadtests.compat_probes import PROBES, run_probe
from loadtests.record import BenchRecord

ADAPTER = "pirate"
BASE = "smollm2"
# `vllm serve` flags, and the same options for ours (server/settings.py OpenAISettings).
VLLM_FLAGS = [
    "--tool-call-parser", "pythonic",
    "--enable-auto-tool-choice",
    "--structured-outputs-config.backend", "xgrammar",
    "--structured-outputs-config.disable_any_whitespace", "true",
]  # fmt: skip
OURS_ENV = {
    "LORASWAP_OPENAI__TOOL_CALL_PARSER": "pythonic",
    "LORASWAP_OPENAI__ENABLE_AUTO_TOOL_CHOICE": "true",
    "LORASWAP_OPENAI__STRUCTURED_OUTPUTS_BACKEND": "xgrammar",
    "LORASWAP_OPENAI__STRUCTURED_OUTPUTS_DISABLE_ANY_WHITESPACE": "true",
}


def _probe_all(url: str, models: Sequence[str]) -> dict[str, dict[str, tuple[bool, str]]]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    return {m: {p: run_probe(client, m, p) for p in PROBES} for m in models}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Only the shared flags."""


def run(args: argparse.Namespace, command: str) -> None:
    from server.demo import demo_assets

    assets = demo_assets(args.home)
    adapter = demo_adapter(args.home, ADAPTER)
    knobs = servers.EngineKnobs()
    args.out.mkdir(parents=True, exist_ok=True)
    result = BenchRecord.start("compat", command, args)
    results: dict[str, dict[str, dict[str, tuple[bool, str]]]] = {}

    port = servers.free_port()
    vllm = servers.vllm(assets.base_dir, {ADAPTER: adapter}, port, knobs, lora_fix=True)
    vllm.cmd += VLLM_FLAGS
    with servers.running(vllm, port, args.out / "logs" / "vllm.log") as running:
        results["vllm serve"] = _probe_all(running.url, [ADAPTER, BASE])

    port = servers.free_port()
    with tempfile.TemporaryDirectory() as home:
        ours = servers.ours(
            assets.base_dir, assets.adapters_dir, port, knobs, Path(home), "compat-admin"
        )
        ours.env.update(OURS_ENV)
        with servers.running(ours, port, args.out / "logs" / "ours.log") as running:
            results["loraswap"] = _probe_all(running.url, [f"{BASE}:{ADAPTER}", ADAPTER, BASE])

    columns = [
        ("vllm serve", ADAPTER, f"vllm serve `{ADAPTER}`"),
        ("vllm serve", BASE, f"vllm serve `{BASE}`"),
        ("loraswap", f"{BASE}:{ADAPTER}", f"ours `{BASE}:{ADAPTER}`"),
        ("loraswap", ADAPTER, f"ours `{ADAPTER}`"),
        ("loraswap", BASE, f"ours `{BASE}`"),
    ]
    lines = [
        "| probe | " + " | ".join(c[2] for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for probe in PROBES:
        cells = ["pass" if results[s][m][probe][0] else "**FAIL**" for s, m, _ in columns]
        lines.append(f"| {probe} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    regressions = [
        f"{probe} ({m})"
        for probe in PROBES
        for vm, m in ((ADAPTER, f"{BASE}:{ADAPTER}"), (ADAPTER, ADAPTER), (BASE, BASE))
        if results["vllm serve"][vm][probe][0] and not results["loraswap"][m][probe][0]
    ]
    result.body["results"] = results
    result.body["regressions"] = regressions
    (args.out / "results.json").write_text(json.dumps(result.to_dict(), indent=2))
    (args.out / "results.md").write_text(f"{table}\n")
    print(table)
    print("\nnotes (first failure or result per cell):")
    for system, by_model in results.items():
        for model, by_probe in by_model.items():
            for probe, (ok, note) in by_probe.items():
                if not ok:
                    print(f"  {system} {model} {probe}: {note}")
    print(f"\npassing on vllm serve but failing on ours: {regressions or 'none'}")


SCENARIO = Scenario(
    name="compat",
    help="OpenAI compatibility: plain vllm serve vs loraswap.",
    doc=__doc__,
    add_arguments=add_arguments,
    run=run,
    out=Path("build/compat"),
)


if __name__ == "__main__":  # the older form: python -m loadtests.compat
    delegate(SCENARIO.name)
