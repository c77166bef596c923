"""Serving-engine benchmark: decode throughput by batch and adapter mix, and an S-LoRA run.

Decode (`--batch ...`): B sequences are placed in the engine mid-generation at a context of
`--context` tokens (pages allocated, as after their prefill), then the engine's own loop
runs: `Engine.step()` plans, builds the batch, dispatches, reads back the previous step.
Reported per (batch, workload): wall time per step of that loop, tokens/s, the step's bytes
floor (weights + the KV read + the distinct adapters' weights, over the copy bandwidth
measured in this run), and the device idle share: 1 - (the same compiled step dispatched
back to back, with nothing else to do) / (the engine loop's step). Workloads are Punica's:
base (no adapters), Distinct, Uniform (ceil(sqrt(B)) adapters), Skewed (groups of
floor(1.5^i)), Identical, all rank-16 LoRA on the 7 projections.

S-LoRA run (`--slora`): 100 adapters, a request's adapter floor(100 x), x ~ power(alpha),
Poisson arrivals at each `--rates` value, input and output lengths ~ U[8, 512) (ignore_eos),
the engine on its background thread; TTFT, TPOT, end-to-end latency (p50, p99), throughput.

`--tp-compare N`: the same requests through one device and through N (tensor parallel):
tokens compared in float32, and batch-64 Distinct decode throughput of each in bfloat16.

    python -m benchmarks.bench_engine --model llama2-7b --batch 1 8 32 64 128 256 --slora
The last line of stdout is one JSON document.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import gzip
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_decode import adapter_bytes, copy_bandwidth, random_bank
from benchmarks.profiling import kernel_trace, summarize_trace
from jlora.config import preset
from jlora.loader import Model
from jlora.model import init_params
from jlora.sampling import SamplingParams, seed_key
from pallas_kernels.lora import LoraBlocks
from serving.engine import LORA_KERNELS, Engine, EngineConfig
from serving.step import make_batch, pack
from serving.request import Request, RequestStream

WORKLOADS = ("base", "distinct", "uniform", "skewed", "identical")


def workload_slots(kind: str, batch: int) -> list[int]:
    """Adapter slot of each of `batch` rows (0: base model)."""
    if kind == "base":
        return [0] * batch
    if kind == "distinct":
        return list(range(1, batch + 1))
    if kind == "uniform":
        k = math.ceil(math.sqrt(batch))
        return [1 + i % k for i in range(batch)]
    if kind == "skewed":
        slots, i = [], 0
        while len(slots) < batch:
            slots += [i + 1] * int(1.5 ** i)
            i += 1
        return slots[:batch]
    if kind == "identical":
        return [1] * batch
    raise ValueError(f"workload {kind!r} is not one of {WORKLOADS}")


def place_running(engine: Engine, slots: list[int], context: int) -> None:
    """Put len(slots) sequences into the engine as if just prefilled to `context` tokens."""
    sched, pages = engine.scheduler, engine.pages
    for i, slot in enumerate(slots):
        r = Request(f"decode-{i}", [1] * context,
                    SamplingParams(max_tokens=1 << 20, ignore_eos=True), seed_key(i),
                    slot=slot, stream=RequestStream(f"decode-{i}"))
        sched.add(r)
        sched._admit(r)
        pages.grow(r, context)
        r.computed, r.generated = context, [1]


def warm_clocks(seconds: float = 1.0) -> None:
    """Keep the device busy for `seconds` before timing. After a point's compile the GPU
    has sat idle for up to a minute, and the steps timed next ran 1.5-2.5% slower (device
    time too) than the same program timed again right after (benchmarks/RESULTS.md)."""
    x = jnp.ones((2048, 2048), jnp.bfloat16)
    step = jax.jit(lambda a: (a @ a) * (1 / 2048))
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        x = step(x).block_until_ready()


def bench_decode(model: Model, kind: str, batch: int, context: int, steps: int,
                 ceiling: float, impl: str, tp: int = 1, devices=None,
                 lora_kernel: str = EngineConfig.lora_kernel, profile_dir: str | None = None,
                 lora_blocks: LoraBlocks = LoraBlocks()) -> dict:
    slots = workload_slots(kind, batch)
    c = model.config
    per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * jnp.dtype(model.dtype).itemsize
    fits = int((_free_bytes() - 3e9) / per_token / batch) - 3 * steps - 16
    fits = min(fits, c.max_seq_len - 3 * steps - 16)
    context = max(16, min(context, fits // 16 * 16))   # what fits next to weights and bank
    pages_needed = batch * (-(-(context + 3 * steps) // 16)) + 1
    cfg = EngineConfig(max_seqs=batch, page_size=16, num_pages=pages_needed,
                       decode_buckets=(batch,), prefill_buckets=(0,), impl=impl, tp=tp,
                       lora_kernel=lora_kernel, lora_blocks=lora_blocks)
    t = time.perf_counter()
    engine = Engine(model, cfg, devices=devices)
    compile_s = time.perf_counter() - t
    place_running(engine, slots, context)
    warm_clocks()
    for _ in range(5):
        engine.step()
    jax.block_until_ready(engine.last_tokens)
    done = engine.metrics.snapshot()["generation_tokens"]
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    jax.block_until_ready(engine.last_tokens)
    loop_s = (time.perf_counter() - t) / steps
    done = engine.metrics.snapshot()["generation_tokens"] - done
    assert done == batch * steps, f"{done} tokens read back in {steps} steps of {batch}"

    # The same program with nothing else to do: the device's own time per step.
    plan = engine.scheduler.schedule()
    batch_arrays, _ = make_batch(plan, engine.sched_config, engine.pages)
    batch_arrays = jax.device_put(pack(batch_arrays)[0])
    program = engine.programs[batch, 0, "greedy"]
    bank = model.bank.arrays if model.bank is not None else None
    kv, last = engine.kv, engine.last_tokens
    times = []
    phases = np.median(np.array(engine.metrics.snapshot()["host_phases"][-steps:]), axis=0)
    for rep in range(5):
        t = time.perf_counter()
        for _ in range(steps):
            kv, last, out = program(model.params, bank, kv, last, batch_arrays)
        out.block_until_ready()
        times.append((time.perf_counter() - t) / steps)
    device_s = statistics.median(times)
    trace = None
    if profile_dir:   # the device-only step's kernels, and the program XLA compiled
        name = f"b{batch}-{kind}-{lora_kernel}"
        state = [kv, last]

        def work():
            for _ in range(3):
                state[0], state[1], o = program(model.params, bank, *state, batch_arrays)
            o.block_until_ready()
        try:
            events = kernel_trace(work, 1)
        except Exception as e:   # a diagnostic: never lose the timings to it
            print(f"-- trace failed: {type(e).__name__}: {e}")
            events = []
        trace = summarize_trace(events, 3, f"kernels of the step, batch {batch} {kind}")
        kv, last = state
        os.makedirs(profile_dir, exist_ok=True)
        with open(os.path.join(profile_dir, f"trace-{name}.json"), "w") as f:
            json.dump(events, f)
        with gzip.open(os.path.join(profile_dir, f"hlo-{name}.txt.gz"), "wt") as f:
            f.write(program.as_text())
    engine.kv, engine.last_tokens = kv, last

    itemsize = jnp.dtype(model.dtype).itemsize
    weights = sum(x.nbytes for x in jax.tree.leaves(model.params)) - (
        0 if c.tie_embeddings else model.params["embed"].nbytes)
    ctx = context + 5 + steps                         # the average context while timed
    kv_bytes = 2 * c.n_layers * batch * c.n_kv_heads * ctx * c.head_dim * itemsize
    lora_bytes = len({s for s in slots if s}) * adapter_bytes(c, 16, model.dtype)
    floor_s = (weights + kv_bytes + lora_bytes) / ceiling
    del engine, kv, last
    gc.collect()
    return dict(workload=kind, batch=batch, context=context, tp=tp, lora_kernel=lora_kernel,
                lora_blocks=blocks_label(lora_blocks),
                step_ms=loop_s * 1e3,
                device_step_ms=device_s * 1e3, idle_pct=100 * max(0.0, 1 - device_s / loop_s),
                tokens_per_s=batch / loop_s, floor_ms=floor_s * 1e3, vs_floor=loop_s / floor_s,
                weights_gb=weights / 1e9, kv_gb=kv_bytes / 1e9, lora_gb=lora_bytes / 1e9,
                compile_s=compile_s, trace=trace,
                host_ms=dict(zip(("plan", "dispatch", "wait", "take_in"),
                                 (phases * 1e3).round(3).tolist())))


def blocks_label(blocks: LoraBlocks) -> str:
    """The fields of `blocks` that differ from the defaults, as k=v,k=v ("default": none)."""
    base = LoraBlocks()
    return ",".join(f"{f.name}={getattr(blocks, f.name)}" for f in dataclasses.fields(blocks)
                    if getattr(blocks, f.name) != getattr(base, f.name)) or "default"


def parse_blocks(spec: str) -> LoraBlocks:
    """A LoraBlocks from "k=v,k=v" (integers; gemm_groups as names joined by +, e.g.
    gemm_groups=qkv+o+gate_up+down), or "default"."""
    if spec == "default":
        return LoraBlocks()
    fields = {f.name for f in dataclasses.fields(LoraBlocks)}
    values = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key == "gemm_groups" and value:
            values[key] = tuple(value.split("+"))
            continue
        if key not in fields or not value.isdigit():
            raise ValueError(f"--lora-blocks {spec!r}: {item!r} is not field=integer with a "
                             f"field of {sorted(fields)}")
        values[key] = int(value)
    return LoraBlocks(**values)


def percentiles(xs) -> dict:
    xs = np.asarray(xs, np.float64)
    return {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99))} \
        if len(xs) else {"p50": None, "p99": None}


def slora_run(model: Model, n_adapters: int, alpha: float, rate: float, n_requests: int,
              max_seqs: int, num_pages: int, impl: str, seed: int = 0) -> dict:
    """Poisson arrivals into the engine's background loop; latencies from each request."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, n_requests)
    arrivals = np.cumsum(gaps) - gaps[0]
    top = min(512, model.config.max_seq_len // 2)     # U[8, 512) unless the model is tiny
    inputs, outputs = rng.integers(8, top, n_requests), rng.integers(8, top, n_requests)
    adapters = np.minimum((n_adapters * rng.power(alpha, n_requests)).astype(int),
                          n_adapters - 1)
    names = sorted(model.bank.slots, key=model.bank.slots.get)
    cfg = EngineConfig(max_seqs=max_seqs, page_size=16, num_pages=num_pages,
                       prefill_budget=512, decode_buckets=(0, max_seqs),
                       prefill_buckets=(0, 128, 512), impl=impl)
    engine = Engine(model, cfg)
    engine.generate([[5] * 20], SamplingParams(max_tokens=4))        # warm the loop
    engine.start()
    streams = []
    t0 = time.monotonic()
    for i in range(n_requests):
        time.sleep(max(0.0, t0 + arrivals[i] - time.monotonic()))
        prompt = rng.integers(3, model.config.vocab_size, inputs[i]).tolist()
        streams.append(engine.submit(prompt, SamplingParams(max_tokens=int(outputs[i]),
                                                            ignore_eos=True),
                                     adapter=names[adapters[i]]))
    results = [s.result() for s in streams]
    duration = time.monotonic() - t0
    engine.stop()
    ttft = [r.timings["first_token"] - r.timings["arrival"] for r in results]
    e2e = [r.timings["finished"] - r.timings["arrival"] for r in results]
    tpot = [(e - t) / (r.timings["generated_tokens"] - 1) for r, e, t in zip(results, e2e, ttft)
            if r.timings["generated_tokens"] > 1]
    out_tokens = sum(r.timings["generated_tokens"] for r in results)
    m = engine.metrics.snapshot()
    del engine
    gc.collect()
    return dict(alpha=alpha, rate=rate, requests=n_requests, duration_s=duration,
                req_per_s=n_requests / duration, output_tok_per_s=out_tokens / duration,
                ttft_s=percentiles(ttft), tpot_s=percentiles(tpot), e2e_s=percentiles(e2e),
                preemptions=m["preemptions"], distinct_adapters=len(set(adapters.tolist())))


def with_bank(params, cfg, bank) -> Model:
    return Model(cfg, params, None, cfg.name, bank)


def tp_compare(cfg, tp: int, impl: str, ceiling: float, context: int, steps: int) -> dict:
    """Tokens of one device vs `tp` devices (float32, XLA kernels: the Triton compiler
    crashed on the float32 Pallas kernels at this shape), then batch-64 Distinct throughput
    (bfloat16, `impl`)."""
    out = {"tp": tp}
    prompts = [np.random.default_rng(i).integers(3, cfg.vocab_size, 40 + 7 * i).tolist()
               for i in range(8)]
    params32 = init_params(cfg, jax.random.key(0), jnp.float32)
    bank32 = random_bank(cfg, 8, 16, jnp.float32, jax.random.key(3))
    names = {slot: name for name, slot in bank32.slots.items()}
    greedy = SamplingParams(max_tokens=32, ignore_eos=True)
    ecfg = EngineConfig(max_seqs=8, page_size=16, num_pages=200, prefill_budget=512,
                        decode_buckets=(0, 8), prefill_buckets=(0, 512), impl="xla")
    adapters = [names.get(i % 9) for i in range(8)]
    print("tp-compare: one device, float32", flush=True)
    one = Engine(with_bank(params32, cfg, bank32), ecfg).generate(prompts, greedy, adapters)
    gc.collect()
    print(f"tp-compare: {tp} devices, float32", flush=True)
    params32 = init_params(cfg, jax.random.key(0), jnp.float32)
    bank32 = random_bank(cfg, 8, 16, jnp.float32, jax.random.key(3))
    many = Engine(with_bank(params32, cfg, bank32), EngineConfig(
        **{**ecfg.__dict__, "tp": tp})).generate(prompts, greedy, adapters)
    out["same_tokens"] = all(a.token_ids == b.token_ids for a, b in zip(one, many))
    out["max_logprob_diff"] = max(float(np.max(np.abs(np.subtract(a.logprobs, b.logprobs))))
                                  for a, b in zip(one, many))
    del params32, bank32, one, many
    gc.collect()
    print(f"tp-compare: same tokens {out['same_tokens']}", flush=True)
    for n in (1, tp):
        print(f"tp-compare: distinct batch 64 on {n} device(s), bfloat16", flush=True)
        params = init_params(cfg, jax.random.key(0), jnp.bfloat16)
        bank = random_bank(cfg, 64, 16, jnp.bfloat16, jax.random.key(3))
        out[f"distinct64_tp{n}"] = bench_decode(with_bank(params, cfg, bank), "distinct", 64,
                                                context, steps, ceiling, impl, tp=n)
        del params, bank
        gc.collect()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama2-7b", help="a shape preset")
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8, 32, 64, 128, 256])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30, help="timed engine steps per point")
    ap.add_argument("--slora", action="store_true", help="also run the S-LoRA workload")
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.3])
    ap.add_argument("--rates", type=float, nargs="+", default=[2, 4, 8])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--slora-max-seqs", type=int, default=128)
    ap.add_argument("--tp-compare", type=int, default=0, help="compare 1 device with N")
    ap.add_argument("--impl", default=None, choices=["pallas", "xla"])
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="also trace each decode point's device step (needs torch with CUDA): "
                         "print where its time goes; write its kernels and HLO to DIR")
    ap.add_argument("--lora-blocks", nargs="+", default=["default"], metavar="K=V,...",
                    help="Pallas LoRA tilings to time each adapter workload with, each "
                         "LoraBlocks fields as k=v,k=v (e.g. block_n=128,target_programs=2048)")
    ap.add_argument("--lora-kernel", nargs="+", default=[EngineConfig.lora_kernel],
                    choices=LORA_KERNELS,
                    help="Pallas LoRA kernels to time each adapter workload with")
    args = ap.parse_args()

    impl = args.impl or ("pallas" if jax.default_backend() == "gpu" else "xla")
    cfg = preset(args.model)
    device = jax.devices()[0]   # jax takes the GPUs before torch measures the copy ceiling
    ceiling, method = copy_bandwidth()
    print(f"device: {device.device_kind} x{len(jax.devices())} ({jax.default_backend()}), "
          f"jax {jax.__version__}, model {cfg.name}, bfloat16, impl {impl}")
    print(f"copy ceiling: {ceiling / 1e9:.0f} GB/s ({method}, read + write counted)")
    report = dict(bench="engine", device=device.device_kind, jax=jax.__version__,
                  model=cfg.name, ceiling_gbps=ceiling / 1e9, decode=[], slora=[])
    if args.tp_compare:
        r = tp_compare(cfg, args.tp_compare, impl, ceiling, args.context, args.steps)
        print(json.dumps(r, indent=1))
        report["tp_compare"] = r
    params = init_params(cfg, jax.random.key(0), jnp.bfloat16) if (args.batch or args.slora) \
        else None
    if args.batch:
        bank = random_bank(cfg, max(args.batch), 16, jnp.bfloat16, jax.random.key(3)) \
            if set(args.workloads) - {"base"} else None
        tilings = [parse_blocks(spec) for spec in args.lora_blocks]
        points = [(b, kind, lk, lb) for b in args.batch for lb in tilings
                  for kind in args.workloads if kind != "base" or lb == tilings[0]
                  for lk in (args.lora_kernel[:1] if kind == "base" else args.lora_kernel)]
        for b, kind, lora_kernel, lora_blocks in points:
            model = with_bank(params, cfg, None if kind == "base" else bank)
            r = bench_decode(model, kind, b, args.context, args.steps, ceiling, impl,
                             lora_kernel=lora_kernel, profile_dir=args.profile,
                             lora_blocks=lora_blocks)
            report["decode"].append(r)
            tiling = "" if kind == "base" else f" [{r['lora_blocks']}]"
            print(f"batch {b:3d} {kind:9s} {lora_kernel:5s}{tiling} step {r['step_ms']:7.3f} ms "
                  f"(device {r['device_step_ms']:7.3f}, idle {r['idle_pct']:4.1f}%)  "
                  f"{r['tokens_per_s']:7.0f} tok/s  floor {r['floor_ms']:.3f} ms "
                  f"({r['vs_floor']:.2f}x; W {r['weights_gb']:.1f} + KV {r['kv_gb']:.2f} + "
                  f"LoRA {r['lora_gb']:.2f} GB)  host ms {r['host_ms']}", flush=True)
        del bank
        gc.collect()
    if args.slora:
        bank = random_bank(cfg, 100, 16, jnp.bfloat16, jax.random.key(4))
        model = with_bank(params, cfg, bank)
        free = _free_bytes() - 4e9
        per_page = 2 * cfg.n_layers * cfg.n_kv_heads * 16 * cfg.head_dim * 2
        num_pages = int(min(args.slora_max_seqs * 64 + 1, max(free // per_page, 1024)))
        print(f"S-LoRA: 100 adapters, {num_pages} KV pages of 16 tokens")
        for alpha in args.alphas:
            for rate in args.rates:
                r = slora_run(model, 100, alpha, rate, args.requests, args.slora_max_seqs,
                              num_pages, impl)
                report["slora"].append(r)
                print(f"alpha {alpha:3.1f} rate {rate:5.1f}/s: {r['req_per_s']:.2f} req/s "
                      f"{r['output_tok_per_s']:7.0f} out tok/s  TTFT p50 "
                      f"{r['ttft_s']['p50']:.3f} p99 {r['ttft_s']['p99']:.3f} s  TPOT p50 "
                      f"{r['tpot_s']['p50'] * 1e3:.1f} p99 {r['tpot_s']['p99'] * 1e3:.1f} ms  "
                      f"e2e p50 {r['e2e_s']['p50']:.2f} p99 {r['e2e_s']['p99']:.2f} s  "
                      f"({r['preemptions']} preemptions, {r['distinct_adapters']} adapters)",
                      flush=True)
    print(json.dumps(report))


def _free_bytes() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return 8e9


if __name__ == "__main__":
    main()
