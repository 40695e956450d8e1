"""The adapter registry: one vLLM LoRA adapter per distinct routing, shared and reference-counted.

Every merged adapter gets a unique `lora_int_id`. Requests whose routing is equal after
rounding (`Routing.key`) share one adapter. When no request uses an adapter it stays
registered as long as the idle cache has room (a popular routing is then free the next time);
beyond that it is removed from vLLM and its files deleted. After any sequence of requests,
finished, failed or cancelled, what stays registered is at most the idle bound.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ttmm_vllm.serve.errors import AdapterBuildError

log = logging.getLogger(__name__)

Key = tuple


@dataclass
class Adapter:
    key: Key
    lora_id: int
    handle: Any = None  # what the materialiser returned (e.g. a LoRARequest)
    refs: int = 0
    ready: asyncio.Future = field(default=None)  # type: ignore[assignment]
    info: dict = field(default_factory=dict)  # rank, compression error, timings


class AdapterRegistry:
    """Maps routing keys to registered adapters.

    materialise(key, lora_id) -> (handle, info): build and register the adapter (merge, write,
    add to vLLM). retire(adapter): remove it from vLLM and delete its files. Both are
    coroutines; a failed materialise leaves nothing registered.
    """

    def __init__(
        self,
        materialise: Callable[[Key, int], Awaitable[tuple[Any, dict]]],
        retire: Callable[[Adapter], Awaitable[None]],
        idle_capacity: int = 32,
    ):
        self._materialise = materialise
        self._retire = retire
        self.idle_capacity = idle_capacity
        self._by_key: dict[Key, Adapter] = {}
        self._idle: OrderedDict[Key, Adapter] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.created = 0
        self.reused = 0
        self.retired = 0

    @property
    def registered(self) -> int:
        return len(self._by_key)

    @property
    def in_use(self) -> int:
        return sum(1 for a in self._by_key.values() if a.refs > 0)

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def acquire(self, key: Key) -> Adapter:
        """The adapter for `key`, built once however many requests ask at the same time.

        The build runs as its own task: a request cancelled while waiting drops only its
        reference, and an adapter finished after all its requesters left goes to the idle
        cache instead of leaking.
        """
        async with self._lock:
            a = self._by_key.get(key)
            if a is None:
                a = Adapter(key, next(self._ids),
                            ready=asyncio.get_running_loop().create_future())
                self._by_key[key] = a
                a.info["task"] = asyncio.create_task(self._build(a))
            else:
                self._idle.pop(key, None)
                self.reused += 1
            a.refs += 1
        try:
            await asyncio.shield(a.ready)
        except BaseException:
            await self.release(a)
            raise
        return a

    async def _build(self, a: Adapter) -> None:
        try:
            a.handle, info = await self._materialise(a.key, a.lora_id)
        except BaseException as e:  # noqa: BLE001 - every waiter gets the error
            async with self._lock:
                self._by_key.pop(a.key, None)
            a.ready.set_exception(AdapterBuildError(f"building the merged adapter failed: {e}"))
            a.ready.exception()  # retrieved here; waiters re-raise it themselves
            return
        a.info.update(info)
        a.info.pop("task", None)
        self.created += 1
        a.ready.set_result(True)
        async with self._lock:
            orphan = a.refs == 0
        if orphan:
            await self._settle(a)

    async def release(self, a: Adapter) -> None:
        """Drop one reference; an unused adapter waits in the idle cache or is retired."""
        async with self._lock:
            a.refs -= 1
            if a.refs > 0 or not a.ready.done():
                return
        await self._settle(a)

    async def _settle(self, a: Adapter) -> None:
        """An adapter nobody uses any more: retired if it was detached (it merges a removed
        expert), else parked in the idle cache. A failed build holds nothing to retire."""
        if a.info.get("detached"):
            await self._retire_one(a)
        elif self._by_key.get(a.key) is a:
            await self._park(a)

    async def _park(self, a: Adapter) -> None:
        victims = []
        async with self._lock:
            if a.refs > 0 or self._by_key.get(a.key) is not a:
                return
            self._idle[a.key] = a
            while len(self._idle) > self.idle_capacity:
                _, old = self._idle.popitem(last=False)
                self._by_key.pop(old.key, None)
                victims.append(old)
        for old in victims:
            await self._retire_one(old)

    async def _retire_one(self, a: Adapter) -> None:
        self.retired += 1
        try:
            await self._retire(a)
        except Exception:  # noqa: BLE001 - a failed clean-up must not fail a request
            log.exception("retiring adapter %d failed", a.lora_id)

    async def retire_matching(self, predicate: Callable[[Key], bool]) -> int:
        """Retire adapters whose key matches (they merge a removed expert): idle ones now,
        ones in use (or still building) when their last request ends, so none stays
        registered, holding what the removal freed, until the idle cache happens to evict it.
        Returns how many were retired now."""
        async with self._lock:
            matching = [a for k, a in self._by_key.items() if predicate(k)]
            victims = [a for a in matching if a.key in self._idle]
            for a in matching:
                self._by_key.pop(a.key, None)
                self._idle.pop(a.key, None)
                a.info["detached"] = True
        for a in victims:
            await self._retire_one(a)
        return len(victims)

    async def clear(self) -> None:
        """Retire every idle adapter (shutdown, or a library change)."""
        async with self._lock:
            victims = list(self._idle.values())
            for a in victims:
                self._by_key.pop(a.key, None)
            self._idle.clear()
        for a in victims:
            await self._retire_one(a)

    def get(self, key: Key) -> Adapter | None:
        """The adapter registered for a key, if any (no reference taken)."""
        return self._by_key.get(key)

    def stats(self) -> dict[str, int]:
        return {"registered": self.registered, "in_use": self.in_use, "idle": self.idle,
                "created": self.created, "reused": self.reused, "retired": self.retired}
