"""The engine's adapters: registration by name, and a loader thread that fills GPU slots.

`AdapterStore` is what `Engine.adapters` is. `load(name, path)` reads, validates and packs
an adapter for a slot on the caller's thread (a malformed one is refused there, naming the
file and key); `scan(directory)` registers every adapter directory below it, several at
once. Which adapter sits in which slot is `serving.adapter_cache.AdapterCache`'s decision;
this module carries it out off the decode loop: the loader thread reads from disk (and
packs) when the host tier no longer holds an adapter, and copies its packed rows to the
device. The step thread then only dispatches the in-place write (`commit`), which queues
behind the steps already dispatched, so steps never wait for a load and never see a
half-written slot.

The host tier keeps packed rows in page-locked ("pinned") host memory where the backend
has it, so a load's big copy is a DMA, not staged through the CPU. A load is three
transfers (`AdapterBank.slot_data`), not one per array. The loader thread holds the GIL
while it issues them, and the step thread needs the GIL each time it comes back from the
device. On the H200, ~60 per-array copies made the decode steps beside a load 30-50%
slower at the median; three make them ~4% slower (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from jlora.adapters import Adapter, ModuleAdapter, target_shapes
from jlora.bank import EMPTY, AdapterBank, Packed, dora_scale, slot_bytes
from jlora.formats import native, peft
from jlora.formats.native import read_adapter
from serving.adapter_cache import AdapterCache, Entry, UnknownAdapter

__all__ = ["HOST_MEMORY", "AdapterInfo", "AdapterStore", "UnknownAdapter", "make_bank"]

HOST_MEMORY = ("pinned", "pageable")


def make_bank(model, config) -> AdapterBank | None:
    """The engine's adapter bank, sized by its `EngineConfig`: lora_slot_ranks, or max_loras
    slots of max_lora_rank, or as many as lora_memory_gb holds; else the model's own bank
    (`load_adapter`), or None: the base model only."""
    c, cfg, n = config, model.config, config.max_loras
    if not c.host_lora_gb >= 0:
        raise ValueError(f"host_lora_gb={c.host_lora_gb} must be >= 0")
    if c.lora_slot_ranks:
        if n or c.lora_memory_gb:
            raise ValueError(f"give lora_slot_ranks={c.lora_slot_ranks} or max_loras / "
                             "lora_memory_gb, not both")
        return AdapterBank(cfg, len(c.lora_slot_ranks) + 1, max(c.lora_slot_ranks),
                           model.dtype, slot_ranks=c.lora_slot_ranks)
    if c.lora_memory_gb:
        if n:
            raise ValueError(f"give max_loras={n} or lora_memory_gb={c.lora_memory_gb}, "
                             "not both")
        each = slot_bytes(cfg, c.max_lora_rank, model.dtype)
        n = int(c.lora_memory_gb * 1e9 // each)
        if n < 1:
            raise ValueError(f"lora_memory_gb={c.lora_memory_gb} holds no adapter slot of "
                             f"rank {c.max_lora_rank} ({each} bytes each)")
    if n < 0:
        raise ValueError(f"max_loras={n} must be >= 0")
    return AdapterBank(cfg, n + 1, c.max_lora_rank, model.dtype) if n else model.bank


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    variant: str                     # lora | dora | tied
    rank: int                        # the largest rank of its modules
    targets: tuple[str, ...]
    source: str                      # its directory, or "memory"
    nbytes: int                      # host bytes of its arrays
    residency: str                   # gpu | loading | host | disk
    pinned: bool
    version: int                     # 1, then +1 at each replace
    loads: int                       # times written into a GPU slot
    hits: int                        # admissions that found it on the GPU
    misses: int                      # times it had to be sent for
    last_load_seconds: float | None  # disk/host to device, the last time

    @staticmethod
    def of(e: Entry) -> "AdapterInfo":
        return AdapterInfo(e.name, e.variant, e.rank, e.targets,
                           str(e.path) if e.path else "memory", e.nbytes, e.residency,
                           e.pinned, e.version, e.loads, e.hits, e.misses,
                           e.load_seconds[-1] if e.load_seconds else None)


class AdapterStore:
    def __init__(self, bank: AdapterBank, params, cache: AdapterCache,
                 host_memory: str = "pinned"):
        if host_memory not in HOST_MEMORY:
            raise ValueError(f"host_memory={host_memory!r} is not one of {HOST_MEMORY}")
        self.bank, self.params, self.cache = bank, params, cache
        # loads go to the device holding the bank (the first of a mesh's: the engine then
        # lays the bank out over the mesh again)
        device = min(jax.tree.leaves(bank.arrays)[0].devices(), key=lambda d: d.id)
        self.device = jax.sharding.SingleDeviceSharding(device)   # its default memory
        if len(jax.tree.leaves(bank.arrays)[0].sharding.device_set) == 1:
            # committed there, like the loads' rows: a slot write is then one program, the
            # one warm_up compiles
            bank.arrays = jax.device_put(bank.arrays, self.device)
        kinds = {m.kind for m in device.addressable_memories()}
        self.pinned = (jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
                       if host_memory == "pinned" and "pinned_host" in kinds else None)
        self._done: list[tuple] = []        # finished loads, for the step thread
        self._done_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._busy = False
        self.on_done: Callable[[], None] | None = None   # called (loader thread) per finished load

    # ------------------------------------------------------------------ public API
    def load(self, name: str, source: str | Path | Adapter, *, pin: bool = False,
             replace: bool = False) -> AdapterInfo:
        """Register an adapter (a PEFT or native directory, or an `Adapter`) under `name`.

        Raises ValueError for a bad name, a malformed or unservable adapter, or a name in use
        (without replace); FileNotFoundError for a missing path. Requests already using a
        replaced version finish with it. A pinned adapter is sent to the GPU at the next step
        and never leaves it."""
        entry = self._prepare(name, source, pin)
        self.cache.register(entry, replace)   # a pinned one is sent for at the next step
        return AdapterInfo.of(entry)

    def _prepare(self, name: str, source: str | Path | Adapter, pin: bool = False) -> Entry:
        """Read, check and pack: everything `load` does but registering (thread-safe)."""
        if not isinstance(name, str) or not name or "=" in name or len(name) > 200:
            raise ValueError(f"adapter name {name!r} must be 1-200 characters without '='")
        if isinstance(source, Adapter):
            adapter, path, stamp = source, None, None
        elif not isinstance(source, (str, Path)):
            raise ValueError(f"adapter source {source!r} must be a directory path or an "
                             "Adapter")
        else:
            path = Path(source)
            stamp = dir_stamp(path)
            adapter = read_adapter(path, self.bank.cfg.n_layers, name)
        adapter.name = name
        self.bank.check(adapter)
        rank = adapter.max_rank if adapter.modules else 0
        # packed now, for the least slot capacity that holds it (the slot it will get unless
        # only larger ones are free): a load is then a copy
        capacity = min(c for c in self.bank.slot_ranks[1:] if c >= max(rank, 1))
        packed = self._pack(adapter, capacity)
        return Entry(name=name, version=1, path=path, variant=adapter.variant, rank=rank,
                     targets=adapter.targets, nbytes=adapter.nbytes() + packed.nbytes,
                     adapter=adapter, packed=packed, pinned=pin, stamp=stamp)

    def scan(self, directory: str | Path, workers: int | None = None) -> list[str]:
        """Register each adapter directory in `directory` under its directory name, in name
        order. `workers` threads read and pack them (default: up to 8, one per core; reading
        and casting release the GIL), a batch of `workers` at a time, so memory holds at most
        that many beyond the host tier. The first bad one raises, after those before it."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"adapter directory {directory} does not exist")
        subs = sorted(p for p in directory.iterdir() if p.is_dir())
        workers = workers or min(8, os.cpu_count() or 1)
        names = []
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="jlora-scan") as pool:
            for i in range(0, len(subs), workers):
                batch = [pool.submit(self._prepare, p.name, p) for p in subs[i:i + workers]]
                for future in batch:
                    entry = future.result()
                    self.cache.register(entry, False)
                    names.append(entry.name)
        return names

    def unload(self, name: str) -> None:
        """Unregister `name` (UnknownAdapter if absent); running requests finish with it."""
        self.cache.unregister(name)

    def info(self, name: str) -> AdapterInfo:
        with self.cache.lock:
            return AdapterInfo.of(self.cache.get(name))

    def list(self) -> list[AdapterInfo]:
        with self.cache.lock:
            return [AdapterInfo.of(e) for e in sorted(self.cache.entries.values(),
                                                      key=lambda e: e.name)]

    def metrics(self) -> dict:
        """Per adapter residency, loads, hits, misses and load times; evictions; host bytes."""
        cache = self.cache
        with cache.lock:
            return dict(adapters={e.name: dict(residency=e.residency, loads=e.loads,
                                               hits=e.hits, misses=e.misses,
                                               load_seconds=list(e.load_seconds))
                                  for e in cache.entries.values()},
                        adapter_evictions=cache.evictions, host_lora_bytes=cache.host_used)

    def __contains__(self, name: str) -> bool:
        return name in self.cache.entries

    def adopt(self, bank: AdapterBank) -> None:
        """Register the adapters a model's bank already holds (`jlora.loader.load_adapter`):
        in place if `bank` is this store's, else to be loaded on demand. They were given in
        memory, so the host budget does not refuse them."""
        for name, slot in sorted(bank.slots.items(), key=lambda item: item[1]):
            adapter = bank.adapters.get(slot)
            if adapter is not None:
                entry = self._prepare(name, adapter)
            elif bank is self.bank:   # written straight into the device arrays (benchmarks):
                # it can never be loaded again, so it never leaves its slot
                entry = Entry(name=name, version=1, path=None, variant="lora",
                              rank=bank.max_rank, targets=(), nbytes=0, pinned=True)
            else:
                raise ValueError(f"adapter {name!r} of the model's bank has no host copy to "
                                 "move into the engine's bank; use max_loras=0 to serve the "
                                 "model's bank as it is")
            self.cache.register(entry, limits=False)
            if bank is self.bank:
                self.cache.place(entry, slot)

    def _pack(self, adapter: Adapter, capacity: int) -> Packed:
        """`bank.pack` for a slot of this capacity, its rows (nearly all its bytes) moved to
        pinned host memory when the store keeps them there. Pinned memory is a bounded pool
        (XLA's GPU client: 64 GB unless XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB says otherwise);
        past it, rows stay pageable."""
        packed = self.bank.pack(adapter, self.params, capacity)
        if self.pinned is None:
            return packed
        try:
            return dataclasses.replace(packed, rows=jax.device_put(packed.rows, self.pinned))
        except jax.errors.JaxRuntimeError as e:
            warnings.warn(f"pinned host memory is full ({e}); this adapter's rows stay in "
                          "pageable memory, and loading it will slow the steps beside it")
            return packed

    # ------------------------------------------------------------------ step thread
    def commit(self) -> list[tuple[Entry, str]]:
        """Write finished loads into the bank; returns the (entry, error) of failed ones."""
        with self._done_lock:
            done, self._done = self._done, []
        failed = []
        for entry, slot, adapter, data, seconds, error in done:
            if error is not None:
                self.cache.failed(entry, error)
                failed.append((entry, error))
            elif self.cache.loaded(entry, seconds):
                self.bank.put(adapter, slot, data)
        with self.cache.lock:
            for entry in list(self.cache.unplaced_pins):
                self.cache.want(entry)
        return failed

    def pending(self) -> bool:
        """Has a load finished that `commit` should write (cheap: called every step)? Pins
        still without a slot are retried at every commit too, but do not keep the engine's
        loop from waiting (it wakes at least every 50 ms)."""
        return bool(self._done)

    def needs_commit(self) -> bool:
        return bool(self._done or self.cache.unplaced_pins)

    def warm_up(self) -> None:
        """Compile the slot writes now (serving never compiles), one per slot capacity: write
        into a free slot of each capacity the empty adapter, or rewrite an adapter there."""
        bank, held = self.bank, set(self.bank.slots.values()) | set(self.bank.adapters)
        for rank in sorted(set(bank.slot_ranks[1:])):
            slots = [s for s in range(1, bank.n_slots) if bank.slot_ranks[s] == rank]
            free = [s for s in slots if s not in held]
            known = [s for s in slots if s in bank.adapters]
            if free or known:   # else its slots hold adapters that exist only on the device:
                # nothing there can be evicted, so nothing will ever be loaded there
                slot = (free or known)[0]
                adapter = bank.adapters.get(slot, EMPTY)
                bank.put(adapter, slot, bank.slot_data(adapter, self.params, slot,
                                                       self._pack(adapter, rank), self.device))
        if "dora" in bank.features:   # DoRA's scale: one program per target module
            for target, (n_in, n_out) in target_shapes(bank.cfg).items():
                mod = ModuleAdapter(a=np.ones((1, n_in), np.float32),
                                    b=np.ones((n_out, 1), np.float32), scale=1.0,
                                    m=np.ones(n_out, np.float32))
                dora_scale(self.params, bank.cfg, 0, target, mod, bank.max_rank)

    # ------------------------------------------------------------------ loader thread
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=_run_loader,
                                            args=(weakref.ref(self), self.cache),
                                            name="jlora-adapter-loader", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self.cache.wake()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Block until no load is queued or in progress (tests, benchmarks)."""
        end = time.monotonic() + timeout
        while self.cache.jobs or self._busy:
            if time.monotonic() > end:
                raise TimeoutError("adapter loads still running")
            time.sleep(0.001)

    def _load(self, entry: Entry) -> None:
        t0, slot = time.perf_counter(), entry.slot
        adapter, packed = entry.adapter, entry.packed
        try:
            if adapter is None:
                if entry.stamp is not None and dir_stamp(entry.path) != entry.stamp:
                    raise ValueError(f"its files changed after version {entry.version} was "
                                     "registered (register new files with replace=True)")
                adapter = read_adapter(entry.path, self.bank.cfg.n_layers, entry.name)
                packed = self._pack(adapter, self.bank.slot_ranks[slot])
                self.cache.keep_host(entry, adapter, packed)
            data = self.bank.slot_data(adapter, self.params, slot, packed, self.device)
            jax.block_until_ready(data.arrays)
            result = (entry, slot, adapter, data, time.perf_counter() - t0, None)
        except Exception as e:   # a file changed or broke since it was registered
            result = (entry, slot, None, None, 0.0,
                      f"adapter {entry.name!r} failed to load from {entry.path}: {e}")
        with self._done_lock:
            self._done.append(result)
        if self.on_done is not None:   # the engine's loop may be waiting for this load
            self.on_done()


ADAPTER_FILES = (native.META, native.WEIGHTS, peft.CONFIG, peft.WEIGHTS)


def dir_stamp(path: Path) -> tuple | None:
    """What an adapter directory's files are now (name, size, mtime of those an adapter is
    read from; None if the directory cannot be read), so that a reload can tell whether
    they are still the ones registered."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                            for p in Path(path).iterdir() if p.name in ADAPTER_FILES))
    except OSError:
        return None


def _run_loader(store_ref: weakref.ref, cache: AdapterCache) -> None:
    """The loader thread: takes reserved slots' jobs and fills them. It holds its store only
    while loading, so an engine dropped without `close()` is still freed (and this ends)."""
    while True:
        entry = cache.next_job(timeout=1.0)
        store = store_ref()
        if store is None or store._stop:
            return
        if entry is not None:
            store._busy = True
            try:
                store._load(entry)
            finally:
                store._busy = False
        del store
