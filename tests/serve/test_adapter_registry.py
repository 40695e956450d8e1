"""The adapter registry is plain asyncio: real coroutines stand in for "merge and register in
vLLM" (materialise) and "remove from vLLM" (retire), and record what they were asked to do."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttmm_vllm.serve.adapter_registry import Adapter, AdapterRegistry
from ttmm_vllm.serve.errors import AdapterBuildError


class Backend:
    """What the engine would do, as coroutines that yield to the loop like real I/O."""

    def __init__(self, fail_keys=(), gate: asyncio.Event | None = None):
        self.built: list[tuple[tuple, int]] = []  # (key, lora_id), in call order
        self.retired: list[int] = []  # lora ids
        self.fail_keys = set(fail_keys)
        self.gate = gate

    async def materialise(self, key: tuple, lora_id: int):
        self.built.append((key, lora_id))
        await asyncio.sleep(0)
        if self.gate is not None:
            await self.gate.wait()
        if key in self.fail_keys:
            raise OSError(f"no space left for {key}")
        return f"lora-{lora_id}", {"rank": 4 * len(key)}

    async def retire(self, a: Adapter) -> None:
        assert a.refs == 0, "retired an adapter in use"
        await asyncio.sleep(0)
        self.retired.append(a.lora_id)

    def registry(self, idle_capacity: int = 32) -> AdapterRegistry:
        return AdapterRegistry(self.materialise, self.retire, idle_capacity=idle_capacity)


def run(coro):
    return asyncio.run(coro)


async def waiting_acquires(reg: AdapterRegistry, key: tuple, n: int) -> list[asyncio.Task]:
    """n concurrent requests for one key, left waiting on its (gated) build."""
    tasks = [asyncio.create_task(reg.acquire(key)) for _ in range(n)]
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in tasks)
    return tasks


def test_requests_with_one_key_share_one_adapter():
    async def main():
        b = Backend()
        reg = b.registry()
        a1 = await reg.acquire((0, 1))
        a2 = await reg.acquire((0, 1))
        c = await reg.acquire((2,))
        assert a1 is a2 and a1.refs == 2 and a1.handle == "lora-1"
        assert a1.info == {"rank": 8}
        assert c.lora_id == 2 and c.handle == "lora-2" and c.refs == 1
        assert b.built == [((0, 1), 1), ((2,), 2)]
        assert reg.get((0, 1)) is a1 and reg.get((3,)) is None
        assert reg.stats() == {"registered": 2, "in_use": 2, "idle": 0, "created": 2,
                               "reused": 1, "retired": 0}

    run(main())


def test_reference_counts_and_the_idle_cache():
    async def main():
        b = Backend()
        reg = b.registry(idle_capacity=1)
        a = await reg.acquire((1,))
        await reg.acquire((1,))
        await reg.release(a)
        assert (a.refs, reg.in_use, reg.idle) == (1, 1, 0)
        await reg.release(a)
        assert (a.refs, reg.in_use, reg.idle, reg.registered) == (0, 0, 1, 1)
        again = await reg.acquire((1,))  # an idle adapter is free the next time
        assert again is a and len(b.built) == 1 and reg.idle == 0
        await reg.release(again)
        other = await reg.acquire((2,))
        await reg.release(other)  # the idle cache holds one: the older one goes
        assert b.retired == [a.lora_id] and reg.get((1,)) is None and reg.get((2,)) is other
        fresh = await reg.acquire((1,))  # a retired key is built again, with a new id
        assert fresh is not a and fresh.lora_id == 3 and len(b.built) == 3

    run(main())


def test_ids_are_never_reused():
    async def main():
        b = Backend()
        reg = b.registry(idle_capacity=0)
        ids = []
        for _ in range(5):
            a = await reg.acquire((7,))
            ids.append(a.lora_id)
            await reg.release(a)
        assert ids == [1, 2, 3, 4, 5] and b.retired == ids and reg.registered == 0

    run(main())


# acquire(key) or release(one of the held adapters, by position)
ops = st.lists(st.one_of(st.tuples(st.just("acquire"), st.integers(0, 5)),
                         st.tuples(st.just("release"), st.integers(0, 1000))), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(0, 3))
def test_any_sequence_of_acquires_and_releases_keeps_the_bounds(sequence, capacity):
    async def main():
        b = Backend()
        reg = b.registry(idle_capacity=capacity)
        held: list[Adapter] = []
        for op, arg in sequence:
            if op == "acquire":
                held.append(await reg.acquire((arg,)))
            elif held:
                await reg.release(held.pop(arg % len(held)))
            refs = Counter(id(a) for a in held)
            live = {id(a): a for a in held}
            assert all(a.refs == refs[i] for i, a in live.items())
            assert reg.in_use == len(live)
            assert reg.idle <= capacity
            assert reg.registered == len(live) + reg.idle
            assert all(reg.get(a.key) is a for a in held)  # never retired while in use
            assert not {a.lora_id for a in held} & set(b.retired)
            # every adapter built is registered or retired, never both, never twice
            assert len(b.built) == reg.registered + len(b.retired)
            assert len(set(b.retired)) == len(b.retired)
        for a in held:
            await reg.release(a)
        assert reg.in_use == 0 and reg.registered == reg.idle <= capacity
        await reg.clear()
        assert reg.registered == 0 and sorted(b.retired) == [i for _, i in b.built]

    run(main())


def test_a_failed_build_leaves_nothing_registered():
    async def main():
        b = Backend(fail_keys={(3,)})
        reg = b.registry()
        with pytest.raises(AdapterBuildError, match=r"building the merged adapter failed: "
                                                    r"no space left for \(3,\)"):
            await reg.acquire((3,))
        assert reg.get((3,)) is None
        assert reg.stats() == {"registered": 0, "in_use": 0, "idle": 0, "created": 0,
                               "reused": 0, "retired": 0}
        b.fail_keys.clear()  # the next request tries again
        a = await reg.acquire((3,))
        assert a.handle == "lora-2" and reg.registered == 1 and len(b.built) == 2

    run(main())


def test_concurrent_requests_for_a_failing_key_all_get_the_error():
    async def main():
        b = Backend(fail_keys={(1,)}, gate=asyncio.Event())
        reg = b.registry()
        tasks = await waiting_acquires(reg, (1,), 6)
        b.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, AdapterBuildError) for r in results)
        assert len(b.built) == 1 and reg.registered == 0 and reg.in_use == 0

    run(main())


def test_concurrent_acquires_of_one_key_build_once():
    async def main():
        b = Backend(gate=asyncio.Event())
        reg = b.registry()
        tasks = await waiting_acquires(reg, ((0, 0.25), (1, 0.75)), 10)
        assert len(b.built) == 1  # all wait on one build
        b.gate.set()
        adapters = await asyncio.gather(*tasks)
        assert len({id(a) for a in adapters}) == 1 and adapters[0].refs == 10
        assert len(b.built) == 1 and reg.stats()["created"] == 1
        assert reg.stats()["reused"] == 9

    run(main())


def test_a_request_cancelled_during_the_build_leaves_an_idle_adapter():
    async def main():
        b = Backend(gate=asyncio.Event())
        reg = b.registry()
        (task,) = await waiting_acquires(reg, (5,), 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        b.gate.set()  # the build finishes after its only requester left
        for _ in range(10):
            await asyncio.sleep(0)
        assert (reg.registered, reg.in_use, reg.idle) == (1, 0, 1)
        assert reg.get((5,)).refs == 0 and b.retired == []

    run(main())


def test_retire_matching_retires_idle_now_and_busy_ones_when_released():
    async def main():
        b = Backend()
        reg = b.registry()
        keys = [((0, 0.5), (1, 0.5)), ((1, 1.0),), ((2, 0.5), (3, 0.5))]
        adapters = [await reg.acquire(k) for k in keys]
        busy = await reg.acquire(((1, 0.2), (2, 0.8)))  # merges expert 1, but in use
        for a in adapters:
            await reg.release(a)

        def merges_expert_1(key):
            return any(i == 1 for i, _ in key)

        assert await reg.retire_matching(merges_expert_1) == 2
        assert sorted(b.retired) == [adapters[0].lora_id, adapters[1].lora_id]
        assert reg.get(keys[0]) is None and reg.get(keys[1]) is None
        assert reg.get(keys[2]) is adapters[2]
        assert reg.get(busy.key) is None  # detached: no new request gets it
        assert busy.lora_id not in b.retired  # its request still runs on it
        assert await reg.retire_matching(merges_expert_1) == 0
        await reg.release(busy)  # its last request ended: retired, not parked
        assert b.retired[-1] == busy.lora_id
        assert (reg.registered, reg.in_use, reg.idle) == (1, 0, 1)

    run(main())


def test_an_adapter_detached_while_building_is_retired_when_built():
    async def main():
        b = Backend(gate=asyncio.Event())
        reg = b.registry()
        (task,) = await waiting_acquires(reg, ((1, 1.0),), 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await reg.retire_matching(lambda key: True) == 0
        b.gate.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(b.retired) == 1 and (reg.registered, reg.idle) == (0, 0)

    run(main())


def test_clear_retires_every_idle_adapter_and_keeps_those_in_use():
    async def main():
        b = Backend()
        reg = b.registry()
        idle = [await reg.acquire((k,)) for k in range(3)]
        busy = await reg.acquire((9,))
        for a in idle:
            await reg.release(a)
        await reg.clear()
        assert sorted(b.retired) == [a.lora_id for a in idle]
        assert (reg.registered, reg.in_use, reg.idle) == (1, 1, 0) and reg.get((9,)) is busy
        await reg.release(busy)
        assert reg.idle == 1 and b.retired == sorted(b.retired)

    run(main())


def test_a_failing_retire_does_not_fail_the_request():
    async def main():
        b = Backend()

        async def broken_retire(a):
            b.retired.append(a.lora_id)
            raise OSError("vLLM refused to remove it")

        reg = AdapterRegistry(b.materialise, broken_retire, idle_capacity=0)
        a = await reg.acquire((1,))
        await reg.release(a)  # retired at once (no idle room); the error is only logged
        assert b.retired == [a.lora_id] and reg.registered == 0
        assert reg.stats()["retired"] == 1

    run(main())
