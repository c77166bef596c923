"""Where each adapter lives, GPU slot, host memory or disk, and who uses it (host only).

Tiers, coldest first:
  disk     registered with a directory; nothing in memory;
  host     its `Adapter` (numpy arrays), and its rows packed for a slot, are in host memory:
           LRU by bytes within `host_bytes`
           (one registered from memory, with no directory, can never leave this tier);
  loading  a GPU slot is reserved and the engine's loader thread is filling it;
  gpu      written into a slot of the bank: requests using it can run.

Every entry counts `users`, the running requests that hold its slot (an entry with users is
never evicted), and `bound`, the unfinished requests that named it at submit: replacing or
unloading a name retires the old entry, which lives on until its requests finish.

`want(entry)` reserves a slot that holds its rank (a free one of the least capacity, else the
least recently used idle one) and queues the entry for the loader. When every slot is held by running requests it drains one: no new
request is admitted to it, so its slot frees up as its running requests finish, and the
adapter waiting for a slot gets it within one request lifetime.

This module decides; it neither reads files nor touches a device (serving/adapter_store.py
does both). No jax here. All methods take the lock; the slot decisions (`want`, `acquire`,
`release`, `begin_step`, `end_step`, `loaded`, `failed`) are the engine thread's alone, so
nothing is evicted between the scheduler finding an adapter ready and acquiring it.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path


class UnknownAdapter(ValueError):
    """No adapter of that name is registered."""


@dataclass(eq=False)
class Entry:
    name: str
    version: int
    path: Path | None           # where to (re)read it; None: registered from memory
    variant: str
    rank: int
    targets: tuple[str, ...]
    nbytes: int                 # host bytes of its host copy (adapter and packed)
    adapter: object = None      # host copy (jlora.adapters.Adapter), or None (on disk only)
    packed: object = None       # with it, its slot-ready rows (jlora.bank.Packed), or None
    slot: int | None = None
    on_gpu: bool = False        # slot written (False with a slot: loading)
    pinned: bool = False
    registered: bool = True     # False once replaced or unloaded (retired)
    users: int = 0
    bound: int = 0
    draining: bool = False
    last_used: int = 0
    host_used: int = 0
    loads: int = 0
    hits: int = 0
    misses: int = 0
    load_seconds: list = field(default_factory=list)
    error: str | None = None    # the last load's failure
    stamp: tuple | None = None  # its directory's files (name, size, mtime) when registered

    @property
    def residency(self) -> str:
        if self.slot is not None:
            return "gpu" if self.on_gpu else "loading"
        return "host" if self.adapter is not None else "disk"


class AdapterCache:
    """Slots 1..n_slots of the bank (slot s holds ranks up to slot_ranks[s - 1]), a host tier
    of `host_bytes`, and the registry."""

    def __init__(self, n_slots: int, host_bytes: int, slot_ranks: tuple[int, ...] = ()):
        if n_slots < 1:
            raise ValueError(f"n_slots={n_slots} must be >= 1")
        self.n_slots, self.host_bytes = n_slots, host_bytes
        self.capacity = dict(enumerate(slot_ranks or (1 << 30,) * n_slots, start=1))
        assert len(self.capacity) == n_slots, (n_slots, slot_ranks)
        self.entries: dict[str, Entry] = {}     # the current version of each name
        self.slots: dict[int, Entry] = {}       # slot -> entry holding it (loading or gpu)
        self.retired: list[Entry] = []          # replaced/unloaded, still bound
        self.jobs: deque[Entry] = deque()       # slots reserved, waiting for the loader
        self.unplaced_pins: set[Entry] = set()  # pinned entries still without a slot
        self.evictions = 0
        self.lock = threading.Condition(threading.RLock())
        self._tick = 0
        self._drain_wanted: bool | None = None

    # ------------------------------------------------------------------ registry
    def register(self, entry: Entry, replace: bool = False, limits: bool = True) -> None:
        """Add `entry` under its name; limits=False skips the pin and host-budget checks
        (adapters already in a bank before serving started)."""
        with self.lock:
            old = self.entries.get(entry.name)
            if old is not None and not replace:
                raise ValueError(f"adapter {entry.name!r} is already loaded (from "
                                 f"{old.path or 'memory'}); pass replace=True to replace it")
            if entry.rank > max(self.capacity.values()):
                raise ValueError(f"adapter {entry.name!r} has rank {entry.rank}; the largest "
                                 f"adapter slot holds rank {max(self.capacity.values())}")
            pins = [e for e in self.entries.values() if e.pinned and e is not old]
            if limits and entry.pinned and len(pins) + 1 > self.n_slots - 1:
                raise ValueError(f"cannot pin {entry.name!r}: {len(pins)} of the "
                                 f"{self.n_slots} adapter slots are pinned already, and one "
                                 "must stay free for the others")
            top, below = self._top_capacity()
            big_pins = sum(e.rank > below for e in pins)
            if limits and entry.pinned and entry.rank > below and \
                    big_pins + 1 > sum(c == top for c in self.capacity.values()) - 1:
                raise ValueError(f"cannot pin {entry.name!r}: its rank {entry.rank} needs one "
                                 f"of the slots of rank {top}, and one of those must stay "
                                 f"free for adapters of ranks above {below}")
            if limits and entry.path is None and entry.adapter is not None:
                pinned_bytes = sum(e.nbytes for e in self._host_entries() if e.path is None)
                if pinned_bytes + entry.nbytes > self.host_bytes:
                    raise ValueError(
                        f"adapter {entry.name!r} ({entry.nbytes} bytes) does not fit the host "
                        f"adapter budget of {self.host_bytes} bytes, {pinned_bytes} of which "
                        "hold adapters registered from memory; register it from a directory "
                        "or raise the budget (host_lora_gb)")
            if old is not None:
                entry.version = old.version + 1
                self._retire(old)
            self.entries[entry.name] = entry
            if entry.adapter is not None:
                self._keep(entry, entry.adapter, entry.packed)
            if entry.pinned and entry.slot is None:
                self.unplaced_pins.add(entry)

    def unregister(self, name: str) -> Entry:
        with self.lock:
            entry = self.get(name)
            del self.entries[name]
            self._retire(entry)
            return entry

    def get(self, name: str) -> Entry:
        with self.lock:
            entry = self.entries.get(name)
            if entry is None:
                known = sorted(self.entries)
                shown = known[:10] + (["..."] if len(known) > 10 else [])
                raise UnknownAdapter(f"adapter {name!r} is not loaded; loaded: "
                                     f"{shown or 'none'}")
            return entry

    def _retire(self, entry: Entry) -> None:
        entry.registered, entry.pinned = False, False
        self.unplaced_pins.discard(entry)
        self.retired.append(entry)
        self._forget_if_unused(entry)

    def _forget_if_unused(self, entry: Entry) -> None:
        """A retired entry nobody needs gives back its slot and host memory at once."""
        if entry.registered or entry.bound or entry.users or (entry.slot and not entry.on_gpu):
            return
        self._free_slot(entry)
        entry.adapter = entry.packed = None
        self.retired.remove(entry)

    # ------------------------------------------------------------------ requests
    def bind(self, name: str) -> Entry:
        """A request naming `name` was accepted: it will use the current version."""
        with self.lock:
            entry = self.get(name)
            entry.bound += 1
            return entry

    def unbind(self, entry: Entry) -> None:
        with self.lock:
            entry.bound -= 1
            assert entry.bound >= 0, entry.name
            self._forget_if_unused(entry)

    def ready(self, entry: Entry) -> bool:
        """Can a request using it be admitted now (on the GPU, not draining)?"""
        return entry.on_gpu and entry.slot is not None and not entry.draining

    def acquire(self, entry: Entry) -> int:
        """A request using `entry` starts running: it holds the slot until `release`."""
        with self.lock:
            assert self.ready(entry), entry.name
            entry.users += 1
            entry.hits += 1
            self._tick += 1
            entry.last_used = self._tick
            return entry.slot

    def release(self, entry: Entry) -> None:
        with self.lock:
            entry.users -= 1
            assert entry.users >= 0, entry.name
            self._forget_if_unused(entry)

    # ------------------------------------------------------------------ GPU slots
    def begin_step(self) -> None:
        with self.lock:
            self._drain_wanted = None     # no want made yet this step

    def end_step(self) -> None:
        """A step whose wants were all met lifts the drain (one with no wants keeps it)."""
        with self.lock:
            if self._drain_wanted is False:
                for e in self.slots.values():
                    e.draining = False

    def want(self, entry: Entry, evict_wanted: bool = True) -> bool:
        """Make sure `entry` is on its way to a slot; returns whether it has one now.

        Evicts the least recently used idle entry if no slot is free; with evict_wanted False
        (prefetch) only one that no waiting request needs. With no slot to be had, drains one.
        """
        with self.lock:
            if evict_wanted and self._drain_wanted is None:
                self._drain_wanted = False
            if entry.slot is not None:
                return True
            entry.misses += 1
            slot = self._free_slot_number(entry)
            if slot is None:
                victim = self._victim(entry, evict_wanted)
                if victim is None:
                    if evict_wanted:
                        self._drain(entry.rank)
                    return False
                slot = victim.slot
                self._free_slot(victim)
                self.evictions += 1
            entry.slot, entry.on_gpu, entry.error = slot, False, None
            self.slots[slot] = entry
            self.unplaced_pins.discard(entry)
            self.jobs.append(entry)
            self.lock.notify_all()
            return True

    def place(self, entry: Entry, slot: int) -> None:
        """`entry` is already written in `slot` (a bank filled before serving started)."""
        with self.lock:
            assert slot not in self.slots and entry.slot is None, (slot, entry.name)
            entry.slot, entry.on_gpu = slot, True
            self.slots[slot] = entry
            self.unplaced_pins.discard(entry)

    def _top_capacity(self) -> tuple[int, int]:
        """The largest slot capacity, and the largest below it (0 if all slots are equal)."""
        top = max(self.capacity.values())
        return top, max((c for c in self.capacity.values() if c < top), default=0)

    def _last_top_slot(self, slot: int) -> bool:
        """Is `slot` the last slot of the largest capacity that no pin holds? A pin there
        would leave adapters of the largest ranks no slot for good."""
        top, _ = self._top_capacity()
        return self.capacity[slot] == top and all(
            s == slot or (s in self.slots and self.slots[s].pinned)
            for s, c in self.capacity.items() if c == top)

    def _fits(self, slot: int, entry: Entry) -> bool:
        return self.capacity[slot] >= entry.rank and not (
            entry.pinned and self._last_top_slot(slot))

    def _free_slot_number(self, entry: Entry) -> int | None:
        """The free slot of the least capacity that holds `entry`."""
        free = [s for s in self.capacity if s not in self.slots and self._fits(s, entry)]
        return min(free, key=self.capacity.get, default=None)

    def _victim(self, entry: Entry, evict_wanted: bool) -> Entry | None:
        idle = [e for e in self.slots.values()
                if e.on_gpu and not e.users and not e.pinned and self._fits(e.slot, entry)
                and (evict_wanted or e.bound == 0 or not e.registered)]
        # retired first, then those no waiting request needs, then least recently used
        return min(idle, key=lambda e: (e.registered, e.bound > 0, e.last_used), default=None)

    def _drain(self, rank: int) -> None:
        self._drain_wanted = True
        if any(e.draining and self.capacity[e.slot] >= rank for e in self.slots.values()):
            return
        busy = [e for e in self.slots.values()
                if e.on_gpu and not e.pinned and self.capacity[e.slot] >= rank]
        victim = min(busy, key=lambda e: (e.users, e.last_used), default=None)
        if victim is not None:
            victim.draining = True

    def _free_slot(self, entry: Entry) -> None:
        assert entry.users == 0, f"evicting {entry.name!r}, which {entry.users} requests use"
        if entry.slot is not None:
            del self.slots[entry.slot]
        entry.slot, entry.on_gpu, entry.draining = None, False, False

    # ------------------------------------------------------------------ the loader's side
    def next_job(self, timeout: float | None = None) -> Entry | None:
        with self.lock:
            if not self.jobs:
                self.lock.wait(timeout)
            return self.jobs.popleft() if self.jobs else None

    def wake(self) -> None:
        with self.lock:
            self.lock.notify_all()

    def keep_host(self, entry: Entry, adapter, packed=None) -> None:
        """The loader read `adapter` from disk (and packed it): keep it in the host tier (LRU
        by bytes)."""
        with self.lock:
            self._keep(entry, adapter, packed)

    def loaded(self, entry: Entry, seconds: float) -> bool:
        """The slot is written; returns False if nobody needs it any more (slot freed)."""
        with self.lock:
            entry.on_gpu = True
            entry.loads += 1
            entry.load_seconds.append(seconds)
            if not entry.registered and not entry.bound:
                self._forget_if_unused(entry)
                return False
            return True

    def failed(self, entry: Entry, error: str) -> None:
        """A load failed: the slot is freed and the error kept. A pinned entry is not sent
        for again by itself (it would reread a broken file at every step); the next request
        that wants it tries again."""
        with self.lock:
            entry.error = error
            self._free_slot(entry)
            self.unplaced_pins.discard(entry)
            self._forget_if_unused(entry)

    # ------------------------------------------------------------------ host tier
    def _host_entries(self) -> list[Entry]:
        return [e for e in (*self.entries.values(), *self.retired) if e.adapter is not None]

    @property
    def host_used(self) -> int:
        with self.lock:
            return sum(e.nbytes for e in self._host_entries())

    def _keep(self, entry: Entry, adapter, packed=None) -> None:
        entry.adapter, entry.packed = adapter, packed
        self._tick += 1
        entry.host_used = self._tick
        over = self.host_used - self.host_bytes
        for e in sorted(self._host_entries(), key=lambda e: e.host_used):
            if over <= 0:
                break
            # a replaced version that requests still need keeps its copy: its directory
            # may hold the new version's files by now
            needed = not e.registered and (e.bound or e.users)
            if e is not entry and e.path is not None and not needed:
                e.adapter = e.packed = None
                over -= e.nbytes
