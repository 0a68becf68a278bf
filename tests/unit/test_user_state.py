"""The event stores behind POST /v1/events: in memory, and Redis (a real redis-server on 127.0.0.1)."""

from __future__ import annotations

import asyncio

import pytest
import redis

from rec_serve.user_state import KEY_PREFIX, MemoryEventStore, RedisEventStore, open_store


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_events_are_appended_in_order_and_capped(kind: str, redis_url: str) -> None:
    async def scenario() -> None:
        store = MemoryEventStore(cap=4) if kind == "memory" else RedisEventStore(redis_url, cap=4)
        user = f"user-{kind}"
        assert await store.recent(user) == []
        await store.append([(user, "a"), ("other", "x"), (user, "b")])
        assert await store.recent(user) == ["a", "b"] and await store.recent("other") == ["x"]
        await store.append([(user, item) for item in "cdef"])
        assert await store.recent(user) == ["c", "d", "e", "f"]  # the newest 4
        await store.close()

    asyncio.run(scenario())
    if kind == "redis":
        assert redis.from_url(redis_url).llen(KEY_PREFIX + "user-redis") == 4  # trimmed in the store itself


def test_open_store() -> None:
    assert open_store("none", 10) is None
    assert isinstance(open_store("memory", 10), MemoryEventStore)
    with pytest.raises(ValueError, match="not 'memory', 'none' or a redis:// URL"):
        open_store("postgres://x", 10)
