"""Admin API: register adapters and versions, swap and roll back, pin and warm, aliases.

Registry writes do file and database I/O (fsync), so they run in a worker thread; the
event loop keeps serving inference meanwhile.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from adapters_registry.errors import AdapterNotFound, InvalidAlias
from adapters_registry.records import (
    AdapterRecord,
    AliasRecord,
    ServingDefaults,
    TenantRecord,
    Variant,
    VersionRecord,
)
from server.adapters import AdapterRouter
from server.api.deps import EngineDep, GatewayDep, QuotasDep, RouterDep
from server.auth import require_admin
from server.errors import InvalidDefaults
from server.quotas import Admission

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


_DEFAULTS_DOC = (
    "Serving defaults of this version, for the fields a request does not send: "
    f"{', '.join(ServingDefaults.names())}. Checked as a request's own fields are."
)
# Checked by the Gateway (server/serving.py), not here: vLLM's bounds, a 400 naming the key.
Defaults = dict[str, Any] | None


class RegisterAdapter(_Body):
    name: str = Field(description="Adapter name: [a-z0-9][a-z0-9._-]{0,63}.")
    source: str = Field(
        description="A path inside the allowed roots, an http(s) URL, s3://bucket/prefix "
        "or hf://org/repo[@revision] (if enabled) of a folder with adapter_config.json and "
        "adapter_model.safetensors."
    )
    sha256: str | None = Field(
        None, description="Expected sha256 of the weights file (64 hex digits)."
    )
    owner: str | None = Field(None, description="Owning tenant; none = the operator's.")
    shared: bool = Field(False, description="Usable by every tenant.")
    defaults: Defaults = Field(
        None, description=_DEFAULTS_DOC, examples=[{"system_prompt": "...", "temperature": 0}]
    )


class Access(_Body):
    owner: str | None = Field(None, description="Owning tenant; none = the operator's.")
    shared: bool = Field(False, description="Usable by every tenant.")


class TenantBody(_Body):
    max_concurrent: Annotated[int, Field(ge=1, le=_MAX_INT)] | None = Field(
        None, description="Requests running at once; none = no limit."
    )
    tokens_per_minute: Annotated[int, Field(ge=1, le=_MAX_INT)] | None = Field(
        None, description="Prompt + completion tokens per minute; none = no limit."
    )


class NewVersion(_Body):
    source: str
    sha256: str | None = None
    make_current: bool = Field(True, description="Route new requests to it at once.")
    defaults: Defaults = Field(None, description=_DEFAULTS_DOC)


# Bounded so that no number the database cannot hold (SQLite: 64-bit) gets that far.
_MAX_INT = 2**63 - 1
VersionNumber = Annotated[int, Field(ge=1, le=_MAX_INT)]


class SetCurrent(_Body):
    version: VersionNumber


class SetPinned(_Body):
    pinned: bool


class AliasBody(_Body):
    variants: dict[str, Annotated[int, Field(ge=0, le=1_000_000)]] = Field(
        description='Variant -> weight, e.g. {"pirate@3": 90, "formal": 10}; '
        "`name` follows the adapter's current version, `name@N` pins version N.",
        examples=[{"pirate@3": 90, "formal": 10}],
    )
    owner: str | None = Field(None, description="Owning tenant; none = the operator's.")
    shared: bool = Field(False, description="Usable by every tenant.")


def _version(v: VersionRecord) -> dict[str, Any]:
    return {
        "adapter": v.adapter,
        "version": v.version,
        "sha256": v.sha256,
        "size_bytes": v.size_bytes,
        "rank": v.rank,
        "alpha": v.alpha,
        "target_modules": list(v.target_modules),
        "base_model": v.base_model,
        "source": v.source,
        "created_at": v.created_at,
        "defaults": None if v.defaults is None else v.defaults.as_dict(),
    }


def _adapter(a: AdapterRecord, router_: AdapterRouter) -> dict[str, Any]:
    loaded = {h.name: leases for h, leases in router_.loaded()}
    return {
        "name": a.name,
        "current_version": a.current_version,
        "pinned": a.pinned,
        "owner": a.owner,
        "shared": a.shared,
        "created_at": a.created_at,
        "versions": [
            {
                **_version(v),
                "loaded": f"{a.name}@{v.version}" in loaded,
                "running": loaded.get(f"{a.name}@{v.version}", 0),
            }
            for v in a.versions
        ],
    }


def _alias(a: AliasRecord) -> dict[str, Any]:
    return {
        "name": a.name,
        "variants": {v.key: v.weight for v in a.variants},
        "owner": a.owner,
        "shared": a.shared,
        "created_at": a.created_at,
        "updated_at": a.updated_at,
    }


def _parse_variants(name: str, raw: dict[str, int]) -> tuple[Variant, ...]:
    out = []
    for key, weight in raw.items():
        adapter, sep, version = key.partition("@")
        if sep and not (version.isdigit() and 1 <= int(version) <= _MAX_INT):
            raise InvalidAlias(f"alias {name!r}: variant {key!r} must be 'name' or 'name@N'")
        out.append(Variant(adapter=adapter, version=int(version) if sep else None, weight=weight))
    return tuple(out)


@router.post("/adapters", status_code=201, summary="Register an adapter (version 1)")
async def register(
    body: RegisterAdapter, router_: RouterDep, gateway: GatewayDep
) -> dict[str, Any]:
    defaults = gateway.parse_defaults(body.defaults)
    await asyncio.to_thread(
        router_.registry.register,
        body.name,
        body.source,
        sha256=body.sha256,
        owner=body.owner,
        shared=body.shared,
        defaults=defaults,
    )
    return _adapter(_get(router_, body.name), router_)


@router.post("/adapters/upload", status_code=201, summary="Register an adapter from files")
async def register_upload(
    router_: RouterDep,
    gateway: GatewayDep,
    name: Annotated[str, Form()],
    adapter_config: Annotated[UploadFile, File(description="adapter_config.json")],
    adapter_model: Annotated[UploadFile, File(description="adapter_model.safetensors")],
    sha256: Annotated[str | None, Form()] = None,
    owner: Annotated[str | None, Form()] = None,
    shared: Annotated[bool, Form()] = False,
    defaults: Annotated[str | None, Form(description=_DEFAULTS_DOC + " A JSON object.")] = None,
) -> dict[str, Any]:
    parsed = gateway.parse_defaults(_json_object(defaults))
    files = _files(adapter_config, adapter_model)
    await asyncio.to_thread(
        router_.registry.register_upload,
        name,
        files,
        sha256=sha256,
        owner=owner,
        shared=shared,
        defaults=parsed,
    )
    return _adapter(_get(router_, name), router_)


@router.post("/adapters/{name}/versions", status_code=201, summary="Add a version")
async def add_version(
    name: str, body: NewVersion, router_: RouterDep, gateway: GatewayDep
) -> dict[str, Any]:
    defaults = gateway.parse_defaults(body.defaults)
    record = await asyncio.to_thread(
        router_.registry.register,
        name,
        body.source,
        sha256=body.sha256,
        create=False,
        make_current=body.make_current,
        defaults=defaults,
    )
    await router_.release_unreachable()
    return _version(record)


@router.post(
    "/adapters/{name}/versions/upload", status_code=201, summary="Add a version from files"
)
async def add_version_upload(
    name: str,
    router_: RouterDep,
    gateway: GatewayDep,
    adapter_config: Annotated[UploadFile, File()],
    adapter_model: Annotated[UploadFile, File()],
    sha256: Annotated[str | None, Form()] = None,
    make_current: Annotated[bool, Form()] = True,
    defaults: Annotated[str | None, Form(description=_DEFAULTS_DOC + " A JSON object.")] = None,
) -> dict[str, Any]:
    parsed = gateway.parse_defaults(_json_object(defaults))
    files = _files(adapter_config, adapter_model)
    record = await asyncio.to_thread(
        router_.registry.register_upload,
        name,
        files,
        sha256=sha256,
        create=False,
        make_current=make_current,
        defaults=parsed,
    )
    await router_.release_unreachable()
    return _version(record)


@router.get("/adapters", summary="Every adapter with its versions and engine residency")
async def list_adapters(router_: RouterDep) -> dict[str, Any]:
    return {"data": [_adapter(a, router_) for a in router_.registry.adapters()]}


@router.get("/adapters/{name}", summary="One adapter")
async def get_adapter(name: str, router_: RouterDep) -> dict[str, Any]:
    return _adapter(_get(router_, name), router_)


@router.put("/adapters/{name}/current", summary="Set the current version (also: rollback)")
async def set_current(name: str, body: SetCurrent, router_: RouterDep) -> dict[str, Any]:
    record = await asyncio.to_thread(router_.registry.set_current, name, body.version)
    # The old version leaves the engine once its running requests finish.
    await router_.release_unreachable()
    return _adapter(record, router_)


@router.delete("/adapters/{name}/versions/{version}", summary="Delete a version (409 if routed)")
async def delete_version(
    name: str, version: Annotated[int, PathParam(ge=1, le=_MAX_INT)], router_: RouterDep
) -> dict[str, Any]:
    record = await asyncio.to_thread(router_.registry.delete_version, name, version)
    await router_.release_unreachable()
    return _version(record)


@router.delete("/adapters/{name}", summary="Delete an adapter (409 while an alias routes to it)")
async def delete_adapter(name: str, router_: RouterDep) -> dict[str, Any]:
    await asyncio.to_thread(router_.registry.delete_adapter, name)
    await router_.release_unreachable()
    return {"name": name, "deleted": True}


@router.put("/adapters/{name}/access", summary="Set the owning tenant and sharing")
async def set_access(name: str, body: Access, router_: RouterDep) -> dict[str, Any]:
    record = await asyncio.to_thread(
        router_.registry.set_access, name, owner=body.owner, shared=body.shared
    )
    return _adapter(record, router_)


@router.put("/adapters/{name}/pin", summary="Pin (keep resident) or unpin an adapter")
async def pin(name: str, body: SetPinned, router_: RouterDep) -> dict[str, Any]:
    record = await asyncio.to_thread(router_.registry.set_pinned, name, body.pinned)
    if body.pinned:
        await router_.warm(name)
    else:
        await router_.release_unreachable()
    return _adapter(record, router_)


@router.post("/adapters/{name}/warm", summary="Load the current version into the engine now")
async def warm(name: str, router_: RouterDep) -> dict[str, Any]:
    handle = await router_.warm(name)
    return {"name": name, "loaded": handle.name}


@router.get("/aliases", summary="Every alias")
async def list_aliases(router_: RouterDep) -> dict[str, Any]:
    return {"data": [_alias(a) for a in router_.registry.aliases()]}


@router.get("/aliases/{name}", summary="One alias")
async def get_alias(name: str, router_: RouterDep) -> dict[str, Any]:
    alias = router_.registry.alias(name)
    if alias is None:
        raise AdapterNotFound(f"alias {name!r} not found", adapter=name)
    return _alias(alias)


@router.put("/aliases/{name}", summary="Create or update an alias (weights change at once)")
async def put_alias(name: str, body: AliasBody, router_: RouterDep) -> dict[str, Any]:
    variants = _parse_variants(name, body.variants)
    record = await asyncio.to_thread(
        router_.registry.put_alias, name, variants, owner=body.owner, shared=body.shared
    )
    await router_.release_unreachable()
    return _alias(record)


@router.delete("/aliases/{name}", summary="Delete an alias")
async def delete_alias(name: str, router_: RouterDep) -> dict[str, Any]:
    record = await asyncio.to_thread(router_.registry.delete_alias, name)
    await router_.release_unreachable()
    return _alias(record)


def _get(router_: AdapterRouter, name: str) -> AdapterRecord:
    record = router_.registry.adapter(name)
    if record is None:
        raise AdapterNotFound(f"adapter {name!r} not found", adapter=name)
    return record


def _json_object(text: str | None) -> dict[str, Any] | None:
    """A form field holding a JSON object (uploads are multipart: no nested JSON)."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InvalidDefaults("defaults must be a JSON object", param="defaults")
    return value


