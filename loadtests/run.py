"""One load run against a running OpenAI-compatible server (ours or any other).

    python -m loadtests run --url http://127.0.0.1:8000 --duration 60 --concurrency 16 \\
        --adapters-active 8 --popularity zipf --zipf-alpha 1.0 --out build/loadtest

    # open loop, 3 req/s, with a hot swap 20 s in and a rollback at 40 s (ours, admin key)
    LORASWAP_ADMIN_KEY=... python -m loadtests run --mode open --rate 3 \\
        --swap 20:pirate=/srv/adapters/pirate-v2 --swap 40:pirate@1

Adapters: `--adapters a,b,c` (most popular first), or else the server's `/v1/models`
(every model but the base, sorted); the first `--adapters-active` of them are used.
Writes `results.json`, `results.md` and the PNG plots to `--out`; progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import replace
from pathlib import Path

import httpx

from loadtests.cli import Scenario, delegate
from loadtests.options import add_swap_args, add_workload_args, workload
from loadtests.record import RecordHead, RunRecord, SystemRecord, summarize
from loadtests.report import write_report
from loadtests.runner import Target, print_progress, run_phase, warm_up


def discover_adapters(url: str, base_model: str, api_key: str | None) -> list[str]:
    """Adapter names from `/v1/models`: every id but the base, `base:` prefix removed."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    names = []
    for model in response.json()["data"]:
        ident = str(model["id"])
        if ident == base_model or model.get("kind") == "alias":
            continue
        names.append(ident.removeprefix(f"{base_model}:"))
    return sorted(names)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server root")
    parser.add_argument("--label", default="server", help="name in tables and plots")
    parser.add_argument("--base-model", default="smollm2", help="the base model's name")
    parser.add_argument(
        "--model-format",
        default="{adapter}",
        help="how adapter requests name the model: {adapter} or {base}:{adapter}",
    )
    parser.add_argument("--adapters", default=None, help="comma list, most popular first")
    parser.add_argument(
        "--adapters-registered", type=int, default=None, help="for the record [all known]"
    )
    parser.add_argument(
        "--api-key", default=os.environ.get("LORASWAP_API_KEY"), help="[env LORASWAP_API_KEY]"
    )
    parser.add_argument(
        "--admin-key",
        default=os.environ.get("LORASWAP_ADMIN_KEY"),
        help="for --swap [env LORASWAP_ADMIN_KEY]",
    )
    add_workload_args(parser)
    add_swap_args(parser)


def run(args: argparse.Namespace, command: str) -> None:

    if args.adapters is not None:
        known = [a for a in args.adapters.split(",") if a]
    elif args.adapters_active > 0:
        known = discover_adapters(args.url, args.base_model, args.api_key)
    else:
        known = []
    active = known[: args.adapters_active]
    if args.adapters_active and len(active) < args.adapters_active:
        print_progress(f"only {len(active)} adapters known: using those")
    registered = args.adapters_registered if args.adapters_registered is not None else len(known)
    target = Target(
        url=args.url,
        base_model=args.base_model,
        api_key=args.api_key,
        admin_key=args.admin_key,
        model_format=args.model_format,
        label=args.label,
    )
    main_load = workload(args, active, registered, args.swap)
    record = RunRecord(**RecordHead.fields_now(command, args))
    system = SystemRecord(name="server", label=args.label, url=args.url)
    record.systems.append(system)

    async def measure() -> None:
        await warm_up(target, main_load, args.warmup)
        system.phases.append(await run_phase(target, main_load, "main"))
        for point in args.sweep:
            if point.count > len(active):
                print_progress(f"sweep: skipping {point.count} active, only {len(active)} known")
                continue
            phase_load = replace(point.of(main_load), duration_s=args.sweep_duration)
            await warm_up(target, phase_load, args.sweep_warmup)
            system.phases.append(await run_phase(target, phase_load, point.label))

    try:
        asyncio.run(measure())
    except KeyboardInterrupt:
        system.error = "interrupted"
    finally:
        out = Path(args.out)
        record.write(out / "results.json")
        report = write_report(record, out)
        for phase in system.phases:
            s = summarize(phase)
            print_progress(
                f"{phase.name}: {s.ok} ok, {s.errors} errors, {s.output_tok_per_s:.1f} tok/s, "
                f"{s.req_per_s:.2f} req/s"
            )
        print_progress(f"wrote {out / 'results.json'} and {report}")


SCENARIO = Scenario(
    name="run",
    help="Load-test one OpenAI-compatible server.",
    doc=__doc__,
    add_arguments=add_arguments,
    run=run,
    out=Path("build/loadtest"),
    nice=10,
    home=False,
)


if __name__ == "__main__":  # the older form: python -m loadtests.run
    delegate(SCENARIO.name)
