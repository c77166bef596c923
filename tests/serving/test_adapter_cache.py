"""The adapter tiers' policy (host only): slots, eviction, draining, pins, versions, host LRU."""

from pathlib import Path

import pytest

from serving.adapter_cache import AdapterCache, Entry, UnknownAdapter


def entry(name, nbytes=100, path="disk", adapter=None, pinned=False, rank=8):
    return Entry(name=name, version=1, path=Path(path) / name if path else None,
                 variant="lora", rank=rank, targets=("q",), nbytes=nbytes, adapter=adapter,
                 pinned=pinned)


def loaded(cache, e):
    """Run the loader's part for e: reserve, load, mark written."""
    assert cache.want(e)
    assert cache.next_job(timeout=0) is e
    assert cache.loaded(e, 0.001)
    assert cache.ready(e)


def test_slots_fill_then_least_recently_used_idle_is_evicted():
    cache = AdapterCache(n_slots=2, host_bytes=10_000)
    a, b, c = (entry(n) for n in "abc")
    for e in (a, b, c):
        cache.register(e)
    loaded(cache, a)
    loaded(cache, b)
    cache.acquire(b)           # b is used last...
    cache.release(b)
    cache.acquire(a)           # ...then a, still running
    loaded(cache, c)           # evicts b: a is in use
    assert (a.residency, b.residency, c.residency) == ("gpu", "disk", "gpu")
    assert cache.evictions == 1 and c.slot == 2


def test_in_use_slots_are_drained_never_evicted():
    cache = AdapterCache(n_slots=2, host_bytes=10_000)
    a, b, c = (entry(n) for n in "abc")
    for e in (a, b, c):
        cache.register(e)
    loaded(cache, a)
    loaded(cache, b)
    cache.acquire(a)
    cache.acquire(a)
    cache.acquire(b)           # b has fewer users: it is the one drained
    cache.begin_step()
    assert not cache.want(c)
    cache.end_step()
    assert b.draining and not cache.ready(b) and cache.ready(a)
    assert b.residency == "gpu"                     # still serving its running request
    cache.release(b)
    cache.begin_step()
    assert cache.want(c) and c.slot == 2            # b's slot, once b was idle
    cache.end_step()
    assert b.residency == "disk" and not b.draining


def test_prefetch_does_not_evict_adapters_waiting_requests_need():
    cache = AdapterCache(n_slots=1, host_bytes=10_000)
    a, b = entry("a"), entry("b")
    cache.register(a)
    cache.register(b)
    loaded(cache, a)
    cache.bind("a")                                 # a request waits for a
    assert not cache.want(b, evict_wanted=False)    # prefetch leaves a alone
    assert cache.want(b)                            # the scheduler's turn for b may evict it


def test_replace_keeps_the_old_version_for_its_requests():
    cache = AdapterCache(n_slots=2, host_bytes=10_000)
    old = entry("a")
    cache.register(old)
    loaded(cache, old)
    bound = cache.bind("a")
    cache.acquire(bound)
    new = entry("a")
    with pytest.raises(ValueError, match="'a' is already loaded .* replace=True"):
        cache.register(new)
    cache.register(new, replace=True)
    assert cache.get("a") is new and new.version == 2 and bound is old
    assert old.residency == "gpu" and old in cache.retired
    cache.release(old)
    cache.unbind(old)                               # its last request finished: gone
    assert old.slot is None and old not in cache.retired and 1 not in cache.slots


def test_unregister_and_unknown_names():
    cache = AdapterCache(n_slots=1, host_bytes=10_000)
    cache.register(entry("a"))
    cache.unregister("a")
    with pytest.raises(UnknownAdapter, match=r"adapter 'a' is not loaded; loaded: none"):
        cache.bind("a")
    with pytest.raises(UnknownAdapter, match="'zz' is not loaded"):
        cache.unregister("zz")


def test_pins_leave_a_slot_for_the_others():
    cache = AdapterCache(n_slots=3, host_bytes=10_000)
    cache.register(entry("a", pinned=True))
    cache.register(entry("b", pinned=True))
    with pytest.raises(ValueError, match="cannot pin 'c': 2 of the 3 adapter slots"):
        cache.register(entry("c", pinned=True))
    a = cache.get("a")
    loaded(cache, a)
    for name in "xyz":
        e = entry(name)
        cache.register(e)
        cache.want(e)
    assert a.slot is not None and a.residency == "gpu"   # never evicted


def test_host_tier_is_lru_by_bytes():
    cache = AdapterCache(n_slots=1, host_bytes=250)
    es = [entry(n, nbytes=100) for n in "abcd"]
    for e in es:
        cache.register(e)
        cache.keep_host(e, object())
        assert cache.host_used <= 250
    assert [e.residency for e in es] == ["disk", "disk", "host", "host"]
    cache.keep_host(es[0], object())                 # read again: the oldest (c) goes
    assert [e.residency for e in es] == ["host", "disk", "disk", "host"]
    memory = entry("m", nbytes=300, path=None, adapter=object())
    with pytest.raises(ValueError, match="does not fit the host adapter budget of 250"):
        cache.register(memory)                       # nothing could make room for it


