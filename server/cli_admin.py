"""`loraswap adapters|aliases|tenants ...`: the admin API from the shell.

Every command talks HTTP through `clients.Client`, like any other user of the server
(`--url` / `LORASWAP_URL`, `--admin-key` / `LORASWAP_ADMIN_KEY`). Mounted by server/cli.py:

    app.add_typer(adapters_app, name="adapters")
    app.add_typer(aliases_app, name="aliases")
    app.add_typer(tenants_app, name="tenants")

`make_adapters_app(connect)`, `make_aliases_app(connect)` and `make_tenants_app(connect)`
build the same commands on another client factory (tests pass one that talks to the app
in-process).

Failures print one line, the server's message and code, and exit with status 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

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

from adapters_registry.errors import AdapterError
from adapters_registry.spec import AdapterSpec
from adapters_registry.validate import CONFIG_FILE as CONFIG_NAME
from adapters_registry.validate import WEIGHTS_FILE as WEIGHTS_NAME
from clients import (
    DEFAULT_URL,
    AdapterInfo,
    AliasInfo,
    Client,
    LoraswapError,
    NotFoundError,
    ProgressCallback,
    ServingDefaults,
    TenantInfo,
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
TenantName = Annotated[str, typer.Argument(help="Tenant name.", show_default=False)]
Owner = Annotated[
    str | None,
    typer.Option("--owner", help="Owning tenant (default: the operator's).", show_default=False),
]
Shared = Annotated[
    bool, typer.Option("--shared", help="Usable by every tenant (default: by its owner only).")
]
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
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
DefaultsFile = Annotated[
    Path | None,
    typer.Option(
        "--defaults",
        help="The version's serving defaults: a JSON file, e.g. "
        '{"system_prompt": "...", "temperature": 0, "max_tokens": 256}.',
        show_default=False,
    ),
]
DefaultItems = Annotated[
    list[str] | None,
    typer.Option(
        "--default",
        help="One serving default, KEY=VALUE (VALUE as JSON, else text), e.g. "
        "--default temperature=0 --default system_prompt='You are a pirate.'; "
        "over --defaults. Repeatable.",
        show_default=False,
    ),
]

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
            out.print(
                f"{adapter['name']}: current version {adapter['current_version']}{pinned}, "
                f"{_access(adapter)}"
            )
            out.print(_versions_table(adapter))

    @app.command("register")
    def register(
        name: Name,
        source: Annotated[
            str,
            typer.Argument(help="Path on the server (inside its allowed roots) or http(s) URL."),
        ],
        sha256: Sha256 = None,
        owner: Owner = None,
        shared: Shared = False,
        defaults_file: DefaultsFile = None,
        default: DefaultItems = None,
        url: Url = DEFAULT_URL,
        admin_key: AdminKey = None,
    ) -> None:
        """Register an adapter (version 1) from a path the server can read, or a URL."""
        with _session(connect, url, admin_key) as client:
            defaults = _defaults(defaults_file, default)
            adapter = client.register_adapter(
                name, source, sha256=sha256, owner=owner, shared=shared, defaults=defaults
            )
        out.print(f"registered {_describe(adapter['versions'][-1])}, {_access(adapter)}")

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
        owner: Owner = None,
        shared: Shared = False,
        defaults_file: DefaultsFile = None,
        default: DefaultItems = None,
        url: Url = DEFAULT_URL,
        admin_key: AdminKey = None,
    ) -> None:
        """Register an adapter (version 1) by uploading a local folder."""
        with _session(connect, url, admin_key) as client:
            defaults = _defaults(defaults_file, default)
            with _progress(f"uploading {name}") as bar:
                adapter = client.upload_adapter(
                    name,
                    folder,
                    sha256=sha256,
                    progress=bar,
                    owner=owner,
                    shared=shared,
                    defaults=defaults,
                )
        out.print(f"uploaded {_describe(adapter['versions'][-1])}, {_access(adapter)}")

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
        defaults_file: DefaultsFile = None,
        default: DefaultItems = None,
        url: Url = DEFAULT_URL,
        admin_key: AdminKey = None,
    ) -> None:
        """Add the next version of an adapter; it serves new requests at once unless --stage.
        Serving defaults belong to a version: give them again for each one."""
        with _session(connect, url, admin_key) as client:
            defaults = _defaults(defaults_file, default)
            if upload:
                with _progress(f"uploading {name}") as bar:
                    version = client.upload_version(
                        name,
                        source,
                        sha256=sha256,
                        make_current=not stage,
                        progress=bar,
                        defaults=defaults,
                    )
            else:
                version = client.add_version(
                    name, source, sha256=sha256, make_current=not stage, defaults=defaults
                )
        out.print(f"added {_describe(version)}" + (" (staged)" if stage else " (current)"))

    @app.command("push")
    def push(
        folder: Annotated[
            Path,
            typer.Argument(
                help="A PEFT save_pretrained output, e.g. a Trainer's checkpoint-500 folder.",
                show_default=False,
            ),
        ],
        name: Name,
        base: Annotated[
            Path | None,
            typer.Option(
                "--base",
                help="Base model folder: also check the adapter fits it.",
                show_default=False,
            ),
        ] = None,
        stage: Annotated[bool, typer.Option("--stage", help="Do not make it current yet.")] = False,
        owner: Owner = None,
        shared: Shared = False,
        defaults_file: DefaultsFile = None,
        default: DefaultItems = None,
        url: Url = DEFAULT_URL,
        admin_key: AdminKey = None,
    ) -> None:
        """From a training run to a served version: check the adapter here (the server's
        checks), upload it as the next version of NAME (or as a new adapter), with its
        serving defaults if given, and print how to call it."""
        with _session(connect, url, admin_key):  # a bad defaults file: one line, exit 1
            defaults = _defaults(defaults_file, default)
        spec = _preflight(folder, name, base)
        out.print(
            f"checked {folder}: rank {spec.rank}, targets {', '.join(spec.target_modules)}, "
            f"sha256 {spec.sha256[:12]}"
        )
        files = {"adapter_config": folder / CONFIG_NAME, "adapter_model": folder / WEIGHTS_NAME}
        with _session(connect, url, admin_key) as client:
            try:
                client.get_adapter(name)
                exists = True
            except NotFoundError:
                exists = False
            with _progress(f"uploading {name}") as bar:
                if exists:
                    version = client.upload_version(
                        name,
                        files,
                        sha256=spec.sha256,
                        make_current=not stage,
                        progress=bar,
                        defaults=defaults,
                    )
                else:
                    adapter = client.upload_adapter(
                        name,
                        files,
                        sha256=spec.sha256,
                        progress=bar,
                        owner=owner,
                        shared=shared,
                        defaults=defaults,
                    )
                    version = adapter["versions"][-1]
        state = "staged: `loraswap adapters set-current` serves it" if stage else "current"
        out.print(f"pushed {_describe(version)} ({state})")
        model = f"{version['base_model']}:{name}"
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
        out.print(
            f"curl {url.rstrip('/')}/v1/chat/completions "
            '-H "authorization: Bearer $LORASWAP_API_KEY" '
            f"-H 'content-type: application/json' -d '{body}'",
            soft_wrap=True,
        )

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

    @app.command("access")
    def access(
        name: Name,
        owner: Annotated[
            str | None,
            typer.Option("--owner", help="Give it to this tenant.", show_default=False),
        ] = None,
        operator: Annotated[
            bool, typer.Option("--operator", help="Give it back to the operator (no owner).")
        ] = False,
        shared: Annotated[
            bool | None,
            typer.Option(
                "--shared/--private",
                help="Usable by every tenant, or by its owner only.",
                show_default=False,
            ),
        ] = None,
        url: Url = DEFAULT_URL,
        admin_key: AdminKey = None,
    ) -> None:
        """Who may use an adapter: its owner tenant, and whether every tenant may.

        What is not given stays as it is; with no option, prints the current access.
        A tenant that may not use it gets 404, as if it did not exist.
        """
        if owner is not None and operator:
            raise typer.BadParameter("give --owner or --operator, not both")
        with _session(connect, url, admin_key) as client:
            adapter = client.get_adapter(name)
            if owner is not None or operator or shared is not None:
                adapter = client.set_access(
                    name,
                    owner=None if operator else (owner or adapter["owner"]),
                    shared=adapter["shared"] if shared is None else shared,
                )
        out.print(f"{adapter['name']}: {_access(adapter)}")

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
            out.print(f"{alias['name']}: {_variants(alias)}; {_access(alias)}")

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
        with _session(connect, url, admin_key) as client:
            alias = client.set_alias(name, weights, owner=owner, shared=shared)
        out.print(f"{alias['name']}: {_variants(alias)}; {_access(alias)}")

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


def make_tenants_app(connect: ClientFactory = default_client) -> typer.Typer:
    """The `tenants` commands, each opening its client through `connect`."""
    app = typer.Typer(help="Tenants, their quotas and API keys (admin API).", no_args_is_help=True)

    @app.command("list")
    def list_tenants(
        url: Url = DEFAULT_URL, admin_key: AdminKey = None, as_json: AsJson = False
    ) -> None:
        """Every tenant: quotas, API key ids, requests running."""
        tenants = _query(connect, url, admin_key, lambda client: client.list_tenants(), as_json)
        if tenants is not None:
            out.print(_tenants_table(tenants))

    @app.command("show")
    def show(
        name: TenantName,
        url: Url = DEFAULT_URL,
        admin_key: AdminKey = None,
        as_json: AsJson = False,
    ) -> None:
        """One tenant."""
        tenant = _query(connect, url, admin_key, lambda client: client.get_tenant(name), as_json)
        if tenant is not None:
            out.print(f"{tenant['name']}: {_quotas(tenant)}, {tenant['running']} running")
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
        with _session(connect, url, admin_key) as client:
            try:
                client.get_tenant(name)
            except NotFoundError:
                pass
            else:
                err.print(
                    f"[red]error:[/red] tenant {name!r} already exists; "
                    "change its quotas with `tenants update`",
                    soft_wrap=True,
                )
                raise typer.Exit(1)
            tenant = client.put_tenant(
                name, _limit(max_concurrent, None), _limit(tokens_per_minute, None)
            )
        out.print(f"created tenant {tenant['name']}: {_quotas(tenant)}")

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
        with _session(connect, url, admin_key) as client:
            current = client.get_tenant(name)
            tenant = client.put_tenant(
                name,
                _limit(max_concurrent, current["max_concurrent"]),
                _limit(tokens_per_minute, current["tokens_per_minute"]),
            )
        out.print(f"updated tenant {tenant['name']}: {_quotas(tenant)}")

    @app.command("delete")
    def delete(
        name: TenantName, yes: Yes = False, url: Url = DEFAULT_URL, admin_key: AdminKey = None
    ) -> None:
        """Delete a tenant and its API keys (refused while it owns an adapter or alias)."""
        if not yes:
            typer.confirm(f"delete tenant {name} and all its API keys?", abort=True)
        with _session(connect, url, admin_key) as client:
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
        with _session(connect, url, admin_key) as client:
            created = client.create_key(name)
        typer.echo(json.dumps(created, indent=2) if as_json else created["key"])
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
        if not yes:
            typer.confirm(f"revoke API key {key_id} of tenant {name}?", abort=True)
        with _session(connect, url, admin_key) as client:
            client.delete_key(name, key_id)
        out.print(f"revoked key {key_id} of tenant {name}")

    return app


def _limit(given: int | None, current: int | None) -> int | None:
    """A quota option: not given keeps `current`, 0 is no limit."""
    if given is None:
        return current
    return given or None


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


def _defaults(path: Path | None, items: Sequence[str] | None) -> ServingDefaults | None:
    """--defaults FILE (a JSON object), then each --default KEY=VALUE over it. Checked
    by the server (which knows the bounds): a bad one is its 400, and nothing registered.
    Raises ValueError or OSError (one line from _session)."""
    defaults: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: serving defaults must be a JSON object")
        defaults.update(loaded)
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--default {item!r}: expected KEY=VALUE")
        try:
            defaults[key] = json.loads(text)
        except json.JSONDecodeError:
            defaults[key] = text  # plain text, e.g. a system prompt
    return cast(ServingDefaults, defaults) if defaults else None


def _preflight(folder: Path, name: str, base: Path | None) -> AdapterSpec:
    """The server's checks, here: a refused adapter never leaves the machine."""
    from adapters_registry.base_model import BaseModelShapes
    from adapters_registry.preflight import preflight

    try:
        shapes = BaseModelShapes.from_dir(base, base.name) if base is not None else None
        return preflight(folder, name=name, base=shapes)
    except AdapterError as exc:
        err.print(f"[red]refused:[/red] {exc.message}", soft_wrap=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None


def _describe(v: VersionInfo) -> str:
    size, sha = _size(v["size_bytes"]), v["sha256"][:12]
    return f"{v['adapter']} v{v['version']} (rank {v['rank']}, {size}, sha256 {sha})"


def _adapters_table(adapters: Sequence[AdapterInfo]) -> Table:
    table = Table(
        "adapter", "current", "versions", "pinned", "loaded", "owner", "shared", "created"
    )
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
            a["owner"] or "-",
            "yes" if a["shared"] else "",
            _time(a["created_at"]),
        )
    return table


