"""`loraswap adapters ...` and `loraswap aliases ...`: the admin API from the shell.

Every command talks HTTP through `clients.Client`, like any other user of the server
(`--url` / `LORASWAP_URL`, `--admin-key` / `LORASWAP_ADMIN_KEY`). Mounted by server/cli.py:

    app.add_typer(adapters_app, name="adapters")
    app.add_typer(aliases_app, name="aliases")

`make_adapters_app(connect)` / `make_aliases_app(connect)` build the same commands on
another client factory (tests pass one that talks to the app in-process).

Failures print one line, the server's message and code, and exit with status 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from clients import (
    DEFAULT_URL,
    AdapterInfo,
    AliasInfo,
    Client,
    LoraswapError,
    ProgressCallback,
    VersionInfo,
)

T = TypeVar("T")

ClientFactory = Callable[[str, str | None], Client]
"""(server URL, admin key) -> a client; the CLI closes it after each command."""


def default_client(url: str, admin_key: str | None) -> Client:
    return Client(url, admin_key=admin_key)


Url = Annotated[str, typer.Option("--url", envvar="LORASWAP_URL", help="Server URL.")]
AdminKey = Annotated[
    str | None,
    typer.Option(
        "--admin-key",
        envvar="LORASWAP_ADMIN_KEY",
        help="Admin bearer key.",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the server's JSON.")]
Name = Annotated[str, typer.Argument(help="Adapter name.", show_default=False)]
Version = Annotated[int, typer.Argument(help="Version number.", min=1, show_default=False)]
Sha256 = Annotated[
    str | None, typer.Option(help="Expected sha256 of the weights file.", show_default=False)
]
AliasName = Annotated[str, typer.Argument(help="Alias name.", show_default=False)]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


@contextmanager
def _session(connect: ClientFactory, url: str, admin_key: str | None) -> Iterator[Client]:
    """A client for one command; any failure becomes one line on stderr and exit 1."""
    try:
        with connect(url, admin_key) as client:
            yield client
    # OSError, ValueError: local problems (a file to upload is missing, a name like "..").
    except (LoraswapError, OSError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None


@contextmanager
def _progress(label: str) -> Iterator[ProgressCallback]:
    """A progress bar on stderr for an upload, as a `progress(sent, total)` callback."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(sent: int, total: int) -> None:
            bar.update(task, completed=sent, total=total)

        yield update


def _query(
    connect: ClientFactory,
    url: str,
    admin_key: str | None,
    call: Callable[[Client], T],
    as_json: bool,
) -> T | None:
    """Run a read; with --json print the server's JSON and return None, else the result."""
    with _session(connect, url, admin_key) as client:
        result = call(client)
    if not as_json:
        return result
    typer.echo(json.dumps(result, indent=2))
    return None


