"""Adapter tiers: GPU pool slots (bounded, pinned while requests use them, LRU among the idle),
a CPU cache (bounded LRU of loaded weights) and the artifact store on disk, read by a loader
thread so that a slow load never stalls the decode loop. Everything is keyed by version (the
sha256 of the weights), so a re-created model id never meets stale weights."""

import mmap
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from app.core.adapter_files import (
    PEFT_PREFIX,
    AdapterFileError,
    AdapterGone,
    check_adapter_dir,
    read_safetensors_header,
    verify_manifest,
)
from app.core.artifacts import WEIGHTS_FILE
from app.core.metrics import ADAPTER_LOAD_SECONDS, RESIDENT_ADAPTERS
from app.inference.lora import AdapterPool, StagedAdapter, StagedPart, Weights
from app.inference.messages import AdapterRef

# Test hook: seconds each disk load sleeps, to show that loads never stall other requests.
LOAD_DELAY_ENV = "TUNEFORGE_TEST_ADAPTER_LOAD_DELAY_S"
# Verifies a mapped file while the loader thread converts its tensors.
_VERIFIER = ThreadPoolExecutor(1, thread_name_prefix="adapter-verify")


def load_adapter_staged(ref: AdapterRef, base_dir: Path, dtype: torch.dtype, pin: bool) -> StagedAdapter:
    """One adapter's verified weights, staged for the pool, fast: the file is mapped, not read; it is
    verified (its blocks hashed in parallel) on other threads while its tensors are converted to
    the pool's dtype in one bulk copy (on all cores) straight from the mapping into a staging
    buffer; nothing is returned unless it matches."""
    if not ref.adapter_dir.is_dir():
        raise AdapterGone("the adapter's files are gone (the model was deleted)")
    path = ref.adapter_dir / WEIGHTS_FILE
    with open(path, "rb") as f:
        # Copy-on-write only because torch wants a writable buffer: nothing is written, nothing copied.
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    verified = _VERIFIER.submit(verify_manifest, ref.adapter_dir, ref.version, mapped)
    try:
        header = read_safetensors_header(path)
        specs = check_adapter_dir(ref.adapter_dir, base_dir, header)  # also: one dtype throughout
        stored = SAFETENSORS_DTYPES[next(iter(header.values()))["dtype"]]
        start = 8 + struct.unpack("<Q", mapped[:8])[0]
        count = (len(mapped) - start) // stored.itemsize
        flat = torch.empty(count, dtype=dtype, pin_memory=pin)
        flat.copy_(torch.frombuffer(mapped, dtype=stored, count=count, offset=start))

        def at(name: str) -> int:
            begin = header[PEFT_PREFIX + name]["data_offsets"][0]
            if begin % stored.itemsize:
                raise AdapterFileError(f"{name} is not aligned to its dtype in {WEIGHTS_FILE}")
            return begin // stored.itemsize

        parts = {
            module: StagedPart(
                spec.rank, at(f"{module}.lora_A.weight"), at(f"{module}.lora_B.weight"), spec.scale
            )
            for module, spec in specs.items()
        }
    except Exception:
        verified.result()  # A mismatch is the better explanation, if there is one.
        raise
    verified.result()
    return StagedAdapter(flat, parts, max(part.rank for part in parts.values()))


# The dtypes check_adapter_dir lets through (adapter_files.SERVED_DTYPES), as torch dtypes.
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def reserve_pinned_memory(numel: int, count: int, dtype: torch.dtype) -> None:
    """Pin `count` staging buffers of `numel` elements and free them into torch's pinned-memory
    cache, which then serves the loader's buffers of that size. Pinning a fresh 24 MB buffer
    takes ~20 ms on an H100 host, and a server that pinned while serving measured cold loads of
    52-64 ms against 20-31 ms with the memory reserved up front (docs/BENCHMARKS.md)."""
    buffers = [torch.empty(numel, dtype=dtype, pin_memory=True) for _ in range(count)]
    del buffers


