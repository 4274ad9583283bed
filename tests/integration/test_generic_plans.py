"""db.create_pool(generic_plans=True): the setting is each connection's session
default, so it survives the pool's RESET ALL between acquisitions."""

from __future__ import annotations

from services.common import db


async def test_generic_plans_survive_the_pools_reset(stack_urls: tuple[str, str]) -> None:
    generic = await db.create_pool(stack_urls[0], min_size=1, max_size=1, generic_plans=True)
    plain = await db.create_pool(stack_urls[0], min_size=1, max_size=1)
    try:
        for _ in range(2):  # the second acquisition follows a reset
            async with generic.acquire() as conn:
                assert await conn.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
                await conn.execute("SET plan_cache_mode = auto")  # reset on release
        assert await plain.fetchval("SHOW plan_cache_mode") == "auto"
    finally:
        await generic.close()
        await plain.close()
