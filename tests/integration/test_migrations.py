"""The migration runner against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import pytest

from services.common import db


async def test_applies_once_records_versions_and_survives_races(
    stack_urls: tuple[str, str], tmp_path: Path
) -> None:
    schema = f"m_{uuid.uuid4().hex[:8]}"
    (tmp_path / "0001_first.sql").write_text(f"CREATE TABLE {schema}.things (id int);")
    (tmp_path / "0002_second.sql").write_text(f"ALTER TABLE {schema}.things ADD COLUMN n int;")
    pool = await db.create_pool(stack_urls[0], min_size=1, max_size=4)
    try:
        # Two replicas starting at once: the advisory lock serializes them.
        first, second = await asyncio.gather(
            db.migrate(pool, schema, tmp_path), db.migrate(pool, schema, tmp_path)
        )
        assert sorted(first + second) == [1, 2]
        rows = await pool.fetch(f"SELECT version, name FROM {schema}.schema_migrations ORDER BY 1")
        assert [(r["version"], r["name"]) for r in rows] == [
            (1, "0001_first.sql"),
            (2, "0002_second.sql"),
        ]
        assert await db.pending_migrations(pool, schema, tmp_path) == []
        (tmp_path / "0003_third.sql").write_text(f"ALTER TABLE {schema}.things ADD COLUMN m int;")
        assert await db.pending_migrations(pool, schema, tmp_path) == [3]
        assert await db.migrate(pool, schema, tmp_path) == [3]
    finally:
        await pool.close()


async def test_a_failing_migration_leaves_nothing_half_applied(
    stack_urls: tuple[str, str], tmp_path: Path
) -> None:
    schema = f"m_{uuid.uuid4().hex[:8]}"
    (tmp_path / "0001_bad.sql").write_text(
        f"CREATE TABLE {schema}.a (id int); CREATE TABLE {schema}.a (id int);"
    )
    pool = await db.create_pool(stack_urls[0], min_size=1, max_size=2)
    try:
        with pytest.raises(asyncpg.DuplicateTableError):
            await db.migrate(pool, schema, tmp_path)
        assert await pool.fetchval("SELECT to_regclass($1)", f"{schema}.a") is None
        assert await db.pending_migrations(pool, schema, tmp_path) == [1]
    finally:
        await pool.close()
