"""http(s)://host/path/: a folder served over HTTP, fetched under a network policy.

Security review M1: the server must not become a way into its own network. So:
- http and https only, also after a redirect; every redirect is checked again;
- the host is resolved once, every address it resolves to must be allowed (public, or
  in `http_allowed_networks`), and the connection goes to that checked address (a DNS
  answer that changes between check and connect cannot move it);
- one total deadline for the whole fetch: before every read the socket's timeout is
  set to what is left, and reads return what is there (read1), so a server dripping a
  byte at a time cannot hold a worker past it.
Built on http.client rather than urllib/httpx because all three need the connection
itself: which address it goes to, and the socket's timeout between reads.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from adapters_registry.errors import AdapterError, AdapterTooLarge, InvalidSource
from adapters_registry.sources.base import (
    ADAPTER_FILES,
    CHUNK,
    Deadline,
    Fetched,
    Network,
    Source,
    SourcesConfig,
    cap_for,
    write_capped,
)
from adapters_registry.validate import WEIGHTS_FILE

_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class HttpSource(Source):
    def __init__(self, url: str, config: SourcesConfig) -> None:
        self.url = url
        self.config = config
        self._parts = _split(url)
        path = self._parts.path
        self._base_path = path if path.endswith("/") else path + "/"

    def describe(self) -> str:
        return _redact(self._parts)

    def pinned(self, fetched: Fetched) -> str:
        return self.url  # the sha256 pins it: a changed file is SourceChanged on re-fetch

    def file_url(self, name: str) -> str:
        parts = self._parts._replace(path=self._base_path + name)
        return urllib.parse.urlunsplit(parts)

    def fetch(self, dest: Path, *, max_bytes: int, deadline: Deadline) -> Fetched:
        sha = ""
        etags: dict[str, str] = {}
        for name in ADAPTER_FILES:
            cap = cap_for(name, max_bytes)
            digest, etag = self._get(self.file_url(name), dest / name, cap, deadline)
            if etag:
                etags[name] = etag
            if name == WEIGHTS_FILE:
                sha = digest
        return Fetched(sha256=sha, etags=etags)

    def _get(self, url: str, dest: Path, cap: int, deadline: Deadline) -> tuple[str, str | None]:
        shown = _redact(_split(url))
        try:
            for _ in range(self.config.http_max_redirects + 1):
                conn, response = _open(url, self.config.networks, deadline)
                try:
                    if response.status in _REDIRECTS:
                        location = response.getheader("Location")
                        if not location:
                            raise InvalidSource(f"{shown}: redirect without a Location")
                        url = urllib.parse.urljoin(url, location)
                        continue
                    if response.status != 200:
                        raise InvalidSource(f"downloading {shown} failed: HTTP {response.status}")
                    length = response.getheader("Content-Length")
                    if length is not None and length.isdigit() and int(length) > cap:
                        raise AdapterTooLarge(f"{shown} is {length} bytes, above the cap of {cap}")
                    digest = write_capped(
                        None, dest, cap, shown, chunks=_body(conn, response, deadline)
                    )
                    return digest, response.getheader("ETag")
                finally:
                    conn.close()
            raise InvalidSource(
                f"downloading {shown}: more than {self.config.http_max_redirects} redirects"
            )
        except AdapterError:
            raise
        except TimeoutError as exc:
            raise InvalidSource(
                f"downloading {shown} took longer than its deadline of {deadline.seconds:g} s"
            ) from exc
        except (http.client.HTTPException, OSError, ValueError) as exc:
            # HTTPException: bad status lines, truncated bodies (IncompleteRead), bad URLs
            # (InvalidURL); OSError: refused, reset, TLS; ValueError: malformed input.
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise InvalidSource(f"downloading {shown} failed: {reason}") from exc


def _split(url: str) -> urllib.parse.SplitResult:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a port that is not a number
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise InvalidSource(f"malformed source URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidSource("unsupported source URL: use http(s)://host/path")
    if parts.username is not None or parts.password is not None:
        raise InvalidSource("credentials in source URLs are not accepted")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise InvalidSource("malformed source URL: it contains whitespace")
    return parts


def _redact(parts: urllib.parse.SplitResult) -> str:
    """scheme://host[:port]/path: query strings may carry tokens (presigned URLs)."""
    return urllib.parse.urlunsplit(parts._replace(query="", fragment=""))


def _open(
    url: str, allowed: tuple[Network, ...], deadline: Deadline
) -> tuple[_Pinned, http.client.HTTPResponse]:
    parts = _split(url)
    host = parts.hostname
    assert host is not None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = _checked_address(host, port, allowed)
    conn: _Pinned
    if parts.scheme == "https":
        conn = _PinnedHTTPS(host, port, address, deadline.remaining())
    else:
        conn = _Pinned(host, port, address, deadline.remaining())
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    try:
        conn.request(
            "GET", target, headers={"User-Agent": "loraswap", "Accept-Encoding": "identity"}
        )
        conn.settimeout(deadline.remaining())
        return conn, conn.getresponse()
    except BaseException:
        conn.close()
        raise


def _body(conn: _Pinned, response: http.client.HTTPResponse, deadline: Deadline) -> Iterator[bytes]:
    while True:
        # The socket itself: http.client drops conn.sock once the response says the
        # connection closes after it (HTTP/1.0), while the response still reads from it.
        conn.settimeout(deadline.remaining())
        chunk = response.read1(CHUNK)
        if not chunk:
            if response.length:  # read1, unlike read, does not notice a short body
                raise http.client.IncompleteRead(b"", response.length)
            return
        yield chunk


def _checked_address(host: str, port: int, allowed: tuple[Network, ...]) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidSource(f"cannot resolve {host!r}") from exc
    addresses = [str(info[4][0]) for info in infos]
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not (ip.is_global or any(ip in net for net in allowed)):
            raise InvalidSource(
                f"source host {host!r} resolves to {ip}, an address sources are not allowed "
                "to reach (loopback, private, link-local...; see sources.http_allowed_networks)"
            )
    return addresses[0]


class _Pinned(http.client.HTTPConnection):
    """Connects to an address already checked, while speaking to `host`."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address
        # The connected socket, kept after http.client drops `sock` (see _body).
        self.socket: socket.socket | None = None

    def connect(self) -> None:
        self.sock = self.socket = socket.create_connection((self._address, self.port), self.timeout)

    def settimeout(self, seconds: float) -> None:
        if self.socket is not None:
            self.socket.settimeout(seconds)

    def close(self) -> None:
        super().close()
        if self.socket is not None:
            self.socket.close()


class _PinnedHTTPS(_Pinned, http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        self._tls = ssl.create_default_context()
        http.client.HTTPSConnection.__init__(self, host, port, timeout=timeout, context=self._tls)
        self._address = address
        self.socket = None

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        # Certificate and SNI for the host name, not the address connected to.
        self.sock = self.socket = self._tls.wrap_socket(sock, server_hostname=self.host)
