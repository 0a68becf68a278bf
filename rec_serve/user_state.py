"""Per-user state of a served model: the history that `POST /v1/events` appends to and `POST /v1/recommend`
reads (`EventStore`), and the encoder states of recent users (`StateCache`).

Events are kept as item ids (not model indices), newest last and capped per user, so they outlive a model
version: a rollout to a model that knows more items reads the same events. Two stores behind one interface:

- `memory`: a dict in the replica (the `make demo` default): one replica's, lost when it restarts.
- `redis://HOST:PORT/DB` (Redis or Valkey, e.g. ElastiCache or Memorystore in production): one list per user
  (`rayrec:events:USER`), appended and trimmed in one transaction, so every replica reads every event and
  the events survive replica restarts and rollouts.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

KEY_PREFIX = "rayrec:events:"


class EventStore(Protocol):
    kind: str

    async def append(self, events: Sequence[tuple[str, str]]) -> None:
        """(user_id, item_id) pairs, in time order; all or none are stored."""

    async def recent(self, user_id: str) -> list[str]:
        """The user's newest item ids (at most the cap), oldest first."""

    async def close(self) -> None: ...


def _by_user(events: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = defaultdict(list)
    for user, item in events:
        grouped[user].append(item)
    return grouped


class MemoryEventStore:
    kind = "memory"

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.histories: dict[str, deque[str]] = {}

    async def append(self, events: Sequence[tuple[str, str]]) -> None:
        for user, items in _by_user(events).items():
            self.histories.setdefault(user, deque(maxlen=self.cap)).extend(items)

    async def recent(self, user_id: str) -> list[str]:
        return list(self.histories.get(user_id, ()))

    async def close(self) -> None:
        self.histories.clear()


class RedisEventStore:
    kind = "redis"

    def __init__(self, url: str, cap: int) -> None:
        import redis.asyncio as redis

        self.cap = cap
        self.client = redis.from_url(url, decode_responses=True)

    async def append(self, events: Sequence[tuple[str, str]]) -> None:
        async with self.client.pipeline(transaction=True) as pipe:  # MULTI ... EXEC: all or nothing
            for user, items in _by_user(events).items():
                pipe.rpush(KEY_PREFIX + user, *items)
                pipe.ltrim(KEY_PREFIX + user, -self.cap, -1)
            await pipe.execute()

    async def recent(self, user_id: str) -> list[str]:
        return await self.client.lrange(KEY_PREFIX + user_id, -self.cap, -1)

    async def close(self) -> None:
        await self.client.aclose()


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def check_store(spec: str) -> str:
    """`spec` when it names a store: "memory", "none" or a Redis URL (redis://, rediss:// for TLS, unix://)."""
    if spec not in ("memory", "none") and not spec.startswith(REDIS_SCHEMES):
        raise ValueError(f"{spec!r} is not 'memory', 'none' or a redis:// URL")
    return spec


def open_store(spec: str, cap: int) -> EventStore | None:
    """The store `spec` names (`check_store`); None for "none" (no events endpoint)."""
    if check_store(spec) == "none":
        return None
    return MemoryEventStore(cap) if spec == "memory" else RedisEventStore(spec, cap)


@dataclass
class _Entry:
    history: list[int]  # item indices the state has encoded
    state: Any  # rec_train.model.encoders.EncoderState
    vector: torch.Tensor  # [d]
    nbytes: int


class StateCache:
    """The encoder states (keys and values of every block) of recent users, by user id: a request whose
    history continues the cached one encodes only its new items (`RecModel.extend_user`); the same history
    reuses the user vector. Least recently used users are dropped beyond `max_bytes`. One cache belongs to
    one model version (a replica's `Predictor`), so a rollout starts empty."""

    def __init__(self, model: Any, max_bytes: int) -> None:
        self.model, self.max_bytes = model, max_bytes
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.nbytes = 0
        self.counts = {"hits": 0, "extended": 0, "encoded": 0, "evicted": 0}

    def vector(self, user: str, history: list[int]) -> torch.Tensor:
        """The user vector [d] of `history` (item indices, oldest first; at most the model's max_seq_len)."""
        entry = self.entries.pop(user, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
        known = len(entry.history) if entry is not None else 0
        if entry is not None and history == entry.history:
            self.counts["hits"] += 1
            vector, state = entry.vector, entry.state
        elif entry is not None and known < len(history) and history[:known] == entry.history:
            self.counts["extended"] += 1  # the cached state grows in place: it is this user's only copy
            vector, state = self.model.extend_user(torch.tensor(history[known:]), entry.state)
        else:
            self.counts["encoded"] += 1
            vector, state = self.model.extend_user(torch.tensor(history), None)
        size = state.nbytes()
        if size <= self.max_bytes:
            self.entries[user] = _Entry(list(history), state, vector, size)
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, dropped = self.entries.popitem(last=False)
                self.nbytes -= dropped.nbytes
                self.counts["evicted"] += 1
        return vector

    def describe(self) -> dict[str, int]:
        return {"users": len(self.entries), "bytes": self.nbytes, "max_bytes": self.max_bytes, **self.counts}
