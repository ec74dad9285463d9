"""Tenants, their quotas and their API keys (admin key)."""

from __future__ import annotations

from clients._endpoints.calls import create, delete, endpoint, put, read
from clients._wire import Op, data_list, json_body, segment
from clients.types import DeletedKey, DeletedTenant, NewApiKey, TenantInfo


class TenantEndpoints:
    """Create tenants, set their quotas, and issue and revoke their keys."""

    @endpoint
    def put_tenant(
        self, name: str, max_concurrent: int | None = None, tokens_per_minute: int | None = None
    ) -> Op[TenantInfo]:
        """Create tenant `name`, or set its quotas: `max_concurrent` requests running at
        once, `tokens_per_minute` (prompt + completion). None is no limit, so both are
        set: pass the ones to keep too. Over a quota, its requests get RateLimitError."""
        body = {"max_concurrent": max_concurrent, "tokens_per_minute": tokens_per_minute}
        return Op(put(f"/admin/tenants/{segment(name)}", body), json_body)

    @endpoint
    def list_tenants(self) -> Op[list[TenantInfo]]:
        """Every tenant with its quotas, key ids and requests running."""
        return Op(read("/admin/tenants"), data_list)

    @endpoint
    def get_tenant(self, name: str) -> Op[TenantInfo]:
        """One tenant."""
        return Op(read(f"/admin/tenants/{segment(name)}"), json_body)

    @endpoint
    def delete_tenant(self, name: str) -> Op[DeletedTenant]:
        """Delete a tenant and its keys (ConflictError while it owns an adapter or alias)."""
        return Op(delete(f"/admin/tenants/{segment(name)}"), json_body)

    @endpoint
    def create_key(self, tenant: str) -> Op[NewApiKey]:
        """A new API key for `tenant`. `key` is in this answer only (the server keeps its
        hash): store it now. Inference with `Client(api_key=key)` acts as that tenant."""
        return Op(create(f"/admin/tenants/{segment(tenant)}/keys"), json_body)

    @endpoint
    def delete_key(self, tenant: str, key_id: str) -> Op[DeletedKey]:
        """Revoke one of `tenant`'s keys by its id (the `key_id` of `create_key`)."""
        return Op(delete(f"/admin/tenants/{segment(tenant)}/keys/{segment(key_id)}"), json_body)
