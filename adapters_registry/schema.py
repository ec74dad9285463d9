"""The registry database's tables, and the upgrades of databases that older versions
created. The experiment tables' statements are experiments.py's; they are applied here,
as schema versions 4 and 6, like every other upgrade."""

from __future__ import annotations

from adapters_registry.database import Database
from adapters_registry.experiments import MIGRATION as EXPERIMENTS_MIGRATION
from adapters_registry.experiments import SHADOW_MIGRATION

SCHEMA_VERSION = 6
# BIGINT and DOUBLE PRECISION, not INTEGER and REAL: the same affinities in SQLite, while
# PostgreSQL's INTEGER is 32-bit (sizes, quotas) and REAL a 32-bit float (timestamps
# to ~2 minutes).
# Databases created before keep their declared types; SQLite stores the same either way.
SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """
    CREATE TABLE IF NOT EXISTS adapters (
        name TEXT PRIMARY KEY,
        current_version BIGINT,
        next_version BIGINT NOT NULL DEFAULT 1,
        pinned INTEGER NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    """
    CREATE TABLE IF NOT EXISTS versions (
        adapter TEXT NOT NULL REFERENCES adapters(name) ON DELETE CASCADE,
        version BIGINT NOT NULL,
        sha256 TEXT NOT NULL,
        size_bytes BIGINT NOT NULL,
        rank INTEGER NOT NULL,
        alpha DOUBLE PRECISION NOT NULL,
        target_modules TEXT NOT NULL,
        base_model TEXT NOT NULL,
        source TEXT NOT NULL,
        path TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (adapter, version)
    )""",
    """
    CREATE TABLE IF NOT EXISTS aliases (
        name TEXT PRIMARY KEY,
        variants TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    )""",
    """
    CREATE TABLE IF NOT EXISTS tenants (
        name TEXT PRIMARY KEY,
        max_concurrent BIGINT,
        tokens_per_minute BIGINT,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    """
    CREATE TABLE IF NOT EXISTS api_keys (
        key_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
        secret_sha256 TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )""",
)

# Schema upgrades, applied in order to databases created by older versions. Each runs once
# (the meta table records the version), inside one transaction with the version bump.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: (
        "ALTER TABLE adapters ADD COLUMN owner TEXT",
        "ALTER TABLE adapters ADD COLUMN shared INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE aliases ADD COLUMN owner TEXT",
        "ALTER TABLE aliases ADD COLUMN shared INTEGER NOT NULL DEFAULT 0",
    ),
    3: (
        # The next version number of every name ever registered: a tombstone that
        # outlives the adapter's row, so a deleted and re-created adapter continues its
        # numbering and `name@N` never names two contents (review H3). Seeded from the
        # adapters that exist; numbers of adapters deleted before this upgrade are lost.
        "CREATE TABLE IF NOT EXISTS version_numbers "
        "(name TEXT PRIMARY KEY, next_version BIGINT NOT NULL)",
        "INSERT INTO version_numbers (name, next_version) "
        "SELECT name, next_version FROM adapters WHERE true",
        # Digest of the adapter config fields that change the math (validate.py):
        # NULL for versions registered before, whose config was not pinned.
        "ALTER TABLE versions ADD COLUMN config_sha256 TEXT",
        # Registered by folder discovery (follows its folder of the adapters directory):
        # 1/0; NULL for adapters registered before, for which the router infers it.
        "ALTER TABLE adapters ADD COLUMN discovered INTEGER",
    ),
    # A/B experiments: the exposure log, feedback, guardrails (adapters_registry/experiments.py).
    4: EXPERIMENTS_MIGRATION,
    # A version's serving defaults (records.ServingDefaults), a JSON object; NULL: none
    # (every version registered before).
    5: ("ALTER TABLE versions ADD COLUMN defaults TEXT",),
    # Shadow traffic: an alias's shadow adapter and its runs (adapters_registry/experiments.py).
    6: SHADOW_MIGRATION,
}


def migrate(db: Database) -> None:
    """Create the tables, then apply the upgrades the database has not had yet."""
    # Schema and migrations in one write transaction: replicas starting together on
    # one PostgreSQL database take turns (DDL is transactional on both databases).
    with db.write() as tx:
        for statement in SCHEMA:
            tx.execute(statement)
        tx.execute("INSERT INTO meta VALUES ('schema_version', '1') ON CONFLICT (key) DO NOTHING")
        (current,) = tx.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        for version in sorted(v for v in MIGRATIONS if v > int(current)):
            for statement in MIGRATIONS[version]:
                tx.execute(statement)
            tx.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
