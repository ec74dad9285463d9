"""`loraswap tenants ...`: tenants, their quotas and API keys, through the admin API."""

from __future__ import annotations

from typing import Annotated

import typer

from clients import DEFAULT_URL, Client, NotFoundError
from server.cli import render
from server.cli.options import (
    AdminKey,
    AsJson,
    Url,
    Yes,
    confirm,
    err,
    out,
    print_json,
    query,
    session,
)

app = typer.Typer(help="Tenants, their quotas and API keys (admin API).", no_args_is_help=True)

TenantName = Annotated[str, typer.Argument(help="Tenant name.", show_default=False)]
MaxConcurrent = Annotated[
    int | None,
    typer.Option(
        "--max-concurrent",
        min=0,
        help="Requests running at once; 0 = no limit.",
        show_default=False,
    ),
]
TokensPerMinute = Annotated[
    int | None,
    typer.Option(
        "--tokens-per-minute",
        min=0,
        help="Prompt + completion tokens per minute; 0 = no limit.",
        show_default=False,
    ),
]


@app.command("list")
def list_tenants(
    url: Url = DEFAULT_URL, admin_key: AdminKey = None, as_json: AsJson = False
) -> None:
    """Every tenant: quotas, API key ids, requests running."""
    tenants = query(url, admin_key, lambda client: client.list_tenants(), as_json)
    if tenants is not None:
        out.print(render.tenants_table(tenants))


@app.command("show")
def show(
    name: TenantName,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    as_json: AsJson = False,
) -> None:
    """One tenant."""
    tenant = query(url, admin_key, lambda client: client.get_tenant(name), as_json)
    if tenant is not None:
        out.print(f"{tenant['name']}: {render.quotas(tenant)}, {tenant['running']} running")
        out.print(f"keys: {', '.join(tenant['key_ids']) or 'none'}")


@app.command("create")
def create(
    name: TenantName,
    max_concurrent: MaxConcurrent = None,
    tokens_per_minute: TokensPerMinute = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Create a tenant (no limit unless given). Then: `tenants key-create NAME`."""
    with session(url, admin_key) as client:
        _refuse_existing(client, name)
        tenant = client.put_tenant(
            name, _limit(max_concurrent, None), _limit(tokens_per_minute, None)
        )
    out.print(f"created tenant {tenant['name']}: {render.quotas(tenant)}")


def _refuse_existing(client: Client, name: str) -> None:
    """`create` does not overwrite a tenant's quotas: that is `update`."""
    try:
        client.get_tenant(name)
    except NotFoundError:
        return
    err.print(
        f"[red]error:[/red] tenant {name!r} already exists; "
        "change its quotas with `tenants update`",
        soft_wrap=True,
    )
    raise typer.Exit(1)


@app.command("update")
def update(
    name: TenantName,
    max_concurrent: MaxConcurrent = None,
    tokens_per_minute: TokensPerMinute = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Change a tenant's quotas; a quota not given stays as it is (0 lifts it)."""
    if max_concurrent is None and tokens_per_minute is None:
        raise typer.BadParameter("give --max-concurrent and/or --tokens-per-minute")
    with session(url, admin_key) as client:
        current = client.get_tenant(name)
        tenant = client.put_tenant(
            name,
            _limit(max_concurrent, current["max_concurrent"]),
            _limit(tokens_per_minute, current["tokens_per_minute"]),
        )
    out.print(f"updated tenant {tenant['name']}: {render.quotas(tenant)}")


@app.command("delete")
def delete(
    name: TenantName, yes: Yes = False, url: Url = DEFAULT_URL, admin_key: AdminKey = None
) -> None:
    """Delete a tenant and its API keys (refused while it owns an adapter or alias)."""
    confirm(f"delete tenant {name} and all its API keys?", yes)
    with session(url, admin_key) as client:
        client.delete_tenant(name)
    out.print(f"deleted tenant {name}")


@app.command("key-create")
def key_create(
    name: TenantName,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    as_json: AsJson = False,
) -> None:
    """Create an API key for a tenant and print it: the only time it can be seen.

    The key alone goes to stdout (`KEY=$(loraswap tenants key-create acme)`); the
    note about it to stderr.
    """
    with session(url, admin_key) as client:
        created = client.create_key(name)
    if as_json:
        print_json(created)
    else:
        typer.echo(created["key"])
    err.print(
        f"[yellow]warning:[/yellow] API key {created['key_id']} of tenant "
        f"{created['tenant']} is shown only this once and cannot be shown again: "
        "store it now (revoke it with `tenants key-delete` if it is lost)",
        soft_wrap=True,
    )


@app.command("key-delete")
def key_delete(
    name: TenantName,
    key_id: Annotated[
        str, typer.Argument(help="The key's id (see `tenants show`).", show_default=False)
    ],
    yes: Yes = False,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Revoke an API key: requests with it are refused from now on."""
    confirm(f"revoke API key {key_id} of tenant {name}?", yes)
    with session(url, admin_key) as client:
        client.delete_key(name, key_id)
    out.print(f"revoked key {key_id} of tenant {name}")


def _limit(given: int | None, current: int | None) -> int | None:
    """A quota option: not given keeps `current`, 0 is no limit."""
    if given is None:
        return current
    return given or None