def _files(config: UploadFile, model: UploadFile) -> dict[str, BinaryIO]:
    return {"adapter_config.json": config.file, "adapter_model.safetensors": model.file}


# -- tenants and their API keys -------------------------------------------------------


def _tenant(t: TenantRecord, quotas: Admission) -> dict[str, Any]:
    return {
        "name": t.name,
        "max_concurrent": t.max_concurrent,
        "tokens_per_minute": t.tokens_per_minute,
        "created_at": t.created_at,
        "key_ids": list(t.key_ids),
        "running": quotas.tenant_in_flight(t.name),
    }


@router.put("/tenants/{name}", summary="Create a tenant or change its quotas")
async def put_tenant(
    name: str, body: TenantBody, router_: RouterDep, quotas: QuotasDep
) -> dict[str, Any]:
    record = await asyncio.to_thread(
        router_.registry.put_tenant,
        name,
        max_concurrent=body.max_concurrent,
        tokens_per_minute=body.tokens_per_minute,
    )
    return _tenant(record, quotas)


@router.get("/tenants", summary="Every tenant")
async def list_tenants(router_: RouterDep, quotas: QuotasDep) -> dict[str, Any]:
    return {"data": [_tenant(t, quotas) for t in router_.registry.tenants()]}


@router.get("/tenants/{name}", summary="One tenant")
async def get_tenant(name: str, router_: RouterDep, quotas: QuotasDep) -> dict[str, Any]:
    record = router_.registry.tenant(name)
    if record is None:
        raise AdapterNotFound(f"tenant {name!r} not found", adapter=name)
    return _tenant(record, quotas)


