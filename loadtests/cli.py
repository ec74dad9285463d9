"""The one command of the load tests: `python -m loadtests <scenario> [flags]`.

Each scenario module declares a `Scenario` (its flags, its defaults for the shared flags,
what it runs); this module builds one argparse parser from them, adds the shared flags
(`--out`, `--nice`, `--home`) from one definition each, renices, and runs the scenario.
`python -m loadtests.<scenario>` still works: each module delegates here.

argparse rather than typer (the server CLI's): the workload options are argparse types
and groups shared by `run` and `compare` (loadtests/options.py), tests call the scenarios'
`parse_args`, and the micro-benchmarks keep their own parsers (they are moved, not
rewritten, while their engine code is being restructured elsewhere).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROG = "python -m loadtests"

# The load tests and benchmarks, in the order `--help` lists them: loadtests/<name>.py,
# each with a module-level SCENARIO.
SCENARIOS = (
    "run",
    "compare",
    "profile",
    "coldload",
    "scale",
    "memory",
    "compat",
    "overhead",
    "exposures",
)
# The engine micro-benchmarks: loadtests/micro/<module>.py, each with its own parser
# (`main(argv)`), reached as `python -m loadtests micro <name> [flags]`.
MICRO = {"engine": "bench_engine", "lora-ops": "bench_lora_ops"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout in the epilog and shows every option's
    default, derived from the parser: `[%(default)s]` unless the help already says it
    (a `%(default)s` of its own, or a closing `[...]` that explains a computed one)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "%(default)" in text
            or text.rstrip().endswith("]")
            or not action.option_strings
            or any(action.default is v for v in (None, False, argparse.SUPPRESS))
        ):
            return text
        return f"{text} [%(default)s]".lstrip()


def default_home() -> Path:
    """Where the demo assets are: LORASWAP_HOME, else the server's default."""
    return Path(os.environ.get("LORASWAP_HOME", "~/.cache/loraswap")).expanduser()


@dataclass(frozen=True)
class Scenario:
    """One load test or benchmark as the CLI sees it.

    `add_arguments` adds its own flags; `check` returns what is wrong with a parsed
    combination (or None), and may normalise flags (comma lists into lists); `run` gets
    the parsed flags and the command line to record. `out` and `nice` are its defaults
    for the shared flags (`nice` 0: as started); `home`: whether it takes `--home` (it
    starts servers on the demo assets)."""

    name: str
    help: str
    doc: str | None
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, str], None]
    out: Path | None
    nice: int = 0
    home: bool = True
    check: Callable[[argparse.Namespace], str | None] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)


def add_shared_arguments(parser: argparse.ArgumentParser, scenario: Scenario) -> None:
    """The flags every scenario shares, defined here once; defaults per scenario."""
    g = parser.add_argument_group("shared")
    g.add_argument(
        "--out",
        type=Path,
        default=scenario.out,
        help="output folder" if scenario.out else "output folder [beside the record]",
    )
    g.add_argument(
        "--nice",
        type=int,
        default=scenario.nice,
        help="run at this niceness (never raised; the box is shared)",
    )
    if scenario.home:
        g.add_argument("--home", type=Path, default=default_home(), help="the demo assets")


def renice(target: int) -> None:
    """Lower this process's priority to `target` (children inherit it): the machines
    these run on are shared. Never raises priority, never goes past `target`."""
    current = os.nice(0)
    if current < target:
        os.nice(target - current)


def scenarios() -> dict[str, Scenario]:
    out: dict[str, Scenario] = {}
    for name in SCENARIOS:
        scenario = importlib.import_module(f"loadtests.{name}").SCENARIO
        if not isinstance(scenario, Scenario) or scenario.name != name:
            raise TypeError(f"loadtests.{name}.SCENARIO is not the Scenario {name!r}")
        out[name] = scenario
    from loadtests.report import SCENARIO as report

    out[report.name] = report
    return out


def build_parser(
    known: Mapping[str, Scenario],
) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser, and each scenario's subparser by name."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Load tests and benchmarks of loraswap (and of plain vLLM, for comparison).",
        epilog=f"`{PROG} <scenario> --help` for a scenario's flags; `{PROG} micro "
        f"{{{','.join(MICRO)}}} --help` for the engine micro-benchmarks.",
    )
    subs = parser.add_subparsers(dest="scenario", required=True, metavar="scenario")
    by_name = {}
    for scenario in known.values():
        sub = by_name[scenario.name] = subs.add_parser(
            scenario.name,
            help=scenario.help,
            description=scenario.help,
            epilog=scenario.doc,
            formatter_class=HelpFormatter,
        )
        scenario.add_arguments(sub)
        add_shared_arguments(sub, scenario)
        sub.set_defaults(**scenario.defaults)
    # Listed for --help only: main() hands these to their own parsers before parsing.
    subs.add_parser("micro", help=f"engine micro-benchmarks: micro {{{','.join(MICRO)}}} ...")
    return parser, by_name


def parse_args(argv: Sequence[str]) -> tuple[Scenario, argparse.Namespace]:
    """The scenario named first in `argv`, and its parsed flags (the name not among
    them: they are recorded as the run's config)."""
    known = scenarios()
    parser, subparsers = build_parser(known)
    args = parser.parse_args(list(argv))
    scenario = known[args.__dict__.pop("scenario")]
    if scenario.check is not None and (problem := scenario.check(args)) is not None:
        subparsers[scenario.name].error(problem)
    return scenario, args


def micro(argv: Sequence[str]) -> None:
    if not argv or argv[0] not in MICRO:
        sys.exit(f"usage: {PROG} micro {{{','.join(MICRO)}}} [flags]")
    module = importlib.import_module(f"loadtests.micro.{MICRO[argv[0]]}")
    sys.argv[0] = f"{PROG} micro {argv[0]}"  # their parsers' prog: how they were called
    module.main(list(argv[1:]))


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "micro":
        micro(argv[1:])
        return
    scenario, args = parse_args(argv)
    renice(args.nice)
    scenario.run(args, " ".join([PROG, *argv]))


def delegate(name: str, argv: Sequence[str] | None = None) -> None:
    """`python -m loadtests.<name> [flags]`, the older form, as `python -m loadtests
    <name> [flags]`."""
    main([name, *(sys.argv[1:] if argv is None else argv)])


def scenario_args(name: str, argv: Sequence[str]) -> argparse.Namespace:
    """A scenario's flags parsed as the CLI would (tests, and the older `parse_args`)."""
    scenario, args = parse_args([name, *argv])
    assert scenario.name == name
    return args