def _versions_table(adapter: AdapterInfo) -> Table:
    table = Table(
        "version",
        "sha256",
        "size",
        "rank",
        "alpha",
        "targets",
        "defaults",
        "loaded",
        "source",
        "created",
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
            ",".join(v.get("defaults") or ()),  # the names: `--json` shows the values
            (f"yes ({v['running']} running)" if v["running"] else "yes") if v["loaded"] else "",
            v["source"],
            _time(v["created_at"]),
        )
    return table


def _aliases_table(aliases: Sequence[AliasInfo]) -> Table:
    table = Table("alias", "variants", "owner", "shared", "updated")
    for a in aliases:
        table.add_row(
            a["name"],
            _variants(a),
            a["owner"] or "-",
            "yes" if a["shared"] else "",
            _time(a["updated_at"]),
        )
    return table


def _tenants_table(tenants: Sequence[TenantInfo]) -> Table:
    table = Table("tenant", "max concurrent", "tokens/minute", "keys", "running", "created")
    for t in tenants:
        table.add_row(
            t["name"],
            _number(t["max_concurrent"]),
            _number(t["tokens_per_minute"]),
            ", ".join(t["key_ids"]),
            str(t["running"]),
            _time(t["created_at"]),
        )
    return table


def _access(record: AdapterInfo | AliasInfo) -> str:
    owner = f"owner {record['owner']}" if record["owner"] else "owner: the operator"
    return f"{owner}, {'shared with every tenant' if record['shared'] else 'private'}"


def _quotas(tenant: TenantInfo) -> str:
    return (
        f"max concurrent {_number(tenant['max_concurrent'])}, "
        f"tokens/minute {_number(tenant['tokens_per_minute'])}"
    )


def _number(limit: int | None) -> str:
    return "no limit" if limit is None else str(limit)


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
tenants_app = make_tenants_app()
