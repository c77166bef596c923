"""Many more adapters than GPU slots, on a tiny float32 model on the CPU.

1,000 adapters registered from disk, 8 GPU slots, a host tier that holds a few dozen:
200 concurrent requests over 300 of them all finish with exactly the tokens the offline
generator gives each one alone, while adapters move between disk, host and GPU under them.
"""

import time
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.bank import AdapterBank, slot_bytes
from jlora.config import preset
from jlora.formats.native import read_adapter, write_native
from jlora.generate import generate
from jlora.loader import Model
from jlora.model import init_params
from jlora.sampling import SamplingParams
from serving.adapter_store import UnknownAdapter
from serving.engine import Engine, EngineConfig
from tests.helpers import random_lora_adapter, random_tied_adapter

N_ADAPTERS, N_SLOTS, RANK = 1000, 8, 4
CFG = preset("tiny").replace(max_seq_len=64)
CONFIG = EngineConfig(max_seqs=16, page_size=8, num_pages=80, prefill_budget=64, piece=8,
                      decode_buckets=(0, 4, 16), prefill_buckets=(0, 16, 64), impl="xla",
                      max_loras=N_SLOTS, max_lora_rank=RANK)


def make_adapter(i: int, seed: int | None = None):
    seed = i if seed is None else seed
    if i % 10 == 5:
        return random_tied_adapter(CFG, f"ad{i}", RANK, seed=seed, targets=("q", "v"))
    variant = "dora" if i % 10 == 0 else "lora"
    return random_lora_adapter(CFG, f"ad{i}", RANK, seed=seed, variant=variant,
                               targets=("q", "v", "down"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i in range(N_ADAPTERS):
        write_native(make_adapter(i), root / f"ad{i}")
    params = init_params(CFG, jax.random.key(5), jnp.float32)
    params = jax.tree.map(lambda w: w * 4 if w.ndim == 2 else w, params)  # less uniform
    return root, params


class Oracle:
    """The offline generator with a one-slot bank: each request run alone with its adapter."""

    def __init__(self, params):
        self.model = Model(CFG, params, None, "oracle")
        self.model.bank = AdapterBank(CFG, 2, RANK, jnp.float32)

    def __call__(self, prompt, params, adapter):
        if adapter is not None:
            self.model.bank.load(adapter, self.model.params, slot=1)
        name = adapter.name if adapter is not None else None
        return generate(self.model, [prompt], params, chat=False, impl="xla",
                        adapters=[name])[0]


def test_slot_bytes_is_what_a_slot_adds_to_the_bank():
    small, big = (AdapterBank(CFG, n, RANK, jnp.bfloat16).nbytes() for n in (2, 12))
    tables = 2 * CFG.n_layers * 4 * 4 * 7 * 64   # generous: per-slot table columns
    assert 0 <= (big - small) - 10 * slot_bytes(CFG, RANK, jnp.bfloat16) <= 10 * tables


def random_params(rng):
    p = SamplingParams(max_tokens=int(rng.integers(1, 8)), ignore_eos=True,
                       seed=int(rng.integers(2**31)))
    return p if rng.integers(2) else p.replace(temperature=0.9, top_k=20)


def test_thousand_adapters_eight_slots(setup):
    root, params = setup
    ad1 = read_adapter(root / "ad1", CFG.n_layers)   # the host tier keeps it and its packed rows
    one = ad1.nbytes() + AdapterBank(CFG, 2, RANK, jnp.float32).pack(ad1, params, RANK).nbytes
    host_budget = 40 * one
    eng = Engine(Model(CFG, params, None, "tiny"),
                 replace(CONFIG, adapter_dir=str(root), host_lora_gb=host_budget / 1e9))
    assert len(eng.adapters.list()) == N_ADAPTERS
    rng = np.random.default_rng(0)
    used = rng.choice(N_ADAPTERS, 300, replace=False)
    n = 200
    names = [None if k % 25 == 0 else f"ad{used[rng.integers(300)]}" for k in range(n)]
    prompts = [rng.integers(3, CFG.vocab_size, rng.integers(1, 12)).tolist() for _ in range(n)]
    sampling = [random_params(rng) for _ in range(n)]

    writes = []   # instrumentation: every slot write, and who held that slot meanwhile
    put = eng.bank.put

    def checked_put(adapter, slot, data):
        writes.append([r.request_id for r in eng.scheduler.running if r.slot == slot])
        put(adapter, slot, data)
    eng.bank.put = checked_put

    compiles = []
    listener = lambda event, secs, **kw: compiles.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        streams = [eng.submit(p, s, adapter=a) for p, s, a in zip(prompts, sampling, names)]
        while eng.step():
            assert eng.adapters.cache.host_used <= host_budget
            assert len(eng.adapters.cache.slots) <= N_SLOTS
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        eng.close()
    assert "/jax/core/compile/backend_compile_duration" not in compiles
    assert len(writes) > 100 and not any(writes), "a slot was written under a running request"

    oracle = Oracle(params)
    for i in range(n):
        got = streams[i].result(timeout=0)
        adapter = read_adapter(root / names[i], CFG.n_layers, names[i]) if names[i] else None
        ref = oracle(prompts[i], sampling[i], adapter)
        assert (got.token_ids, got.finish_reason) == (ref.token_ids, ref.finish_reason), i
        assert np.allclose(got.logprobs, ref.logprobs, atol=1e-4), i
    snap = eng.metrics.snapshot()
    assert snap["adapter_evictions"] > 100 and snap["max_loras"] == N_SLOTS
    assert sum(a["loads"] for a in snap["adapters"].values()) >= len(set(names) - {None})
    assert eng.pages.num_free == eng.pages.capacity   # no page leaked
    assert all(e.users == 0 and e.bound == 0 for e in eng.adapters.cache.entries.values())


def test_replace_unload_and_failed_loads_while_serving(setup, tmp_path):
    root, params = setup
    eng = Engine(Model(CFG, params, None, "tiny"), replace(CONFIG, max_loras=2))
    try:
        v1, v2 = make_adapter(7), make_adapter(7, seed=1234)
        for i in (1, 2, 3):
            eng.adapters.load(f"ad{i}", root / f"ad{i}")
        eng.adapters.load("x", v1)
        with pytest.raises(ValueError, match="'x' is already loaded"):
            eng.adapters.load("x", v2)
        greedy = SamplingParams(max_tokens=6, ignore_eos=True)
        first = eng.submit([5, 6, 7], greedy, adapter="x")
        for _ in range(4):
            eng.step()
        eng.adapters.load("x", v2, replace=True)                 # first keeps v1
        second = eng.submit([5, 6, 7], greedy, adapter="x")      # v2
        waiting = eng.submit([9, 9], greedy, adapter="ad2")
        eng.adapters.unload("ad2")                               # still served to `waiting`
        with pytest.raises(UnknownAdapter, match="'ad2' is not loaded"):
            eng.submit([9, 9], greedy, adapter="ad2")
        # a broken file: ad3 must be read from disk again, and its file is now corrupt
        broken = tmp_path / "ad3"
        write_native(make_adapter(3), broken)
        eng.adapters.load("bad", broken)
        eng.adapters.cache.get("bad").adapter = None             # as if the host tier let go
        (broken / "adapter.safetensors").write_bytes(b"not safetensors")
        doomed = eng.submit([4, 4], greedy, adapter="bad")
        fine = eng.submit([4, 4], greedy, adapter="ad1")
        eng.run_until_idle()
        oracle = Oracle(params)
        assert first.result().token_ids == oracle([5, 6, 7], greedy, v1).token_ids
        assert second.result().token_ids == oracle([5, 6, 7], greedy, v2).token_ids
        assert first.result().token_ids != second.result().token_ids
        ad2 = read_adapter(root / "ad2", CFG.n_layers, "ad2")
        assert waiting.result().token_ids == oracle([9, 9], greedy, ad2).token_ids
        out = doomed.result()
        assert out.finish_reason == "error" and "'bad' failed to load" in out.error
        ad1 = read_adapter(root / "ad1", CFG.n_layers, "ad1")
        assert fine.result().token_ids == oracle([4, 4], greedy, ad1).token_ids
        info = eng.adapters.info("x")
        assert (info.version, info.variant, info.rank, info.source) == (2, "lora", RANK, "memory")
        assert eng.adapters.cache.retired == []                  # old versions let go
    finally:
        eng.close()


def test_pinned_adapter_stays_and_bad_input_is_refused(setup):
    root, params = setup
    eng = Engine(Model(CFG, params, None, "tiny"), replace(CONFIG, max_loras=2))
    try:
        eng.adapters.load("pinned", root / "ad1", pin=True)
        for i in (2, 3, 4):
            eng.adapters.load(f"ad{i}", root / f"ad{i}")
        p = SamplingParams(max_tokens=2)
        eng.generate([[3]] * 3, p, adapters=["ad2", "ad3", "ad4"])
        eng.adapters.wait_idle()
        eng.step()                                  # takes in the last finished load
        assert eng.adapters.info("pinned").residency == "gpu"
        assert eng.adapters.info("pinned").loads == 1   # loaded once, never evicted
        with pytest.raises(ValueError, match="cannot pin 'p2': 1 of the 2 adapter slots"):
            eng.adapters.load("p2", root / "ad2", pin=True)
        with pytest.raises(ValueError, match="rank 8 exceeds the configured maximum rank 4"):
            eng.adapters.load("big", random_lora_adapter(CFG, "big", 8))
        with pytest.raises(FileNotFoundError, match="does not exist"):
            eng.adapters.load("nowhere", root / "missing")
        with pytest.raises(ValueError, match="adapter name 'a=b' must be"):
            eng.adapters.load("a=b", root / "ad1")
        with pytest.raises(ValueError, match="source 7 must be a directory path or an Adapter"):
            eng.adapters.load("seven", 7)
        with pytest.raises(ValueError, match="host_lora_gb=-1 must be >= 0"):
            Engine(Model(CFG, params, None, "tiny"), replace(CONFIG, host_lora_gb=-1))
        with pytest.raises(ValueError, match="give max_loras=8 or lora_memory_gb=1.0"):
            Engine(Model(CFG, params, None, "tiny"), replace(CONFIG, lora_memory_gb=1.0))
        with pytest.raises(ValueError, match=r"lora_memory_gb=1e-09 holds no adapter slot of "
                                             r"rank 4 \(\d+ bytes each\)"):
            Engine(Model(CFG, params, None, "tiny"),
                   replace(CONFIG, max_loras=0, lora_memory_gb=1e-9))
    finally:
        eng.close()


def test_slots_of_several_rank_capacities_serve_mixed_ranks(setup):
    """Slots of rank capacity 2, 4, 4 and 8: adapters of rank 2-8 (LoRA, DoRA, Tied-LoRA)
    give the outputs of a uniform bank, in less memory."""
    _, params = setup
    eng = Engine(Model(CFG, params, None, "tiny"),
                 replace(CONFIG, max_loras=0, max_lora_rank=8, lora_slot_ranks=(2, 4, 4, 8)))
    uniform = AdapterBank(CFG, 5, 8, jnp.float32).nbytes()   # 4 slots of rank 8
    saved = (4 * 8 - (2 + 4 + 4 + 8)) * slot_bytes(CFG, 1, jnp.float32)
    assert eng.bank.nbytes() == uniform - saved
    rng = np.random.default_rng(1)
    adapters = {}
    for i in range(12):
        rank = (2, 4, 8)[i % 3]
        if i % 4 == 1:
            a = random_tied_adapter(CFG, f"m{i}", rank, seed=100 + i, targets=("q", "v"))
        else:
            a = random_lora_adapter(CFG, f"m{i}", rank, seed=100 + i,
                                    variant="dora" if i % 4 == 2 else "lora",
                                    targets=("q", "k", "o", "up"))
        adapters[a.name] = a
        eng.adapters.load(a.name, a)
    try:
        names = [f"m{rng.integers(12)}" for _ in range(40)]
        prompts = [rng.integers(3, CFG.vocab_size, rng.integers(1, 10)).tolist() for _ in names]
        sampling = [random_params(rng) for _ in names]
        outs = eng.generate(prompts, sampling, adapters=names)
    finally:
        eng.close()
    oracle = Oracle(params)
    oracle.model.bank = AdapterBank(CFG, 2, 8, jnp.float32)
    for out, prompt, sp, name in zip(outs, prompts, sampling, names):
        ref = oracle(prompt, sp, adapters[name])
        assert (out.token_ids, out.finish_reason) == (ref.token_ids, ref.finish_reason), name
    used = {e.name: e for e in eng.adapters.cache.entries.values()}
    assert all(eng.bank.slot_ranks[s] >= used[a.name].rank for s, a in eng.bank.adapters.items())


def test_scan_prepares_in_parallel_and_stops_at_the_first_bad_adapter(setup, tmp_path):
    """scan() reads and packs several adapters at once but registers them in name order; a
    corrupt one raises naming its file, after the ones before it are registered."""
    root, params = setup
    for i in range(7):
        write_native(make_adapter(i), tmp_path / f"s{i}")
    (tmp_path / "s4" / "adapter.safetensors").write_bytes(b"not safetensors")
    eng = Engine(Model(CFG, params, None, "tiny"), CONFIG)
    try:
        with pytest.raises(ValueError, match="s4"):
            eng.adapters.scan(tmp_path, workers=3)
        assert sorted(a.name for a in eng.adapters.list()) == ["s0", "s1", "s2", "s3"]
        info = eng.adapters.info("s2")
        assert (info.variant, info.rank) == (make_adapter(2).variant, RANK)
        greedy = SamplingParams(max_tokens=5, ignore_eos=True)
        got = eng.generate([[5, 6, 7]], greedy, adapters=["s2"])[0]
    finally:
        eng.close()
    ref = Oracle(params)([5, 6, 7], greedy, read_adapter(tmp_path / "s2", CFG.n_layers, "s2"))
    assert got.token_ids == ref.token_ids


def test_host_tier_rows_are_pinned_or_pageable_as_configured(setup):
    """host_lora_memory="pinned" (the default) keeps each adapter's packed rows in pinned
    host memory, "pageable" in numpy; both serve the same tokens, and another value is
    refused by name."""
    _, params = setup
    prompts, sampling = [[5, 6, 7, 8], [9, 10]], SamplingParams(max_tokens=5, ignore_eos=True)
    outputs = {}
    for memory in ("pinned", "pageable"):
        eng = Engine(Model(CFG, params, None, "tiny"),
                     replace(CONFIG, max_loras=1, host_lora_memory=memory))
        for i in (1, 2):   # two adapters, one slot: the second load replaces the first
            eng.adapters.load(f"ad{i}", make_adapter(i))
        rows = eng.adapters.cache.get("ad1").packed.rows
        if memory == "pinned":
            assert rows.sharding.memory_kind == "pinned_host"
        else:
            assert isinstance(rows, np.ndarray)
        outputs[memory] = [o.token_ids for o in eng.generate(prompts, sampling, ["ad1", "ad2"])]
        eng.close()
    assert outputs["pinned"] == outputs["pageable"]
    with pytest.raises(ValueError, match="host_lora_memory='gpu' is not one of"):
        Engine(Model(CFG, params, None, "tiny"), replace(CONFIG, host_lora_memory="gpu"))


def test_loop_waits_instead_of_spinning_while_requests_wait_for_a_load(setup):
    """With nothing runnable but a request whose adapter is loading, the engine's loop
    sleeps until the load finishes (the loader wakes it) rather than planning empty steps
    back to back: that spinning held the GIL the loader thread needed, and made the first
    load after an idle spell ~6x slower on the GPU machine."""
    _, params = setup
    eng = Engine(Model(CFG, params, None, "tiny"), replace(CONFIG, max_loras=1))
    eng.adapters.load("ad1", make_adapter(1))
    bank, slot_data = eng.adapters.bank, eng.adapters.bank.slot_data

    def slow_slot_data(*args):   # a load that takes 0.5 s
        time.sleep(0.5)
        return slot_data(*args)
    bank.slot_data = slow_slot_data
    eng.start()
    try:
        steps = len(eng.metrics.host_phases)
        out = eng.submit([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True),
                         adapter="ad1").result(timeout=60)
        steps = len(eng.metrics.host_phases) - steps
    finally:
        eng.close()
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    # ~10 wake-ups of the 50 ms idle wait during the load, then ~6 steps to generate 4
    # tokens; a spinning loop plans thousands of empty steps in 0.5 s
    assert steps < 40, f"{steps} steps while one request waited 0.5 s for its adapter"


def test_retrained_in_place_then_replaced(setup, tmp_path):
    """The usual flow: new files written over the adapter's directory, then replace=True.
    A request accepted before the replace finishes with the old version when a copy of it is
    left (in memory), and ends with an error naming the cause when none is (its slot went
    and the host tier let go): never with the new files under the old version's name."""
    root, params = setup
    eng = Engine(Model(CFG, params, None, "tiny"), replace(CONFIG, max_loras=1))
    try:
        v1, v2 = make_adapter(11), make_adapter(11, seed=99)
        greedy = SamplingParams(max_tokens=6, ignore_eos=True)
        eng.adapters.load("ad1", root / "ad1")
        outcomes = []
        for keep_copy in (True, False):
            d = tmp_path / f"x{keep_copy}"
            write_native(v1, d)
            eng.adapters.load("x", d, replace=True)
            hog = eng.submit([3, 4], SamplingParams(max_tokens=30, ignore_eos=True),
                             adapter="ad1")
            for _ in range(3):
                eng.step()                          # ad1 holds the only slot
            old = eng.submit([5, 6, 7], greedy, adapter="x")   # bound to v1, waiting
            eng.step()
            if not keep_copy:
                eng.adapters.cache.get("x").adapter = None     # as if the host tier let go
            time.sleep(0.01)                        # a new mtime, whatever the clock's grain
            write_native(v2, d)
            eng.adapters.load("x", d, replace=True)
            new = eng.submit([5, 6, 7], greedy, adapter="x")
            eng.run_until_idle()
            assert hog.result().finish_reason == "length"
            outcomes.append((old.result(), new.result()))
        oracle = Oracle(params)
        want_v1 = oracle([5, 6, 7], greedy, v1).token_ids
        want_v2 = oracle([5, 6, 7], greedy, v2).token_ids
        (kept, new_kept), (lost, new_lost) = outcomes
        assert kept.token_ids == want_v1 != want_v2
        assert lost.finish_reason == "error" and "its files changed" in lost.error
        assert new_kept.token_ids == new_lost.token_ids == want_v2
    finally:
        eng.close()
