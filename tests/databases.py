"""The registry databases of the tests: a throwaway PostgreSQL server, and helpers.

initdb into a fresh temp folder, start it on a unix socket only (no TCP port to collide
with anything), hand out one new database per test, stop it and delete the folder at
the end. PostgreSQL refuses to run as root, so as root the server runs as the `postgres`
user (Debian's package creates it), or as a system user created for it.

`LORASWAP_TEST_POSTGRES_URL=postgresql://user@host/db` uses a server you already run
instead (the user needs CREATEDB). `LORASWAP_PG_BINDIR` points at the server's binaries
when they are neither on PATH nor in Debian's /usr/lib/postgresql/<version>/bin.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from server.settings import RegistrySettings

_USER_FALLBACK = "loraswap-pg"


class PostgresUnavailable(Exception):
    """Why no PostgreSQL server could be had (the message says what to install)."""


def find_bindir() -> Path:
    if env := os.environ.get("LORASWAP_PG_BINDIR"):
        return Path(env)
    if found := shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    # Debian installs the server outside PATH, one folder per major version.
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install them "
        "(Debian: apt-get install postgresql; scripts/setup.sh does it when CI=true or "
        "LORASWAP_INSTALL_POSTGRES=1), or set LORASWAP_PG_BINDIR or LORASWAP_TEST_POSTGRES_URL"
    )


def _server_user() -> str | None:
    """The user to run the server as: None = ourselves (not root), else a system user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", _USER_FALLBACK):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _USER_FALLBACK],
        check=True,
        capture_output=True,
    )
    return _USER_FALLBACK


class PostgresServer:
    """A running server and an admin connection URL; `new_database()` per test."""

    def __init__(
        self,
        admin_url: str,
        folder: Path | None = None,
        stop: list[str] | None = None,
        start: list[str] | None = None,
    ):
        self.admin_url = admin_url
        self._folder = folder
        self._stop = stop
        self._start = start
        self._names = itertools.count()

    @classmethod
    def start(cls, *, durable: bool = False) -> PostgresServer:
        """`durable`: fsync and synchronous commits on, as in production (benchmarks);
        off by default, for the tests' speed."""
        if url := os.environ.get("LORASWAP_TEST_POSTGRES_URL"):
            return cls(url)
        bindir = find_bindir()
        user = _server_user()
        as_user = [] if user is None else ["runuser", "-u", user, "--"]
        # Not under pytest's basetemp: its folders are 0700 root, which the server's
        # user cannot enter. Short, too: a unix socket path must fit in ~100 bytes.
        folder = Path(tempfile.mkdtemp(prefix="loraswap-pg-"))
        data = folder / "data"
        if user is not None:
            info = pwd.getpwnam(user)
            os.chown(folder, info.pw_uid, info.pw_gid)
        try:
            _run(
                [
                    *as_user,
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            )
            # fsync off: these servers die with the test run, and the tests check the
            # registry's logic, not PostgreSQL's durability; it saves seconds of I/O.
            fast = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            options = (
                f"-c listen_addresses='' -c unix_socket_directories='{folder}' "
                + ("" if durable else fast)
                + "-c max_connections=100 -c shared_buffers=16MB"
            )
            start = [
                *as_user,
                str(bindir / "pg_ctl"),
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                str(data),
                "-l",
                str(folder / "server.log"),
                "-o",
                options,
            ]
            _run(start, log=folder / "server.log")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        # immediate: the data is thrown away, so skip the shutdown checkpoint (seconds).
        stop = [*as_user, str(bindir / "pg_ctl"), "stop", "-m", "immediate", "-D", str(data)]
        admin = f"postgresql://postgres@/postgres?host={quote(str(folder), safe='')}"
        return cls(admin, folder, stop, start)

    def new_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"loraswap_test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        parts = urlsplit(self.admin_url)
        return urlunsplit(parts._replace(path="/" + name))

    @property
    def restartable(self) -> bool:
        """Whether halt()/resume() work: only on a server these tests started."""
        return self._start is not None and self._stop is not None

    def halt(self) -> None:
        """Stop the server, keeping its data (fault injection: the database goes away)."""
        assert self._stop is not None, "not a server these tests started"
        _run(self._stop)

    def resume(self) -> None:
        """Start again on the same data, after halt()."""
        assert self._start is not None and self._folder is not None
        _run(self._start, log=self._folder / "server.log")

    def stop(self) -> None:
        if self._stop is not None:
            subprocess.run(self._stop, capture_output=True, check=False, timeout=60)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def _run(cmd: list[str], log: Path | None = None) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        detail = done.stdout + done.stderr
        if log is not None and log.exists():
            detail += log.read_text(errors="replace")
        detail = re.sub(r"\s+", " ", detail)[-2000:]
        raise PostgresUnavailable(f"{' '.join(cmd)} failed ({done.returncode}): {detail}")


def registry_settings(database: str | Path, **registry: Any) -> dict[str, Any]:
    """Settings(**...) fields that put the registry in `database` (+ `registry` fields)."""
    if isinstance(database, Path):
        return {"registry_db": database, "registry": RegistrySettings(**registry)}
    return {"registry": RegistrySettings(database_url=database, **registry)}


def database_contents(database: str | Path) -> bytes:
    """Everything stored in `database`, as bytes to search (e.g. for a leaked secret)."""
    if isinstance(database, Path):
        return b"".join(p.read_bytes() for p in database.parent.glob(database.name + "*"))
    import psycopg

    out = []
    with psycopg.connect(database) as conn:
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
        for (table,) in tables:
            rows = conn.execute(f'SELECT * FROM "{table}"').fetchall()
            out.append(repr(rows).encode())
    return b"".join(out)
