"""The two databases the registry can live in, and everything that differs between them.

SQLite (stdlib sqlite3) is the embedded default: one file, no server, no extra package.
PostgreSQL (psycopg 3, the `postgres` extra) is for several replicas, on one host or many,
sharing one registry. The Store writes its SQL once, in the subset both speak: `?`
placeholders, `ON CONFLICT` upserts, BIGINT / DOUBLE PRECISION columns, no ORDER BY on
text (collations differ; the Store sorts in Python). This module isolates the rest:
connecting, transactions, the write lock, and mapping driver errors to registry errors.

Writes are serialized, on both, by one lock per database: SQLite's `BEGIN IMMEDIATE`, and
on PostgreSQL a transaction-scoped advisory lock taken first in every write transaction.
Registry writes are rare admin operations, so one writer at a time costs nothing, and it
keeps every read-check-write of the Store (next version number, "no alias routes here"
before a delete, "not already an alias" before a create) exactly as correct across
replicas as it is inside one process, with no retry loop. Readers never wait for it.
"""

from __future__ import annotations

import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

from adapters_registry.errors import AdapterError, AlreadyExists, Conflict, RegistryUnavailable

if TYPE_CHECKING:
    import psycopg

# Key of the PostgreSQL advisory lock that serializes registry writes ("lora" in ASCII).
# Advisory locks are per database, so registries in different databases never contend.
_PG_WRITE_LOCK = 0x6C6F7261


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(ABC):
    """One open transaction; `execute` takes `?` placeholders on every backend."""

    @abstractmethod
    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor: ...


class Database(ABC):
    """A registry database: transactions for the Store, and a name safe to log."""

    #: "sqlite" or "postgresql"
    dialect: str
    #: where it is, without any password
    display: str

    @abstractmethod
    def write(self) -> AbstractContextManager[Connection]:
        """A write transaction, alone among writers, committed durably on exit."""

    @abstractmethod
    def read(self) -> AbstractContextManager[Connection]:
        """A read-only transaction: its statements see one consistent state."""

    @abstractmethod
    def close(self) -> None: ...


def open_database(target: str | Path) -> Database:
    """A Path or plain path is an SQLite file; a URL picks its backend by scheme.

    `sqlite:///var/lib/x.db` (absolute) or `sqlite:relative.db`; `postgresql://user@host/db`
    or `postgres://...`, any libpq connection URL (query options such as `sslmode` pass on).
    """
    if isinstance(target, Path):
        return SqliteDatabase(target)
    scheme = urlsplit(target).scheme.lower()
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        return PostgresDatabase(target.replace("postgresql+psycopg:", "postgresql:", 1))
    if scheme == "sqlite":
        path = unquote(target.split(":", 1)[1])
        # sqlite:///abs/path -> /abs/path; sqlite:rel/path -> rel/path
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"database URL {target!r} names no file")
        return SqliteDatabase(Path(path))
    if "://" in target or (scheme and len(scheme) > 1):
        raise ValueError(
            f"database URL {redact(target)!r}: unsupported scheme {scheme!r} "
            "(use sqlite:///path or postgresql://...)"
        )
    return SqliteDatabase(Path(target))


def redact(url: str) -> str:
    """`url` without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# -- SQLite ------------------------------------------------------------------------------


class _SqliteConnection(Connection):
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor:
        return self._db.execute(sql, tuple(params))


class SqliteDatabase(Database):
    """WAL mode, synchronous=FULL: a write acknowledged survives a kill -9 or power loss.

    One connection per process, behind a thread lock (the server's threads share it);
    `BEGIN IMMEDIATE` also excludes writers in other processes using the same file.
    """

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.display = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._conn = _SqliteConnection(self._db)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except sqlite3.IntegrityError as exc:
                self._db.execute("ROLLBACK")
                raise _integrity_error(str(exc), unique="UNIQUE" in str(exc)) from exc
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[Connection]:
        # Within this process the lock already makes a read consistent; a deferred
        # transaction extends that to writers in other processes on the same file.
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


# -- PostgreSQL --------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    # Our statements hold no string literal with '?' or '%', so this is a plain rewrite.
    assert "%" not in sql, sql
    return sql.replace("?", "%s")


class _PgConnection(Connection):
    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor:
        return self._conn.execute(_pg_sql(sql), tuple(params))


class PostgresDatabase(Database):
    """One connection per process behind a thread lock, reopened if the server drops it.

    Durability is the server's: with its default `synchronous_commit=on` a committed
    write is on disk (and on synchronous standbys, if any) before COMMIT returns.
    """

    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError as exc:  # the optional extra is not installed
            raise RuntimeError(
                "a postgresql:// registry needs psycopg: pip install 'loraswap[postgres]'"
            ) from exc
        self._psycopg = psycopg
        self._url = url
        self.display = redact(url)
        self._lock = threading.Lock()
        self._conn = self._connect()

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        try:
            # autocommit: transactions are only the explicit ones below, never an
            # implicit one left open (and holding a snapshot) between calls.
            return self._psycopg.connect(self._url, autocommit=True, connect_timeout=10)
        except self._psycopg.OperationalError as exc:
            # A typed, transient error: a write during a database restart is a 503 the
            # client may retry, not a 500 (and at startup it still says what failed).
            raise RegistryUnavailable(
                f"cannot connect to registry database {self.display}: {exc}"
            ) from exc

    def _begin(self, statement: str) -> psycopg.Connection[tuple[Any, ...]]:
        """Open a transaction, on a new connection if the server dropped the old one.

        An idle connection dies with a server restart, a failover or an idle timeout;
        the first statement of a call is where that shows, and since nothing has been
        done yet it is safe to reconnect and start again, once.
        """
        if self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        try:
            self._conn.execute(statement)
        except self._psycopg.OperationalError:
            if not self._conn.broken:
                raise
            self._conn = self._connect()
            self._conn.execute(statement)
        return self._conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        errors = self._psycopg.errors
        with self._lock:
            conn = self._begin("BEGIN")
            try:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_WRITE_LOCK,))
                yield _PgConnection(conn)
            except errors.IntegrityError as exc:
                conn.execute("ROLLBACK")
                unique = isinstance(exc, errors.UniqueViolation)
                raise _integrity_error(str(exc).splitlines()[0], unique=unique) from exc
            except self._psycopg.OperationalError as exc:
                if not conn.broken:
                    conn.execute("ROLLBACK")
                    raise
                raise self._lost(exc) from exc
            except BaseException:
                if not conn.broken:
                    conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except self._psycopg.OperationalError as exc:
                if not conn.broken:
                    raise
                # Whether the COMMIT reached the server is unknown; the caller is told
                # so, and a retry of a registration finds either nothing or the name.
                raise self._lost(exc) from exc

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self._lock:
            conn = self._begin("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            try:
                yield _PgConnection(conn)
            except self._psycopg.OperationalError as exc:
                if not conn.broken:
                    raise
                raise self._lost(exc) from exc
            finally:
                if not conn.broken:
                    conn.execute("COMMIT")

    def _lost(self, exc: Exception) -> RegistryUnavailable:
        """The connection died mid-transaction (server stopped or restarting)."""
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return RegistryUnavailable(f"lost the registry database {self.display}: {first}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _integrity_error(detail: str, *, unique: bool) -> AdapterError:
    """A constraint the Store's own checks did not catch first, as a registry error.

    With writes serialized these are rare (a random key id drawn twice, say), but both
    backends must raise the same class for them, and never a driver exception.
    """
    if unique:
        return AlreadyExists(f"already exists ({detail})")
    return Conflict(f"conflicts with the registry's state ({detail})")
