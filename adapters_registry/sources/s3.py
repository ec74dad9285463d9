"""s3://bucket/prefix: the folder's two objects, through boto3.

Why boto3 (not obstore): it is the reference client, so credentials resolve exactly as
every other AWS tool does (environment, shared profile, instance/container role), it
speaks to S3-compatible stores with an endpoint override, and it exposes what pinning
needs: object version ids, ETags and conditional GETs (If-Match).

Pinning: the recorded source is `s3://bucket/prefix#<pins>`. On a versioned bucket the
pins are the objects' version ids, and a later fetch gets exactly those objects even
after an overwrite. Otherwise they are the ETags, sent as If-Match: an overwritten
object is refused by the store (412) before any byte moves, and SourceChanged says so.
The weights' sha256 is verified on every fetch either way.

Bodies stream to disk in chunks; the size announced by the store is checked before
reading (an object over the cap is refused without downloading it), the bytes read are
counted too, and the total deadline is checked between reads (each read is bounded by
botocore's read timeout, set to the deadline).
"""

from __future__ import annotations

import threading
import urllib.parse
from pathlib import Path
from typing import Any

from adapters_registry.errors import AdapterError, AdapterTooLarge, InvalidSource, SourceChanged
from adapters_registry.sources.base import (
    ADAPTER_FILES,
    CHUNK,
    Deadline,
    Fetched,
    Source,
    SourcesConfig,
    cap_for,
    write_capped,
)
from adapters_registry.validate import WEIGHTS_FILE

# Error codes that mean "these credentials may not do this" (no secret is ever echoed).
_DENIED = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
)
_MISSING = frozenset({"NoSuchKey", "NotFound", "404"})


class S3Source(Source):
    def __init__(self, uri: str, config: SourcesConfig, clients: S3Clients) -> None:
        parts = urllib.parse.urlsplit(uri)
        if parts.scheme != "s3" or not parts.netloc or parts.query:
            raise InvalidSource("unsupported S3 source: use s3://bucket/prefix")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.config = config
        self._clients = clients
        pins = urllib.parse.parse_qs(parts.fragment)
        self._versions = {n: pins[f"v.{n}"][0] for n in ADAPTER_FILES if f"v.{n}" in pins}
        self._etags = {n: pins[f"e.{n}"][0] for n in ADAPTER_FILES if f"e.{n}" in pins}

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def pinned(self, fetched: Fetched) -> str:
        pins: dict[str, str] = {}
        for name in ADAPTER_FILES:
            version = fetched.versions.get(name)
            if version and version != "null":  # "null": a bucket without versioning
                pins[f"v.{name}"] = version
            elif name in fetched.etags:
                pins[f"e.{name}"] = fetched.etags[name]
        return self.describe() + ("#" + urllib.parse.urlencode(pins) if pins else "")

    def fetch(self, dest: Path, *, max_bytes: int, deadline: Deadline) -> Fetched:
        client = self._clients.get(deadline.seconds)
        sha = ""
        etags: dict[str, str] = {}
        versions: dict[str, str] = {}
        for name in ADAPTER_FILES:
            args: dict[str, str] = {"Bucket": self.bucket, "Key": self.key(name)}
            if name in self._versions:
                args["VersionId"] = self._versions[name]
            elif name in self._etags:
                args["IfMatch"] = self._etags[name]
            shown = f"s3://{self.bucket}/{self.key(name)}"
            try:
                response = client.get_object(**args)
                body = response["Body"]
                try:
                    cap = cap_for(name, max_bytes)
                    length = int(response.get("ContentLength") or 0)
                    if length > cap:
                        raise AdapterTooLarge(f"{shown} is {length} bytes, above the cap of {cap}")
                    digest = write_capped(
                        None,
                        dest / name,
                        cap,
                        shown,
                        deadline=deadline,
                        chunks=body.iter_chunks(CHUNK),
                    )
                finally:
                    body.close()
            except AdapterError:
                raise
            except Exception as exc:
                raise _error(exc, shown, self.bucket) from exc
            if response.get("ETag"):
                etags[name] = str(response["ETag"])
            if response.get("VersionId"):
                versions[name] = str(response["VersionId"])
            if name == WEIGHTS_FILE:
                sha = digest
        return Fetched(sha256=sha, etags=etags, versions=versions)


def _error(exc: Exception, shown: str, bucket: str) -> AdapterError:
    """botocore's exceptions as our errors; messages name the problem, never a secret."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return InvalidSource(f"S3 bucket {bucket!r} does not exist")
        if code in _MISSING or status == 404:
            return InvalidSource(f"no object {shown}")
        if code in ("PreconditionFailed", "NoSuchVersion") or status == 412:
            return SourceChanged(f"{shown} was overwritten or deleted since registration")
        if code in _DENIED or status == 403:
            return InvalidSource(
                f"S3 refused access to {shown} ({code or status}): check the credentials "
                "and the bucket policy"
            )
        return InvalidSource(f"S3 error on {shown}: {code or status}")
    if isinstance(exc, NoCredentialsError):
        return InvalidSource(
            "no S3 credentials found (environment, profile or instance role); "
            "set sources.s3_anonymous for a public bucket"
        )
    # Endpoint unreachable, connection dropped mid-body (BotoCoreError, OSError), read
    # timeouts, or urllib3's own errors while streaming: the download failed, a 4xx.
    kind = "S3 client error" if isinstance(exc, BotoCoreError) else "error"
    return InvalidSource(f"downloading {shown} failed ({kind}: {type(exc).__name__})")


class S3Clients:
    """The S3 client of one registry, made on first use (boto3 clients are thread-safe,
    sessions are not); credentials are read then, the standard way."""

    def __init__(self, config: SourcesConfig) -> None:
        self.config = config
        self._client: Any = None
        self._lock = threading.Lock()

    def get(self, timeout: float) -> Any:
        with self._lock:
            if self._client is None:
                self._client = _new_client(self.config, timeout)
            return self._client


def _new_client(config: SourcesConfig, timeout: float) -> Any:
    try:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config
    except ImportError as exc:
        raise InvalidSource("s3:// sources need boto3: pip install 'loraswap[s3]'") from exc
    options: dict[str, Any] = {
        "connect_timeout": min(10.0, timeout),
        "read_timeout": timeout,
        "retries": {"max_attempts": 2, "mode": "standard"},
    }
    if config.s3_endpoint_url:
        options["s3"] = {"addressing_style": "path"}  # what S3-compatible stores speak
    if config.s3_anonymous:
        options["signature_version"] = UNSIGNED
    try:
        session = boto3.session.Session(profile_name=config.s3_profile)
    except Exception as exc:  # botocore's ProfileNotFound
        raise InvalidSource(f"S3 profile {config.s3_profile!r}: {type(exc).__name__}") from exc
    return session.client(
        "s3",
        endpoint_url=config.s3_endpoint_url,
        region_name=config.s3_region,
        config=Config(**options),
    )
