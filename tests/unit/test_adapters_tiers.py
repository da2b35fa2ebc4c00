"""Adapter tiers without a model: pool slots with pins and LRU, the CPU cache, unload."""

import queue

import pytest

from app.core.adapter_files import AdapterFileError
from app.inference.adapters import AdapterTiers
from app.inference.messages import AdapterRef


class FakePool:
    def __init__(self, slots: int):
        self.num_slots = slots + 1
        self.contents: dict[int, object] = {}

    def write(self, slot, weights):
        self.contents[slot] = weights

    def clear(self, slot):
        self.contents.pop(slot, None)


class FakeLoader:
    def __init__(self):
        self.requests: queue.Queue = queue.Queue()


def ref(name: str) -> AdapterRef:
    return AdapterRef(name, None)


@pytest.fixture
def tiers() -> AdapterTiers:
    return AdapterTiers(FakePool(slots=2), cpu_capacity=3, loader=FakeLoader())


def load(tiers: AdapterTiers, name: str) -> int:
    """Ask for `name`, let the (fake) loader finish, ask again: the slot it got."""
    assert tiers.acquire(ref(name)) is None
    assert tiers.loader.requests.get_nowait() == ref(name)
    tiers.deliver(name, {"weights": name})
    assert tiers.finished_loads() == [(name, None)]
    return tiers.acquire(ref(name))


def test_a_load_is_requested_once_however_many_ask(tiers):
    assert tiers.acquire(ref("a")) is None and tiers.acquire(ref("a")) is None
    assert tiers.loader.requests.qsize() == 1


def test_lru_idle_slot_is_evicted_never_a_pinned_one(tiers):
    a = load(tiers, "a")  # pinned, and the least recently used
    b = load(tiers, "b")
    tiers.release(b)  # b idle
    c = load(tiers, "c")
    assert c == b and tiers.pool.contents[c] == {"weights": "c"}
    assert sorted(tiers.resident()["gpu"]) == ["a", "c"]
    # Every slot pinned: no slot for d, nothing evicted; d stays in the CPU cache for later.
    assert load(tiers, "d") is None
    assert sorted(tiers.resident()["gpu"]) == ["a", "c"]
    tiers.release(a)
    assert tiers.acquire(ref("d")) == a


def test_a_resident_adapter_is_shared_and_pinned_per_request(tiers):
    slot = load(tiers, "a")
    assert tiers.acquire(ref("a")) == slot and tiers.slots[slot].pins == 2


def test_cpu_cache_is_a_bounded_lru(tiers):
    for name in "abcd":
        assert tiers.acquire(ref(name)) is None
        tiers.deliver(name, {"weights": name})
    tiers.finished_loads()
    assert tiers.resident()["cpu"] == ["b", "c", "d"]


def test_unload_clears_idle_slots_at_once_and_busy_ones_on_release(tiers):
    busy = load(tiers, "a")
    idle = load(tiers, "b")
    tiers.release(idle)
    tiers.unload("b")
    tiers.unload("a")
    assert idle not in tiers.pool.contents and tiers.resident() == {"gpu": [], "cpu": []}
    assert busy in tiers.pool.contents  # still computing for its request
    assert tiers.acquire(ref("a")) is None  # a new request loads it afresh
    tiers.release(busy)
    assert busy not in tiers.pool.contents


def test_a_load_finishing_after_unload_is_dropped_and_failures_are_reported(tiers):
    assert tiers.acquire(ref("a")) is None
    tiers.unload("a")
    tiers.deliver("a", {"weights": "a"})
    assert tiers.finished_loads() == [] and tiers.resident()["cpu"] == []
    assert tiers.acquire(ref("bad")) is None
    error = AdapterFileError("corrupt")
    tiers.deliver("bad", error)
    assert tiers.finished_loads() == [("bad", error)]
