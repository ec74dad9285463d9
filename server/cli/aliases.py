"""`loraswap aliases ...`: A/B aliases (one name, weighted variants), through the admin API."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import typer

from clients import DEFAULT_URL
from server.cli import render
from server.cli.options import (
    AdminKey,
    AliasName,
    AsJson,
    Owner,
    Shared,
    Url,
    Yes,
    confirm,
    out,
    query,
    session,
)

app = typer.Typer(
    help="A/B aliases: one name, weighted variants (admin API).", no_args_is_help=True
)


@app.command("list")
def list_aliases(
    url: Url = DEFAULT_URL, admin_key: AdminKey = None, as_json: AsJson = False
) -> None:
    """Every alias with its variants and weights."""
    aliases = query(url, admin_key, lambda client: client.list_aliases(), as_json)
    if aliases is not None:
        out.print(render.aliases_table(aliases))


@app.command("show")
def show(
    name: AliasName, url: Url = DEFAULT_URL, admin_key: AdminKey = None, as_json: AsJson = False
) -> None:
    """One alias."""
    alias = query(url, admin_key, lambda client: client.get_alias(name), as_json)
    if alias is not None:
        out.print(f"{alias['name']}: {render.variants(alias)}; {render.access(alias)}")


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
    owner: Owner = None,
    shared: Shared = False,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Create or replace an alias; the weights take effect at once.

    --owner/--shared are set anew each time (no option: the operator's, private).
    """
    weights = parse_variants(variants)
    with session(url, admin_key) as client:
        alias = client.set_alias(name, weights, owner=owner, shared=shared)
    out.print(f"{alias['name']}: {render.variants(alias)}; {render.access(alias)}")


@app.command("delete")
def delete(
    name: AliasName, yes: Yes = False, url: Url = DEFAULT_URL, admin_key: AdminKey = None
) -> None:
    """Delete an alias."""
    confirm(f"delete alias {name}?", yes)
    with session(url, admin_key) as client:
        client.delete_alias(name)
    out.print(f"deleted alias {name}")


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
