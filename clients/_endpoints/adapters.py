"""Adapters and their versions (admin key): register or upload, version, route, place."""

from __future__ import annotations

from clients._endpoints.calls import (
    access,
    create,
    defaults_body,
    defaults_form,
    delete,
    endpoint,
    form,
    form_bool,
    put,
    read,
)
from clients._wire import AdapterFiles, Op, Spec, data_list, json_body, segment, upload_files
from clients.types import (
    AdapterInfo,
    DeletedAdapter,
    ProgressCallback,
    ServingDefaults,
    VersionInfo,
    WarmedAdapter,
)


class AdapterEndpoints:
    """Register, version, route, share and place adapters; answers are the server's JSON
    as typed dicts."""

    @endpoint
    def register_adapter(
        self,
        name: str,
        source: str,
        sha256: str | None = None,
        *,
        owner: str | None = None,
        shared: bool = False,
        defaults: ServingDefaults | None = None,
    ) -> Op[AdapterInfo]:
        """Register adapter `name` as version 1 from `source`: a path inside the server's
        allowed roots (as the server sees it) or an http(s) URL of a PEFT folder.

        `owner`: the tenant it belongs to (None: the operator's); `shared`: every tenant
        may use it. Otherwise only its owner can name it (see `set_access`). `defaults`:
        the version's serving defaults, e.g. `{"system_prompt": ..., "temperature": 0}`,
        given to its requests that do not send those fields."""
        body = {
            "name": name,
            "source": source,
            "sha256": sha256,
            **access(owner, shared),
            **defaults_body(defaults),
        }
        return Op(create("/admin/adapters", json=body), json_body)

    @endpoint
    def upload_adapter(
        self,
        name: str,
        folder_or_files: AdapterFiles,
        sha256: str | None = None,
        progress: ProgressCallback | None = None,
        *,
        owner: str | None = None,
        shared: bool = False,
        defaults: ServingDefaults | None = None,
    ) -> Op[AdapterInfo]:
        """Register adapter `name` as version 1 from local files, uploaded: a PEFT folder
        or `{"adapter_config": path, "adapter_model": path}`. `progress(sent, total)`
        follows the bytes sent. `owner`, `shared` and `defaults` as in
        `register_adapter`."""
        fields = form(
            name=name,
            sha256=sha256,
            owner=owner,
            shared="true" if shared else None,
            defaults=defaults_form(defaults),
        )
        files = upload_files(folder_or_files, progress)
        return Op(create("/admin/adapters/upload", form=fields, files=files), json_body)

    @endpoint
    def add_version(
        self,
        name: str,
        source: str,
        sha256: str | None = None,
        make_current: bool = True,
        *,
        defaults: ServingDefaults | None = None,
    ) -> Op[VersionInfo]:
        """Add the next version of `name` from `source`, with its serving `defaults` (as
        in `register_adapter`: a version has only its own). It serves new requests at
        once, unless `make_current=False` (staged: set it current later)."""
        body = {
            "source": source,
            "sha256": sha256,
            "make_current": make_current,
            **defaults_body(defaults),
        }
        return Op(create(f"{_adapter(name)}/versions", json=body), json_body)

    @endpoint
    def upload_version(
        self,
        name: str,
        folder_or_files: AdapterFiles,
        sha256: str | None = None,
        make_current: bool = True,
        progress: ProgressCallback | None = None,
        *,
        defaults: ServingDefaults | None = None,
    ) -> Op[VersionInfo]:
        """Add the next version of `name` from local files, uploaded (see `upload_adapter`)."""
        fields = form(
            sha256=sha256, make_current=form_bool(make_current), defaults=defaults_form(defaults)
        )
        files = upload_files(folder_or_files, progress)
        path = f"{_adapter(name)}/versions/upload"
        return Op(create(path, form=fields, files=files), json_body)

    @endpoint
    def list_adapters(self) -> Op[list[AdapterInfo]]:
        """Every adapter with its versions, the current one, and engine residency."""
        return Op(read("/admin/adapters"), data_list)

    @endpoint
    def get_adapter(self, name: str) -> Op[AdapterInfo]:
        """One adapter with its versions."""
        return Op(read(_adapter(name)), json_body)

    @endpoint
    def set_current(self, name: str, version: int) -> Op[AdapterInfo]:
        """Route new requests for `name` to `version`; running requests finish on theirs."""
        return _set_current(name, version)

    @endpoint
    def rollback(self, name: str, version: int) -> Op[AdapterInfo]:
        """Make an earlier `version` current again: the same call as `set_current`."""
        return _set_current(name, version)

    @endpoint
    def delete_version(self, name: str, version: int) -> Op[VersionInfo]:
        """Delete one version (ConflictError while it is current or an alias pins it)."""
        return Op(delete(f"{_adapter(name)}/versions/{int(version)}"), json_body)

    @endpoint
    def delete_adapter(self, name: str) -> Op[DeletedAdapter]:
        """Delete an adapter and all its versions (ConflictError while an alias routes to it)."""
        return Op(delete(_adapter(name)), json_body)

    @endpoint
    def set_access(
        self, name: str, owner: str | None = None, shared: bool = False
    ) -> Op[AdapterInfo]:
        """Set who may use adapter `name`: its `owner` tenant (None: the operator) and, when
        `shared`, every tenant. Both are set: the defaults make it the operator's, private.
        A tenant that may not use it gets NotFoundError, as if it did not exist."""
        return Op(put(f"{_adapter(name)}/access", {"owner": owner, "shared": shared}), json_body)

    @endpoint
    def pin(self, name: str, pinned: bool = True) -> Op[AdapterInfo]:
        """Keep `name` loaded in the engine, also across restarts (`pinned=False` unpins)."""
        return Op(put(f"{_adapter(name)}/pin", {"pinned": pinned}), json_body)

    @endpoint
    def warm(self, name: str) -> Op[WarmedAdapter]:
        """Load the current version of `name` into the engine now, before its first request."""
        # A POST, but loading what is already loaded changes nothing: safe to send twice.
        spec = Spec("POST", f"{_adapter(name)}/warm", "admin", replayable=True)
        return Op(spec, json_body)


def _adapter(name: str) -> str:
    return f"/admin/adapters/{segment(name)}"


def _set_current(name: str, version: int) -> Op[AdapterInfo]:
    return Op(put(f"{_adapter(name)}/current", {"version": version}), json_body)
