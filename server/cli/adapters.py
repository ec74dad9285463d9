"""`loraswap adapters ...`: adapters and their versions, through the admin API."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, cast

import typer

from adapters_registry.errors import AdapterError
from adapters_registry.spec import AdapterSpec
from adapters_registry.validate import CONFIG_FILE as CONFIG_NAME
from adapters_registry.validate import WEIGHTS_FILE as WEIGHTS_NAME
from clients import (
    DEFAULT_URL,
    AdapterInfo,
    Client,
    NotFoundError,
    ServingDefaults,
    VersionInfo,
)
from server.cli import render
from server.cli.options import (
    AdminKey,
    AsJson,
    Name,
    Owner,
    Shared,
    Url,
    Yes,
    confirm,
    err,
    out,
    progress,
    query,
    session,
)

app = typer.Typer(help="Adapters and their versions (admin API).", no_args_is_help=True)

Version = Annotated[int, typer.Argument(help="Version number.", min=1, show_default=False)]
Sha256 = Annotated[
    str | None, typer.Option(help="Expected sha256 of the weights file.", show_default=False)
]
Stage = Annotated[bool, typer.Option("--stage", help="Do not make it current yet.")]
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


@app.command("list")
def list_adapters(
    url: Url = DEFAULT_URL, admin_key: AdminKey = None, as_json: AsJson = False
) -> None:
    """Every adapter: current version, versions, pinned, loaded in the engine."""
    adapters = query(url, admin_key, lambda client: client.list_adapters(), as_json)
    if adapters is not None:
        out.print(render.adapters_table(adapters))


@app.command("show")
def show(
    name: Name, url: Url = DEFAULT_URL, admin_key: AdminKey = None, as_json: AsJson = False
) -> None:
    """One adapter and all its versions."""
    adapter = query(url, admin_key, lambda client: client.get_adapter(name), as_json)
    if adapter is not None:
        pinned = ", pinned" if adapter["pinned"] else ""
        out.print(
            f"{adapter['name']}: current version {adapter['current_version']}{pinned}, "
            f"{render.access(adapter)}"
        )
        out.print(render.versions_table(adapter))


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

    def register(client: Client, defaults: ServingDefaults | None) -> AdapterInfo:
        return client.register_adapter(
            name, source, sha256=sha256, owner=owner, shared=shared, defaults=defaults
        )

    _create("registered", register, defaults_file, default, url, admin_key)


@app.command("upload")
def upload(
    name: Name,
    folder: Annotated[
        str,
        typer.Argument(help="Local PEFT folder: adapter_config.json + adapter_model.safetensors."),
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

    def upload(client: Client, defaults: ServingDefaults | None) -> AdapterInfo:
        with progress(f"uploading {name}") as bar:
            return client.upload_adapter(
                name, folder, sha256, bar, owner=owner, shared=shared, defaults=defaults
            )

    _create("uploaded", upload, defaults_file, default, url, admin_key)


def _create(
    verb: str,
    create: Callable[[Client, ServingDefaults | None], AdapterInfo],
    defaults_file: Path | None,
    default: Sequence[str] | None,
    url: str,
    admin_key: str | None,
) -> None:
    """Create version 1 of an adapter (`create` registers or uploads it) with the serving
    defaults of the command line, and say what it became."""
    with session(url, admin_key) as client:
        adapter = create(client, serving_defaults(defaults_file, default))
    out.print(f"{verb} {render.describe(adapter['versions'][-1])}, {render.access(adapter)}")


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
    stage: Stage = False,
    defaults_file: DefaultsFile = None,
    default: DefaultItems = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Add the next version of an adapter; it serves new requests at once unless --stage.
    Serving defaults belong to a version: give them again for each one."""
    with session(url, admin_key) as client:
        defaults = serving_defaults(defaults_file, default)
        if upload:
            with progress(f"uploading {name}") as bar:
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
    out.print(f"added {render.describe(version)}" + (" (staged)" if stage else " (current)"))


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
    stage: Stage = False,
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
    with session(url, admin_key):  # a bad defaults file: one line, exit 1
        defaults = serving_defaults(defaults_file, default)
    spec = _preflight(folder, name, base)
    out.print(
        f"checked {folder}: rank {spec.rank}, targets {', '.join(spec.target_modules)}, "
        f"sha256 {spec.sha256[:12]}"
    )
    with session(url, admin_key) as client:
        version = _push(client, folder, spec, name, stage, owner, shared, defaults)
    state = "staged: `loraswap adapters set-current` serves it" if stage else "current"
    out.print(f"pushed {render.describe(version)} ({state})")
    _print_call(url, name, version)