class AdapterLoader:
    """One thread reading adapters from disk; results are picked up by the engine thread."""

    def __init__(self, base_dir: Path, on_result, dtype: torch.dtype = torch.float32, pin: bool = False):
        self.base_dir = base_dir
        self.on_result = on_result
        self.dtype = dtype
        self.pin = pin
        self.requests: queue.Queue[AdapterRef | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="adapter-loader", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.requests.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while (ref := self.requests.get()) is not None:
            started = time.perf_counter()
            try:
                delay = float(os.environ.get(LOAD_DELAY_ENV, "0") or 0)
                if delay:
                    time.sleep(delay)
                result = load_adapter_staged(ref, self.base_dir, self.dtype, self.pin)
                ADAPTER_LOAD_SECONDS.observe(time.perf_counter() - started)
            except AdapterFileError as exc:
                result = exc
            except Exception as exc:  # noqa: BLE001 - any unreadable file is refused the same way
                result = AdapterFileError(f"the adapter could not be loaded: {exc}")
            self.on_result(ref.version, result)


@dataclass
class Slot:
    version: str | None = None
    pins: int = 0
    last_used: float = 0.0
    # Unloaded while requests still ran on it: cleared when the last one releases it.
    retired: bool = False


@dataclass
class AdapterTiers:
    """Owned by the engine thread, except `deliver`, which the loader thread calls."""

    pool: AdapterPool
    cpu_capacity: int
    loader: AdapterLoader | None = None
    slots: list[Slot] = field(default_factory=list)
    cpu_cache: OrderedDict[str, Weights] = field(default_factory=OrderedDict)
    loading: set[str] = field(default_factory=set)
    # Versions unloaded while a load was in flight: that load's result is dropped.
    discard: set[str] = field(default_factory=set)
    results: queue.Queue = field(default_factory=queue.Queue)
    wake: threading.Event | None = None

    def __post_init__(self):
        self.slots = [Slot() for _ in range(self.pool.num_slots)]  # slot 0: the base model

    def deliver(self, version: str, result) -> None:
        self.results.put((version, result))
        if self.wake is not None:
            self.wake.set()

    def finished_loads(self) -> list[tuple[str, AdapterFileError | None]]:
        """Move finished loads into the CPU cache; returns (version, error or None) per load."""
        done = []
        while not self.results.empty():
            version, result = self.results.get_nowait()
            self.loading.discard(version)
            if version in self.discard:
                self.discard.discard(version)
                continue
            if isinstance(result, Exception):
                done.append((version, result))
                continue
            self.cpu_cache[version] = result
            self.cpu_cache.move_to_end(version)
            while len(self.cpu_cache) > self.cpu_capacity:
                self.cpu_cache.popitem(last=False)
            done.append((version, None))
        self._report()
        return done

    def slot_of(self, version: str) -> int | None:
        for index, slot in enumerate(self.slots):
            if index and slot.version == version and not slot.retired:
                return index
        return None

    def acquire(self, ref: AdapterRef) -> int | None:
        """Pin `ref` in a GPU slot and return the slot; None while it still has to be loaded
        or every slot is pinned (the caller asks again later)."""
        index = self.slot_of(ref.version)
        if index is None:
            weights = self.cpu_cache.get(ref.version)
            if weights is None:
                if ref.version not in self.loading:
                    self.loading.add(ref.version)
                    self.loader.requests.put(ref)
                return None
            index = self._free_slot()
            if index is None:
                return None
            self.pool.write(index, weights)
            self.slots[index] = Slot(version=ref.version)
            self.cpu_cache.move_to_end(ref.version)
            self._report()
        slot = self.slots[index]
        slot.pins += 1
        slot.last_used = time.monotonic()
        return index

    def release(self, index: int) -> None:
        if index == 0:
            return
        slot = self.slots[index]
        slot.pins -= 1
        slot.last_used = time.monotonic()
        if slot.retired and slot.pins == 0:
            self._clear(index)

    def unload(self, version: str) -> None:
        """Forget every copy of `version`; a slot still in use is cleared when it is released."""
        self.cpu_cache.pop(version, None)
        if version in self.loading:
            self.discard.add(version)
        for index, slot in enumerate(self.slots):
            if index and slot.version == version:
                if slot.pins:
                    slot.retired = True
                else:
                    self._clear(index)
        self._report()

    def resident(self) -> dict[str, list[str]]:
        return {
            "gpu": [s.version for s in self.slots[1:] if s.version and not s.retired],
            "cpu": list(self.cpu_cache),
        }

    def _free_slot(self) -> int | None:
        empty = [i for i, s in enumerate(self.slots) if i and s.version is None]
        if empty:
            return empty[0]
        idle = [i for i, s in enumerate(self.slots) if i and s.pins == 0]
        if not idle:
            return None
        victim = min(idle, key=lambda i: self.slots[i].last_used)
        self._clear(victim)
        return victim

    def _clear(self, index: int) -> None:
        self.pool.clear(index)
        self.slots[index] = Slot()
        self._report()

    def _report(self) -> None:
        resident = self.resident()
        RESIDENT_ADAPTERS.labels("gpu").set(len(resident["gpu"]))
        RESIDENT_ADAPTERS.labels("cpu").set(len(resident["cpu"]))
