"""The engine on a tiny float32 model on the CPU, against the offline generator run alone.

`jlora.generate.generate` (dense KV cache, one request at a time) is the oracle: every
request served in a busy, preempting, cancelling engine must produce exactly its tokens.
"""

import asyncio
import dataclasses

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
