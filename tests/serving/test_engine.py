"""The engine on a tiny float32 model on the CPU, against the offline generator run alone.

`jlora.generate.generate` (dense KV cache, one request at a time) is the oracle: every
request served in a busy, preempting, cancelling engine must produce exactly its tokens.
"""

import asyncio
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.config import preset
from jlora.formats.gguf_file import read_gguf
from jlora.generate import generate
from jlora.loader import Model, embedded_model_path, load_adapter
from jlora.model import init_params
from jlora.sampling import SamplingParams
from jlora.tokenizer import Tokenizer
from pallas_kernels.lora import LoraBlocks
from serving.engine import Engine, EngineConfig, QueueFull
from serving.request import RequestOutput, RequestStream
from tests.helpers import random_lora_adapter, random_tied_adapter

ADAPTERS = (None, "lora8", "lora16", "dora", "tied")
# Small pools force preemption; few buckets keep compilation short (8 programs).
CONFIG = EngineConfig(max_seqs=8, page_size=8, num_pages=25, prefill_budget=32, piece=8,
                      decode_buckets=(0, 2, 8), prefill_buckets=(0, 16, 32), impl="xla")


class Clock:
    """The engine's clock, advanced by the test: deadlines become step counts."""
    t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture(scope="module")
def model():
    _, meta = read_gguf(embedded_model_path())
    cfg = preset("tiny").replace(vocab_size=49152, max_seq_len=64, eos_token_ids=(2,))
    params = init_params(cfg, jax.random.key(3), jnp.float32)
    params = jax.tree.map(lambda w: w * 4 if w.ndim == 2 else w, params)  # less uniform
    m = Model(cfg, params, Tokenizer.from_gguf_metadata(meta), "tiny+smollm2-tokenizer")
    load_adapter(m, random_lora_adapter(cfg, "lora8", 8, seed=1), max_loras=4, max_lora_rank=16)
    load_adapter(m, random_lora_adapter(cfg, "lora16", 16, seed=2))
    load_adapter(m, random_lora_adapter(cfg, "dora", 8, seed=3, variant="dora"))
    load_adapter(m, random_tied_adapter(cfg, "tied", 8, seed=4))
    return m


@pytest.fixture
def engine(model):
    clock = Clock()
    return Engine(model, CONFIG, clock=clock), clock


def alone(model, prompt, params, adapter):
    return generate(model, [prompt], params, chat=False, impl="xla", adapters=[adapter])[0]


def random_params(rng):
    kind = rng.integers(4)
    base = SamplingParams(max_tokens=int(rng.integers(1, 24)), ignore_eos=bool(rng.integers(2)),
                          seed=int(rng.integers(2**32)))
    if kind == 0:
        return base
    base = base.replace(temperature=float(rng.uniform(0.6, 1.4)))
    return base.replace(top_p=0.9) if kind == 2 else base.replace(top_k=40) if kind == 3 \
        else base


def test_workload_matches_requests_run_alone(model, engine):
    eng, clock = engine
    rng = np.random.default_rng(0)
    n = 72
    prompts = [rng.integers(3, 49152, rng.integers(1, 40)).tolist() for _ in range(n)]
    params = [random_params(rng) for _ in range(n)]
    adapters = [ADAPTERS[i] for i in rng.integers(len(ADAPTERS), size=n)]
    arrive = rng.integers(0, 40, n)
    cancel_at = {int(i): int(arrive[i] + rng.integers(0, 12)) for i in rng.choice(n, 6, False)}
    timeouts = {int(i): float(rng.integers(2, 10)) for i in rng.choice(n, 4, False)
                if int(i) not in cancel_at}

    compiles = []
    listener = lambda event, secs, **kw: compiles.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        streams, step = {}, 0
        while step <= 40 or eng.step():
            for i in np.flatnonzero(arrive == step):
                streams[i] = eng.submit(prompts[i], params[i], adapter=adapters[i],
                                        timeout=timeouts.get(int(i)))
            for i, at in cancel_at.items():
                if at == step:
                    eng.cancel(streams[i].request_id)
            if step <= 40:
                eng.step()
            step += 1
            clock.t += 1
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert "/jax/core/compile/backend_compile_duration" not in compiles

    reasons = {}
    for i in range(n):
        got, ref = streams[i].result(timeout=0), alone(model, prompts[i], params[i], adapters[i])
        reasons[got.finish_reason] = reasons.get(got.finish_reason, 0) + 1
        if got.finish_reason in ("cancelled", "deadline"):
            assert got.token_ids == ref.token_ids[:len(got.token_ids)], i
        else:
            assert (got.token_ids, got.finish_reason) == (ref.token_ids, ref.finish_reason), i
            assert np.allclose(got.logprobs, ref.logprobs, atol=1e-4)
    m = eng.metrics.snapshot()
    assert m["preemptions"] > 0, "the workload should have run out of pages"
    assert reasons.get("cancelled", 0) + reasons.get("deadline", 0) >= 4, reasons
    assert eng.pages.num_free == eng.pages.capacity and not eng.pages.tables   # no leaks
    assert m["finished"] == reasons and len(m["ttft"]) == sum(
        1 for i in range(n) if streams[i].result().token_ids)


