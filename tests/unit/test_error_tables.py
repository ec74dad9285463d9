"""The client's error tables agree with the server's one table (server/errors.py).

`clients` imports httpx only (it must not import the server), so it keeps its own copy of
what each error code means: the status a stream error frame (which has no status line)
stands for. This test is what keeps that copy true when the server's table changes.
"""

from __future__ import annotations

import pytest

from clients import errors as client
from server.errors import ERROR_TABLE, ErrorKind

KINDS = sorted(set(ERROR_TABLE.values()), key=lambda k: (k.status, k.type, k.code or ""))


def codes_by_status() -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for kind in ERROR_TABLE.values():
        if kind.code is not None:
            out.setdefault(kind.code, set()).add(kind.status)
    return out


def test_every_unambiguous_server_code_is_in_the_client_table_with_its_status() -> None:
    for code, statuses in codes_by_status().items():
        if len(statuses) == 1:
            assert client._STATUS_BY_CODE.get(code) == next(iter(statuses)), code
        else:  # e.g. invalid_api_key: 401 (tenant key) or 403 (admin key); `type` decides
            assert code not in client._STATUS_BY_CODE, code


def test_the_client_knows_no_code_the_server_does_not_send() -> None:
    server = codes_by_status()
    for code, status in client._STATUS_BY_CODE.items():
        assert server.get(code) == {status}, code


def test_client_types_are_server_types() -> None:
    server_types = {kind.type for kind in ERROR_TABLE.values()}
    assert set(client._STATUS_BY_TYPE) <= server_types


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"{k.status}-{k.type}-{k.code}")
def test_a_stream_error_gets_the_status_and_class_the_server_answers_it_with(
    kind: ErrorKind,
) -> None:
    error = client.stream_error({"message": "m", "type": kind.type, "code": kind.code})
    assert error.status == kind.status
    assert isinstance(error, client.error_class(kind.status))
    # Every status the server sends has its own class (5xx: InternalServerError).
    assert client.error_class(kind.status) is not client.APIStatusError