@router.delete("/tenants/{name}", summary="Delete a tenant and its keys (409 while it owns any)")
async def delete_tenant(name: str, router_: RouterDep) -> dict[str, Any]:
    await asyncio.to_thread(router_.registry.delete_tenant, name)
    return {"name": name, "deleted": True}


@router.post(
    "/tenants/{name}/keys",
    status_code=201,
    summary="Create an API key (the key is shown in this response only)",
)
async def create_key(name: str, router_: RouterDep) -> dict[str, Any]:
    record, key = await asyncio.to_thread(router_.registry.create_key, name)
    return {"tenant": name, "key_id": record.key_id, "key": key, "created_at": record.created_at}


@router.delete("/tenants/{name}/keys/{key_id}", summary="Revoke an API key")
async def delete_key(name: str, key_id: str, router_: RouterDep) -> dict[str, Any]:
    await asyncio.to_thread(router_.registry.delete_key, name, key_id)
    return {"tenant": name, "key_id": key_id, "deleted": True}


@router.get("/engine", summary="Engine status: running requests, loaded adapter versions")
async def engine_status(router_: RouterDep, engine: EngineDep, quotas: QuotasDep) -> dict[str, Any]:
    return {
        "engine_running_requests": await engine.num_running(),
        "server_in_flight": quotas.in_flight,
        "loaded": [
            {"name": h.name, "lora_id": h.lora_id, "running": n} for h, n in router_.loaded()
        ],
    }