def test_streamed_text_equals_offline_text_with_stop_strings(model, engine):
    eng, _ = engine
    p = SamplingParams(max_tokens=20, ignore_eos=True)
    free = alone(model, "Once upon a time", p, None)
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    ref = alone(model, "Once upon a time", p.replace(stop=(stop,)), None)
    stream = eng.submit("Once upon a time", p.replace(stop=(stop,)), chat=False)
    eng.run_until_idle()
    outs = list(stream)
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    assert "".join(o.text for o in outs) == ref.text == free.text[:free.text.index(stop)]
    assert [t for o in outs for t in o.token_ids] == ref.token_ids


def test_background_loop_and_async_streams(model, engine):
    eng, _ = engine
    eng.clock = __import__("time").monotonic
    p = SamplingParams(max_tokens=10, temperature=0.9, seed=3, ignore_eos=True)

    async def collect(prompt, adapter):
        outs = [o async for o in eng.submit(prompt, p, adapter=adapter)]
        return [t for o in outs for t in o.token_ids], outs[-1]

    async def main():
        return await asyncio.gather(*(collect([5 + i, 6, 7], a) for i, a in
                                      enumerate(ADAPTERS)))

    eng.start()
    try:
        results = asyncio.run(main())
    finally:
        eng.stop()
    for i, (a, (ids, last)) in enumerate(zip(ADAPTERS, results)):
        assert last.finished and last.finish_reason == "length"
        assert ids == alone(model, [5 + i, 6, 7], p, a).token_ids


def test_freeze_gc_moves_the_start_up_heap_out_of_the_collector(model):
    """freeze_gc: start() leaves the objects built so far to the permanent generation (full
    collections then scan only what serving allocates); serving gives the same tokens."""
    import gc
    eng = Engine(model, dataclasses.replace(CONFIG, freeze_gc=True))
    gc.unfreeze()
    before = gc.get_freeze_count()
    eng.start()
    try:
        assert gc.get_freeze_count() > max(before, 10_000)   # the compiled engine, at least
        p = SamplingParams(max_tokens=6, ignore_eos=True)
        out = eng.submit([5, 6, 7], p, adapter="lora8").result(timeout=120)
    finally:
        eng.stop()
        gc.unfreeze()          # later tests' garbage must stay collectable
    assert out.token_ids == alone(model, [5, 6, 7], p, "lora8").token_ids


def test_cancel_frees_pages_at_once_and_spares_the_others(model, engine):
    eng, _ = engine
    p = SamplingParams(max_tokens=30, ignore_eos=True)
    a, b = eng.submit([4, 5, 6], p), eng.submit([7, 8, 9], p)
    for _ in range(5):
        eng.step()
    eng.cancel(a.request_id)
    eng.step()
    assert a.finished and a.result().finish_reason == "cancelled"
    assert set(eng.pages.tables) == {r for r in eng.scheduler.running}
    eng.run_until_idle()
    assert b.result().token_ids == alone(model, [7, 8, 9], p, None).token_ids
    assert eng.pages.num_free == eng.pages.capacity


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=""), "empty"),
    (dict(prompt=[1, 2, 10**6]), "outside the vocabulary"),
    (dict(adapter="nope"), "'nope' is not loaded"),
    (dict(params=SamplingParams(max_tokens=60)), "exceeds the context of 64"),
    (dict(timeout=-1), "timeout=-1"),
    (dict(timeout=True), "timeout=True"),
    (dict(prompt=[True, 5]), r"\[True\] are outside the vocabulary"),
    (dict(request_id=7), "request_id=7 must be a non-empty string"),
])
def test_bad_requests_are_refused_and_others_finish(model, engine, kwargs, match):
    eng, _ = engine
    ok = eng.submit([4, 5, 6], SamplingParams(max_tokens=4))
    eng.step()
    args = dict(prompt=[1, 2, 3, 4, 5, 6, 7], params=SamplingParams(max_tokens=4)) | kwargs
    with pytest.raises(ValueError, match=match):
        eng.submit(args.pop("prompt"), args.pop("params"), **args)
    eng.run_until_idle()
    assert ok.result().token_ids == alone(model, [4, 5, 6], SamplingParams(max_tokens=4),
                                          None).token_ids


