"""A/B aliases (admin key): one name, weighted over adapter versions."""

from __future__ import annotations

from collections.abc import Mapping

from clients._endpoints.calls import access, delete, endpoint, put, read
from clients._wire import Op, data_list, json_body, segment
from clients.types import AliasInfo


class AliasEndpoints:
    """Create, read and delete aliases (their experiments: `ExperimentEndpoints`)."""

    @endpoint
    def list_aliases(self) -> Op[list[AliasInfo]]:
        """Every A/B alias with its variants and weights."""
        return Op(read("/admin/aliases"), data_list)

    @endpoint
    def get_alias(self, name: str) -> Op[AliasInfo]:
        """One alias."""
        return Op(read(f"/admin/aliases/{segment(name)}"), json_body)

    @endpoint
    def set_alias(
        self,
        name: str,
        variants: Mapping[str, int],
        *,
        owner: str | None = None,
        shared: bool = False,
    ) -> Op[AliasInfo]:
        """Create or replace alias `name`: `{"pirate@3": 90, "formal": 10}` (`name` follows
        that adapter's current version, `name@N` pins version N). Takes effect at once.

        `owner`/`shared` as for adapters; every variant must be usable by whoever may use
        the alias (UnprocessableEntityError otherwise)."""
        body = {"variants": dict(variants), **access(owner, shared)}
        return Op(put(f"/admin/aliases/{segment(name)}", body), json_body)

    @endpoint
    def delete_alias(self, name: str) -> Op[AliasInfo]:
        """Delete an alias; answers what it was."""
        return Op(delete(f"/admin/aliases/{segment(name)}"), json_body)
