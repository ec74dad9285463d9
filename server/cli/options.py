"""What every admin command shares: its option types, its client session and its consoles.

Every admin command talks HTTP through `clients.Client`, like any other user of the server
(`--url` / `LORASWAP_URL`, `--admin-key` / `LORASWAP_ADMIN_KEY`), and opens one client per
command with `session`. Failures print one line, the server's message and code, and exit
with status 1.

Clients come from `default_client`; `client_factory(factory)` swaps that for a block (the
tests pass one that talks to the app in-process, and run the real `server.cli.app`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
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

from clients import Client, LoraswapError, ProgressCallback

T = TypeVar("T")

ClientFactory = Callable[[str, str | None], Client]
"""(server URL, admin key) -> a client; the CLI closes it after each command."""


def default_client(url: str, admin_key: str | None) -> Client:
    return Client(url, admin_key=admin_key)


# A context variable, not a module global: swapped for one block, then restored.
_factory: ContextVar[ClientFactory] = ContextVar("loraswap_cli_client", default=default_client)


@contextmanager
def client_factory(factory: ClientFactory) -> Iterator[None]:
    """Commands run inside this block open their clients through `factory`."""
    token = _factory.set(factory)
    try:
        yield
    finally:
        _factory.reset(token)


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
AliasName = Annotated[str, typer.Argument(help="Alias name.", show_default=False)]
Owner = Annotated[
    str | None,
    typer.Option("--owner", help="Owning tenant (default: the operator's).", show_default=False),
]
Shared = Annotated[
    bool, typer.Option("--shared", help="Usable by every tenant (default: by its owner only).")
]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


@contextmanager
def session(url: str, admin_key: str | None) -> Iterator[Client]:
    """A client for one command; any failure becomes one line on stderr and exit 1."""
    try:
        with _factory.get()(url, admin_key) as client:
            yield client
    # OSError, ValueError: local problems (a file to upload is missing, a name like "..").
    except (LoraswapError, OSError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None


def query(url: str, admin_key: str | None, call: Callable[[Client], T], as_json: bool) -> T | None:
    """Run a read; with --json print the server's JSON and return None, else the result."""
    with session(url, admin_key) as client:
        result = call(client)
    if not as_json:
        return result
    print_json(result)
    return None


def print_json(result: object) -> None:
    typer.echo(json.dumps(result, indent=2))


def confirm(question: str, yes: bool) -> None:
    """Ask before a deletion unless --yes; a no aborts (exit 1)."""
    if not yes:
        typer.confirm(question, abort=True)


@contextmanager
def progress(label: str) -> Iterator[ProgressCallback]:
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