def test_queue_limit(model):
    eng = Engine(model, CONFIG.__class__(**{**CONFIG.__dict__, "max_queue": 2}))
    eng.submit([1, 2], SamplingParams(max_tokens=2))
    eng.submit([1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        eng.submit([1, 2], SamplingParams(max_tokens=2))
    eng.run_until_idle()
    eng.submit([1, 2], SamplingParams(max_tokens=2))     # room again


def test_a_failing_request_ends_alone(model, engine):
    """A detokenization error ends that request with finish_reason "error"; the others in
    the same steps finish as if it had never been there."""
    eng, _ = engine
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    bad, good = eng.submit([4, 5, 6], p), eng.submit([7, 8, 9], p)

    class Broken:
        text = ""

        def push(self, token):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    eng._requests[bad.request_id].decoder = Broken()
    eng.run_until_idle()
    out = bad.result()
    assert out.finish_reason == "error" and "detokenization failed" in out.error
    assert good.result().token_ids == alone(model, [7, 8, 9], p, None).token_ids
    assert eng.pages.num_free == eng.pages.capacity


@pytest.mark.parametrize("lora_kernel", ["split", "fused", "gemm"])
def test_lora_kernel_choice_in_the_engine_matches_xla_generation_alone(lora_kernel):
    """The engine on the Pallas kernels (interpret mode here) with shrink and expand apart or
    fused in one launch, or the base matmul in Pallas adding the adapters' term, on LoRA,
    DoRA and Tied-LoRA with base-model rows in the same steps: the tokens of the offline XLA
    generator run alone. (tests/serving/test_engine_gpu.py runs every kernel choice compiled
    on the GPU.)"""
    from tests.serving.test_sharding import make_model
    model = make_model()
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 512, rng.integers(1, 20)).tolist() for _ in range(6)]
    params = [SamplingParams(max_tokens=int(rng.integers(2, 6)), ignore_eos=True,
                             temperature=float(t), seed=i)
              for i, t in enumerate([0, 0.8, 0, 0.8, 0.8, 0])]
    adapters = [None, "lora", "dora", "tied", "lora", "dora"]
    engine = Engine(model, EngineConfig(max_seqs=4, page_size=16, num_pages=14,
                                        prefill_budget=32, decode_buckets=(0, 4),
                                        prefill_buckets=(0, 32), impl="pallas",
                                        lora_kernel=lora_kernel))
    assert (engine.lora_blocks.fused_tokens, engine.lora_blocks.gemm) == \
        (lora_kernel == "fused", lora_kernel == "gemm")
    for p, sp, a, got in zip(prompts, params, adapters,
                             engine.generate(prompts, params, adapters)):
        ref = generate(model, [p], sp, chat=False, impl="xla", adapters=[a])[0]
        assert got.token_ids == ref.token_ids
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-4)
    with pytest.raises(ValueError, match=r"lora_kernel='bgmv' is not one of \('split', "
                                         r"'fused', 'gemm'\)"):
        Engine(model, EngineConfig(max_seqs=4, num_pages=14, lora_kernel="bgmv"))
    with pytest.raises(ValueError, match=r"lora_blocks must be a LoraBlocks, got "
                                         r"\{'block_n': 128\}"):
        Engine(model, EngineConfig(max_seqs=4, num_pages=14, lora_blocks={"block_n": 128}))
    with pytest.raises(ValueError, match=r"lora_blocks.gemm_groups names \['qkvo'\]; the "
                                         r"projection groups are \('qkv', 'o', 'gate_up', "
                                         r"'down'\)"):
        Engine(model, EngineConfig(max_seqs=4, num_pages=14,
                                   lora_blocks=LoraBlocks(gemm_groups=("qkv", "qkvo"))))
    wide = Model(model.config, model.params, None, "tiny-gqa")
    with pytest.raises(ValueError, match=r"lora_kernel='fused' serves ranks up to 64; this "
                                         r"bank's slots hold rank 128 \(lower max_lora_rank"):
        Engine(wide, EngineConfig(max_seqs=4, num_pages=14, max_loras=2, max_lora_rank=128,
                                  lora_kernel="fused"))