def _push(
    client: Client,
    folder: Path,
    spec: AdapterSpec,
    name: str,
    stage: bool,
    owner: str | None,
    shared: bool,
    defaults: ServingDefaults | None,
) -> VersionInfo:
    """Upload the checked folder's two files as the next version of NAME, or as a new
    adapter (the checkpoint's other files, optimizer pickles and all, stay here)."""
    files = {"adapter_config": folder / CONFIG_NAME, "adapter_model": folder / WEIGHTS_NAME}
    exists = _exists(client, name)
    with progress(f"uploading {name}") as bar:
        if exists:
            return client.upload_version(
                name,
                files,
                sha256=spec.sha256,
                make_current=not stage,
                progress=bar,
                defaults=defaults,
            )
        adapter = client.upload_adapter(
            name,
            files,
            sha256=spec.sha256,
            progress=bar,
            owner=owner,
            shared=shared,
            defaults=defaults,
        )
    return adapter["versions"][-1]


def _exists(client: Client, name: str) -> bool:
    try:
        client.get_adapter(name)
    except NotFoundError:
        return False
    return True


def _print_call(url: str, name: str, version: VersionInfo) -> None:
    """How to call the pushed version: a curl line to paste."""
    model = f"{version['base_model']}:{name}"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    out.print(
        f"curl {url.rstrip('/')}/v1/chat/completions "
        '-H "authorization: Bearer $LORASWAP_API_KEY" '
        f"-H 'content-type: application/json' -d '{body}'",
        soft_wrap=True,
    )


def _set_current(name: str, version: int, url: str, admin_key: str | None) -> None:
    with session(url, admin_key) as client:
        adapter = client.set_current(name, version)
    out.print(f"{adapter['name']}: current version is now {adapter['current_version']}")


@app.command("set-current")
def set_current(
    name: Name, version: Version, url: Url = DEFAULT_URL, admin_key: AdminKey = None
) -> None:
    """Route new requests to VERSION; running requests finish on theirs."""
    _set_current(name, version, url, admin_key)


@app.command("rollback")
def rollback(
    name: Name, version: Version, url: Url = DEFAULT_URL, admin_key: AdminKey = None
) -> None:
    """Make an earlier VERSION current again (the same as set-current)."""
    _set_current(name, version, url, admin_key)


@app.command("delete")
def delete(
    name: Name, yes: Yes = False, url: Url = DEFAULT_URL, admin_key: AdminKey = None
) -> None:
    """Delete an adapter and all its versions (refused while an alias routes to it)."""
    confirm(f"delete adapter {name} and all its versions?", yes)
    with session(url, admin_key) as client:
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
    confirm(f"delete {name} version {version}?", yes)
    with session(url, admin_key) as client:
        deleted = client.delete_version(name, version)
    out.print(f"deleted {deleted['adapter']} v{deleted['version']}")


def _pin(name: str, pinned: bool, url: str, admin_key: str | None) -> None:
    with session(url, admin_key) as client:
        adapter = client.pin(name, pinned)
    out.print(f"{'pinned' if adapter['pinned'] else 'unpinned'} {adapter['name']}")


@app.command("pin")
def pin(name: Name, url: Url = DEFAULT_URL, admin_key: AdminKey = None) -> None:
    """Keep an adapter loaded in the engine, also across restarts."""
    _pin(name, True, url, admin_key)


@app.command("unpin")
def unpin(name: Name, url: Url = DEFAULT_URL, admin_key: AdminKey = None) -> None:
    """Let a pinned adapter leave the engine when idle."""
    _pin(name, False, url, admin_key)


@app.command("warm")
def warm(name: Name, url: Url = DEFAULT_URL, admin_key: AdminKey = None) -> None:
    """Load the current version into the engine now, before its first request."""
    with session(url, admin_key) as client:
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
    with session(url, admin_key) as client:
        adapter = client.get_adapter(name)
        if owner is not None or operator or shared is not None:
            adapter = client.set_access(
                name,
                owner=None if operator else (owner or adapter["owner"]),
                shared=adapter["shared"] if shared is None else shared,
            )
    out.print(f"{adapter['name']}: {render.access(adapter)}")


def serving_defaults(path: Path | None, items: Sequence[str] | None) -> ServingDefaults | None:
    """--defaults FILE (a JSON object), then each --default KEY=VALUE over it. Checked
    by the server (which knows the bounds): a bad one is its 400, and nothing registered.
    Raises ValueError or OSError (one line from `session`)."""
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
