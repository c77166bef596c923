"""The engine's adapters: registration by name, and a loader thread that fills GPU slots.

`AdapterStore` is what `Engine.adapters` is. `load(name, path)` reads and validates an
adapter on the caller's thread (a malformed one is refused there, naming the file and
key); `scan(directory)` registers every adapter directory below it. Which adapter sits in
which slot is `serving.adapter_cache.AdapterCache`'s decision; this module carries it out
off the decode loop: the loader thread reads from disk when the host tier no longer holds
an adapter, builds the slot's arrays and copies them to the device. The step thread then
only dispatches the in-place write (`commit`), which queues behind the steps already
dispatched, so steps never wait for a load and never see a half-written slot.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jax

from jlora.adapters import Adapter
from jlora.bank import EMPTY, AdapterBank
from jlora.formats.native import read_adapter
from serving.adapter_cache import AdapterCache, Entry, UnknownAdapter

__all__ = ["AdapterInfo", "AdapterStore", "UnknownAdapter"]


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
    def __init__(self, bank: AdapterBank, params, cache: AdapterCache):
        self.bank, self.params, self.cache = bank, params, cache
        self._done: list[tuple] = []        # finished loads, for the step thread
        self._done_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._busy = False

    # ------------------------------------------------------------------ public API
    def load(self, name: str, source: str | Path | Adapter, *, pin: bool = False,
             replace: bool = False) -> AdapterInfo:
        """Register an adapter (a PEFT or native directory, or an `Adapter`) under `name`.

        Raises ValueError for a bad name, a malformed or unservable adapter, or a name in use
        (without replace); FileNotFoundError for a missing path. Requests already using a
        replaced version finish with it. A pinned adapter is sent to the GPU at once and never
        leaves it."""
        if not isinstance(name, str) or not name or "=" in name or len(name) > 200:
            raise ValueError(f"adapter name {name!r} must be 1-200 characters without '='")
        if isinstance(source, Adapter):
            adapter, path = source, None
        else:
            path = Path(source)
            adapter = read_adapter(path, self.bank.cfg.n_layers, name)
        adapter.name = name
        self.bank.check(adapter)
        entry = Entry(name=name, version=1, path=path, variant=adapter.variant,
                      rank=adapter.max_rank if adapter.modules else 0,
                      targets=adapter.targets, nbytes=adapter.nbytes(), adapter=adapter,
                      pinned=pin)
        self.cache.register(entry, replace)
        if pin:
            self.cache.want(entry)
        return AdapterInfo.of(entry)

    def scan(self, directory: str | Path) -> list[str]:
        """Register each adapter directory in `directory` under its directory name."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"adapter directory {directory} does not exist")
        names = []
        for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
            self.load(sub.name, sub)
            names.append(sub.name)
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

    def __contains__(self, name: str) -> bool:
        return name in self.cache.entries

    def adopt(self, bank: AdapterBank) -> None:
        """Register the adapters a model's bank already holds (`jlora.loader.load_adapter`):
        in place if `bank` is this store's, else to be loaded on demand."""
        for slot, adapter in sorted(bank.adapters.items()):
            self.load(adapter.name, adapter)
            if bank is self.bank:
                self.cache.place(self.cache.get(adapter.name), slot)

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
        for entry in [e for e in self.cache.entries.values() if e.pinned and e.slot is None]:
            self.cache.want(entry)
        return failed

    def warm_up(self) -> None:
        """Compile the slot write now (serving never compiles): rewrite a slot with what it
        holds, which changes nothing."""
        slot = next((s for s in range(1, self.bank.n_slots) if s not in self.bank.adapters), 1)
        adapter = self.bank.adapters.get(slot, EMPTY)
        self.bank.put(adapter, slot, self.bank.slot_data(adapter, self.params, slot))

    # ------------------------------------------------------------------ loader thread
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="jlora-adapter-loader",
                                            daemon=True)
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

    def _run(self) -> None:
        while not self._stop:
            entry = self.cache.next_job(timeout=0.1)
            if entry is None:
                continue
            self._busy = True
            try:
                self._load(entry)
            finally:
                self._busy = False

    def _load(self, entry: Entry) -> None:
        t0, slot = time.perf_counter(), entry.slot
        adapter = entry.adapter
        try:
            if adapter is None:
                adapter = read_adapter(entry.path, self.bank.cfg.n_layers, entry.name)
                self.cache.keep_host(entry, adapter)
            data = jax.block_until_ready(self.bank.slot_data(adapter, self.params, slot))
            result = (entry, slot, adapter, data, time.perf_counter() - t0, None)
        except Exception as e:   # a file changed or broke since it was registered
            result = (entry, slot, None, None, 0.0,
                      f"adapter {entry.name!r} failed to load from {entry.path}: {e}")
        with self._done_lock:
            self._done.append(result)