def make_adapters_app(connect: ClientFactory = default_client) -> typer.Typer:
    """The `adapters` commands, each opening its client through `connect`."""
    app = typer.Typer(help="Adapters and their versions (admin API).", no_args_is_help=True)

    @app.command("list")
    def list_adapters(
        url: Url = DEFAULT_URL, admin_key: AdminKey = None, as_json: AsJson = False
    ) -> None:
        """Every adapter: current version, versions, pinned, loaded in the engine."""
        adapters = _query(connect, url, admin_key, lambda client: client.list_adapters(), as_json)
        if adapters is not None:
            out.print(_adapters_table(adapters))

    @app.command("show")
    def show(
        name: Name, url: Url = DEFAULT_URL, admin_key: AdminKey = None, as_json: AsJson = False
    ) -> None:
        """One adapter and all its versions."""
        adapter = _query(connect, url, admin_key, lambda client: client.get_adapter(name), as_json)
        if adapter is not None:
            pinned = ", pinned" if adapter["pinned"] else ""
            out.print(f"{adapter['name']}: current version {adapter['current_version']}{pinned}")
            out.print(_versions_table(adapter))

    @app.command("register")
    def register(
        name: Name,
        source: Annotated[
            str,
            typer.Argument(help="Path on the server (inside its allowed roots) or http(s) URL."),
        ],
        sha256: Sha256 = None,
        url: Url = DEFAULT_URL,
        admin_key: AdminKey = None,
    ) -> None:
        """Register an adapter (version 1) from a path the server can read, or a URL."""
        with _session(connect, url, admin_key) as client:
            adapter = client.register_adapter(name, source, sha256=sha256)
        out.print(f"registered {_describe(adapter['versions'][-1])}")

    @app.command("upload")
    def upload(
        name: Name,
        folder: Annotated[
            str,
            typer.Argument(
                help="Local PEFT folder: adapter_config.json + adapter_model.safetensors."
            ),
        ],
        sha256: Sha256 = None,
        url: Url = DEFAULT_URL,
        admin_key: AdminKey = None,
    ) -> None:
        """Register an adapter (version 1) by uploading a local folder."""
        with _session(connect, url, admin_key) as client, _progress(f"uploading {name}") as bar:
            adapter = client.upload_adapter(name, folder, sha256=sha256, progress=bar)
        out.print(f"uploaded {_describe(adapter['versions'][-1])}")

    @app.command("add-version")
    def add_version(
        name: Name,
        source: Annotated[
            str, typer.Argument(help="Path on the server, URL, or (with --upload) a local folder.")
        ],
        sha256: Sha256 = None,
        upload: Annotated[
            bool, typer.Option("--upload", help="Upload SOURCE, a local folder.")
        ] = False,
        stage: Annotated[bool, typer.Option("--stage", help="Do not make it current yet.")] = False,
        url: Url = DEFAULT_URL,
        admin_key: AdminKey = None,
    ) -> None:
        """Add the next version of an adapter; it serves new requests at once unless --stage."""
        with _session(connect, url, admin_key) as client:
            if upload:
                with _progress(f"uploading {name}") as bar:
                    version = client.upload_version(
                        name, source, sha256=sha256, make_current=not stage, progress=bar
                    )
            else:
                version = client.add_version(name, source, sha256=sha256, make_current=not stage)
        out.print(f"added {_describe(version)}" + (" (staged)" if stage else " (current)"))

    def set_current(name: str, version: int, url: str, admin_key: str | None) -> None:
        with _session(connect, url, admin_key) as client:
            adapter = client.set_current(name, version)
        out.print(f"{adapter['name']}: current version is now {adapter['current_version']}")

    @app.command("set-current")
    def set_current_cmd(
        name: Name, version: Version, url: Url = DEFAULT_URL, admin_key: AdminKey = None
    ) -> None:
        """Route new requests to VERSION; running requests finish on theirs."""
        set_current(name, version, url, admin_key)

    @app.command("rollback")
    def rollback(
        name: Name, version: Version, url: Url = DEFAULT_URL, admin_key: AdminKey = None
    ) -> None:
        """Make an earlier VERSION current again (the same as set-current)."""
        set_current(name, version, url, admin_key)

    @app.command("delete")
    def delete(
        name: Name, yes: Yes = False, url: Url = DEFAULT_URL, admin_key: AdminKey = None
    ) -> None:
        """Delete an adapter and all its versions (refused while an alias routes to it)."""
        if not yes:
            typer.confirm(f"delete adapter {name} and all its versions?", abort=True)
        with _session(connect, url, admin_key) as client:
            client.delete_adapter(name)
        out.print(f"deleted adapter {name}")

    @app.command("delete-version")
    def delete_version(
        name: Name,
        version: Version,
        yes: Yes = False,
        url: Url = DEFAULT_URL,
        admin_key: AdminKey = None,
    ) -> None:
        """Delete one version (refused while it is current or an alias pins it)."""
        if not yes:
            typer.confirm(f"delete {name} version {version}?", abort=True)
        with _session(connect, url, admin_key) as client:
            deleted = client.delete_version(name, version)
        out.print(f"deleted {deleted['adapter']} v{deleted['version']}")

    def pin(name: str, pinned: bool, url: str, admin_key: str | None) -> None:
        with _session(connect, url, admin_key) as client:
            adapter = client.pin(name, pinned)
        out.print(f"{'pinned' if adapter['pinned'] else 'unpinned'} {adapter['name']}")

    @app.command("pin")
    def pin_cmd(name: Name, url: Url = DEFAULT_URL, admin_key: AdminKey = None) -> None:
        """Keep an adapter loaded in the engine, also across restarts."""
        pin(name, True, url, admin_key)

    @app.command("unpin")
    def unpin_cmd(name: Name, url: Url = DEFAULT_URL, admin_key: AdminKey = None) -> None:
        """Let a pinned adapter leave the engine when idle."""
        pin(name, False, url, admin_key)

    @app.command("warm")
    def warm(name: Name, url: Url = DEFAULT_URL, admin_key: AdminKey = None) -> None:
        """Load the current version into the engine now, before its first request."""
        with _session(connect, url, admin_key) as client:
            warmed = client.warm(name)
        out.print(f"warmed {warmed['name']} ({warmed['loaded']} loaded)")

    return app