def test_drain_holds_through_steps_without_wants():
    """Steps that make no want (rows full) must not lift the drain, or the adapter that
    asked for a slot could wait for ever."""
    cache = AdapterCache(n_slots=1, host_bytes=10_000)
    a, b = entry("a"), entry("b")
    cache.register(a)
    cache.register(b)
    loaded(cache, a)
    cache.acquire(a)
    cache.begin_step()
    assert not cache.want(b)
    cache.end_step()
    for _ in range(3):                               # no admissions: nobody wants anything
        cache.begin_step()
        cache.end_step()
    assert a.draining and not cache.ready(a)
    cache.release(a)
    cache.begin_step()
    assert cache.want(b)
    cache.end_step()
    assert b.slot == 1 and a.residency == "disk"


def test_slots_of_several_rank_capacities():
    cache = AdapterCache(n_slots=3, host_bytes=10_000, slot_ranks=(4, 16, 8))
    small, mid, big = entry("small"), entry("mid"), entry("big")
    small.rank, mid.rank, big.rank = 4, 8, 16
    for e in (small, mid, big):
        cache.register(e)
    loaded(cache, big)
    loaded(cache, small)
    assert (big.slot, small.slot) == (2, 1)      # each in the least capacity that holds it
    cache.acquire(small)
    loaded(cache, mid)                           # the 8 slot: free, and the smallest fit
    assert mid.slot == 3
    cache.acquire(mid)
    other = entry("other")
    other.rank = 16
    cache.register(other)
    cache.begin_step()
    assert cache.want(other) and other.slot == 2   # evicts big: the only idle slot that fits
    cache.end_step()
    huge = entry("huge")
    huge.rank = 32
    with pytest.raises(ValueError, match="'huge' has rank 32; the largest adapter slot holds "
                                         "rank 16"):
        cache.register(huge)


def test_the_only_slot_cannot_be_pinned():
    cache = AdapterCache(n_slots=1, host_bytes=10_000)
    with pytest.raises(ValueError, match="cannot pin 'a': 0 of the 1 adapter slots are pinned "
                                         "already, and one must stay free"):
        cache.register(entry("a", pinned=True))


def test_a_failed_pinned_load_is_not_sent_for_again_by_itself():
    """It would reread a broken file at every step (and keep the engine's loop from ever
    waiting); its error stays visible, and a request that wants it tries again."""
    cache = AdapterCache(n_slots=2, host_bytes=10_000)
    p = entry("p", pinned=True)
    cache.register(p)
    assert p in cache.unplaced_pins and cache.want(p) and cache.next_job(timeout=0) is p
    cache.failed(p, "broken")
    assert p not in cache.unplaced_pins and p.residency == "disk" and p.error == "broken"
    assert cache.want(p) and p.residency == "loading"


def test_a_replaced_version_still_needed_keeps_its_host_copy():
    """Its directory may hold the new version's files by now: the copy in memory is the
    only old one left, so the host LRU passes it over until its requests are done."""
    cache = AdapterCache(n_slots=1, host_bytes=250)
    old = entry("x")
    cache.register(old)
    cache.keep_host(old, object())
    cache.bind("x")                                  # a request accepted before the replace
    cache.register(entry("x"), replace=True)
    for name in "ab":
        e = entry(name)
        cache.register(e)
        cache.keep_host(e, object())
    assert old.residency == "host" and cache.get("a").residency == "disk"   # a went instead
    cache.unbind(old)                                # its request is done: let go
    assert old not in cache.retired


def test_pins_leave_a_slot_of_the_largest_rank():
    """Slots of ranks 4 and 8: a small pinned adapter takes the small slot (its idle
    occupant goes) rather than the only rank-8 one, and a rank-8 pin is refused, so
    adapters of rank 8 always have a slot."""
    cache = AdapterCache(n_slots=2, host_bytes=10_000, slot_ranks=(4, 8))
    a = entry("a", rank=4)
    cache.register(a)
    loaded(cache, a)
    assert a.slot == 1
    with pytest.raises(ValueError, match="cannot pin 'q': its rank 8 needs one of the slots "
                                         "of rank 8, and one of those must stay free"):
        cache.register(entry("q", rank=8, pinned=True))
    p = entry("p", rank=2, pinned=True)
    cache.register(p)
    loaded(cache, p)
    assert (p.slot, a.slot) == (1, None)
    big = entry("big", rank=8)
    cache.register(big)
    loaded(cache, big)
    assert big.slot == 2