def test_generated_request_ids_skip_those_callers_took(engine):
    eng, _ = engine
    p = SamplingParams(max_tokens=2)
    n = int(eng.submit([4, 5], p).request_id.removeprefix("req-"))
    eng.submit([4, 5], p, request_id=f"req-{n + 1}")
    eng.submit([4, 5], p, request_id=f"req-{n + 2}")
    assert eng.submit([4, 5], p).request_id == f"req-{n + 3}"
    eng.run_until_idle()


def test_a_prompt_given_as_a_generator_is_read_once(model, engine):
    eng, _ = engine
    p = SamplingParams(max_tokens=5, ignore_eos=True)
    stream = eng.submit(iter([4, 5, 6]), p)
    eng.run_until_idle()
    assert stream.result().token_ids == alone(model, [4, 5, 6], p, None).token_ids


def test_a_request_larger_than_the_kv_cache_is_refused(model):
    """One that could never hold its pages, even alone, is refused at submit (it would
    otherwise wait, or preempt itself, forever); one that fits runs."""
    eng = Engine(model, EngineConfig(max_seqs=2, page_size=8, num_pages=5, prefill_budget=16,
                                     piece=8, decode_buckets=(0, 2), prefill_buckets=(0, 16),
                                     impl="xla"))
    prompt = list(range(4, 24))
    with pytest.raises(ValueError, match=r"prompt of 20 tokens \+ max_tokens=30 needs 7 KV "
                                         r"pages of 8 tokens; the cache holds 4 \(num_pages=5"):
        eng.submit(prompt, SamplingParams(max_tokens=30))
    p = SamplingParams(max_tokens=12, ignore_eos=True)   # 32 tokens: the whole cache
    stream = eng.submit(prompt, p)
    eng.run_until_idle()
    assert stream.result().token_ids == alone(model, prompt, p, None).token_ids


def test_held_back_text_is_sent_when_a_request_is_cancelled(model, engine):
    """While a stop string could still start in the last characters they are held back;
    a request that ends otherwise (cancelled here) still gets them in its last output."""
    eng, _ = engine
    p = SamplingParams(max_tokens=20, ignore_eos=True, stop=("#never-in-the-text#",))
    stream = eng.submit("Once upon a time", p, chat=False)
    for _ in range(8):
        eng.step()
    eng.cancel(stream.request_id)
    eng.run_until_idle()
    out = stream.result()
    assert out.finish_reason == "cancelled" and len(out.token_ids) >= 4
    assert out.text == model.tokenizer.decode(out.token_ids)


def test_a_failing_step_ends_every_request_and_the_loop_goes_on(model, engine):
    """An exception inside a step (a bug, a device error) ends the requests then in the
    engine with "error" rather than killing the loop and leaving every stream waiting;
    requests submitted afterwards are served."""
    eng, _ = engine
    eng.clock = time.monotonic
    p = SamplingParams(max_tokens=30, ignore_eos=True)
    a, b = eng.submit([4, 5, 6], p), eng.submit([7, 8, 9], p)
    for _ in range(3):
        eng.step()
    schedule = eng.scheduler.schedule

    def broken():
        eng.scheduler.schedule = schedule   # once
        raise RuntimeError("boom")
    eng.scheduler.schedule = broken
    eng.start()
    try:
        for stream in (a, b):
            out = stream.result(timeout=60)
            assert out.finish_reason == "error" and out.error == \
                "engine step failed: RuntimeError: boom"
        q = SamplingParams(max_tokens=4)
        assert eng.submit([4, 5, 6], q).result(timeout=60).token_ids == \
            alone(model, [4, 5, 6], q, None).token_ids
    finally:
        eng.stop()
    assert eng.pages.num_free == eng.pages.capacity


def test_close_ends_the_requests_left_in_the_engine(engine):
    eng, _ = engine
    p = SamplingParams(max_tokens=30, ignore_eos=True)
    running, queued = eng.submit([4, 5, 6], p), None
    eng.step()
    queued = eng.submit([7, 8, 9], p)
    eng.close()
    assert [s.result(timeout=0).finish_reason for s in (running, queued)] == ["cancelled"] * 2
    assert eng.pages.num_free == eng.pages.capacity


def test_an_async_reader_that_gives_up_leaves_no_waiter_behind():
    """A reader whose wait is cancelled (a timeout) unregisters itself, so the engine's next
    output does not try to wake a closed event loop (which raised in the engine thread)."""
    stream = RequestStream("r")

    async def give_up():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(aiter(stream)), 0.01)
    asyncio.run(give_up())
    assert not stream._waiters
    stream.put(RequestOutput("r", [1], "a", [0.0], True, "stop"))
    assert stream.result(timeout=0).token_ids == [1]