def make_aliases_app(connect: ClientFactory = default_client) -> typer.Typer:
    """The `aliases` commands, each opening its client through `connect`."""
    app = typer.Typer(
        help="A/B aliases: one name, weighted variants (admin API).", no_args_is_help=True
    )

    @app.command("list")
    def list_aliases(
        url: Url = DEFAULT_URL, admin_key: AdminKey = None, as_json: AsJson = False
    ) -> None:
        """Every alias with its variants and weights."""
        aliases = _query(connect, url, admin_key, lambda client: client.list_aliases(), as_json)
        if aliases is not None:
            out.print(_aliases_table(aliases))

    @app.command("show")
    def show(
        name: AliasName, url: Url = DEFAULT_URL, admin_key: AdminKey = None, as_json: AsJson = False
    ) -> None:
        """One alias."""
        alias = _query(connect, url, admin_key, lambda client: client.get_alias(name), as_json)
        if alias is not None:
            out.print(f"{alias['name']}: {_variants(alias)}")

    @app.command("set")
    def set_alias(
        name: AliasName,
        variants: Annotated[
            list[str],
            typer.Argument(
                help="VARIANT=WEIGHT ...: `pirate@3=90 formal=10` (`name` follows the current "
                "version, `name@N` pins version N).",
                show_default=False,
            ),
        ],
        url: Url = DEFAULT_URL,
        admin_key: AdminKey = None,
    ) -> None:
        """Create or replace an alias; the weights take effect at once."""
        weights = parse_variants(variants)
        with _session(connect, url, admin_key) as client:
            alias = client.set_alias(name, weights)
        out.print(f"{alias['name']}: {_variants(alias)}")

    @app.command("delete")
    def delete(
        name: AliasName, yes: Yes = False, url: Url = DEFAULT_URL, admin_key: AdminKey = None
    ) -> None:
        """Delete an alias."""
        if not yes:
            typer.confirm(f"delete alias {name}?", abort=True)
        with _session(connect, url, admin_key) as client:
            client.delete_alias(name)
        out.print(f"deleted alias {name}")

    return app


def parse_variants(items: Sequence[str]) -> dict[str, int]:
    """`["pirate@3=90", "formal=10"]` -> `{"pirate@3": 90, "formal": 10}`."""
    weights: dict[str, int] = {}
    for item in items:
        key, sep, weight = item.rpartition("=")
        if not sep or not key or not weight.strip().isdigit():
            raise typer.BadParameter(f"{item!r}: expected VARIANT=WEIGHT, e.g. pirate@3=90")
        if key in weights:
            raise typer.BadParameter(f"{key!r} given twice")
        weights[key] = int(weight)
    return weights


# -- rendering -------------------------------------------------------------------------


def _describe(v: VersionInfo) -> str:
    size, sha = _size(v["size_bytes"]), v["sha256"][:12]
    return f"{v['adapter']} v{v['version']} (rank {v['rank']}, {size}, sha256 {sha})"


def _adapters_table(adapters: Sequence[AdapterInfo]) -> Table:
    table = Table("adapter", "current", "versions", "pinned", "loaded", "created")
    for a in adapters:
        loaded = [
            f"v{v['version']}" + (f" ({v['running']} running)" if v["running"] else "")
            for v in a["versions"]
            if v["loaded"]
        ]
        table.add_row(
            a["name"],
            str(a["current_version"] or "-"),
            str(len(a["versions"])),
            "yes" if a["pinned"] else "",
            ", ".join(loaded),
            _time(a["created_at"]),
        )
    return table


def _versions_table(adapter: AdapterInfo) -> Table:
    table = Table(
        "version", "sha256", "size", "rank", "alpha", "targets", "loaded", "source", "created"
    )
    for v in adapter["versions"]:
        current = v["version"] == adapter["current_version"]
        table.add_row(
            f"{v['version']}{' *' if current else ''}",
            v["sha256"][:12],
            _size(v["size_bytes"]),
            str(v["rank"]),
            f"{v['alpha']:g}",
            ",".join(v["target_modules"]),
            (f"yes ({v['running']} running)" if v["running"] else "yes") if v["loaded"] else "",
            v["source"],
            _time(v["created_at"]),
        )
    return table


def _aliases_table(aliases: Sequence[AliasInfo]) -> Table:
    table = Table("alias", "variants", "updated")
    for a in aliases:
        table.add_row(a["name"], _variants(a), _time(a["updated_at"]))
    return table


def _variants(alias: AliasInfo) -> str:
    total = sum(alias["variants"].values()) or 1
    return ", ".join(
        f"{key}={weight} ({100 * weight / total:.0f}%)" for key, weight in alias["variants"].items()
    )


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    exponent = min(3, (n.bit_length() - 1) // 10)  # 1 KiB, 2 MiB, 3 GiB
    return f"{n / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M")


adapters_app = make_adapters_app()
aliases_app = make_aliases_app()
