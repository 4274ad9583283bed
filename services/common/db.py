"""PostgreSQL: an asyncpg pool per service, and the migration runner that applies
a service's numbered SQL files to its own schema."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from services.common.logs import get_logger

log = get_logger(__name__)

_MIGRATION_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def _jsonb_encode(value: Any) -> bytes:
    # jsonb's binary form: a version byte, then the JSON text. orjson, because
    # ingest encodes every event's metadata (a tenth of json.dumps' time).
    try:
        return b"\x01" + orjson.dumps(value)
    except TypeError:  # what orjson does not take, an int beyond 64 bits say
        return b"\x01" + json.dumps(value).encode()


def _jsonb_decode(data: bytes) -> Any:
    return orjson.loads(data[1:])


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    # jsonb in binary, which COPY requires (meter's consumer copies its rows).
    await conn.set_type_codec(
        "jsonb",
        encoder=_jsonb_encode,
        decoder=_jsonb_decode,
        schema="pg_catalog",
        format="binary",
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A released connection's reset without the reset statement (see create_pool)."""


async def create_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    generic_plans: bool = False,
    plain_reads: bool = False,
) -> Any:
    """`generic_plans`: every connection plans each prepared statement once
    (plan_cache_mode = force_generic_plan, a session default, so the pool's
    RESET ALL keeps it). For short reads whose planning costs more than their
    execution; their plans must not depend on the values bound.

    `plain_reads`: the pool's statements are plain SELECTs that leave nothing
    in the session (no SET, LISTEN, session advisory lock or WITH HOLD
    cursor), so a released connection skips asyncpg's reset statement
    (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL): a round trip, about
    7% of meter's CPU for a short usage read (py-spy). A transaction left
    open is still rolled back (asyncpg does that before any reset)."""
    settings = {"plan_cache_mode": "force_generic_plan"} if generic_plans else {}
    pool: Any = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        command_timeout=60,
        server_settings=settings,
        reset=_keep_session if plain_reads else None,
    )
    return pool


def migration_files(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_FILE.match(path.name)
        if not match:
            raise ValueError(f"migration file {path.name} is not named NNNN_description.sql")
        found.append((int(match.group(1)), path))
    versions = [v for v, _ in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration numbers in {directory}")
    return found


async def migrate(pool: asyncpg.Pool, schema: str, directory: Path) -> list[int]:
    """Applies the pending migrations, each in its own transaction, under an
    advisory lock so that replicas (or a Kubernetes Job) never race. Returns the
    versions applied by this call."""
    applied: list[int] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", f"migrate:{schema}")
        try:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations ('
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {
                r["version"]
                for r in await conn.fetch(f'SELECT version FROM "{schema}".schema_migrations')
            }
            for version, path in migration_files(directory):
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute(
                        f'INSERT INTO "{schema}".schema_migrations (version, name) VALUES ($1, $2)',
                        version,
                        path.name,
                    )
                log.info("migration_applied", schema=schema, version=version, file=path.name)
                applied.append(version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", f"migrate:{schema}")
    return applied


async def pending_migrations(pool: asyncpg.Pool, schema: str, directory: Path) -> list[int]:
    """The versions not yet applied (for services that wait for a migration Job)."""
    wanted = [v for v, _ in migration_files(directory)]
    exists = await pool.fetchval("SELECT to_regclass($1)", f"{schema}.schema_migrations")
    if exists is None:
        return wanted
    done = {
        r["version"] for r in await pool.fetch(f'SELECT version FROM "{schema}".schema_migrations')
    }
    return [v for v in wanted if v not in done]
