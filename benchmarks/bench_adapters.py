"""Working-set benchmark: many adapters over few GPU slots, loads under live traffic.

For each working set W (`--working-set 8 32 128 512`) requests arrive as a Poisson process
(`--rate`), each naming one of W adapters uniformly at random; the engine has `--slots` GPU
slots, so past W = slots adapters move between host memory and the GPU while others decode.
All adapters are rank `--rank` LoRA on the seven projections, registered from host memory
(distinct scales over shared random arrays: every load builds and copies a full slot).
Reported per W: TTFT, inter-token latency (p50, p99) split into the intervals that overlap
an adapter load and those that do not, end-to-end latency, request and output-token
throughput, loads and evictions. Targets (issue 7): ITL p99 while loading <= 1.10x without;
median TTFT at W=512 <= 3x at W=8.

    python -m benchmarks.bench_adapters --model llama2-7b --working-set 8 32 128 512
The last line of stdout is one JSON document.
"""

from __future__ import annotations

import argparse
import gc
import json
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_engine import percentiles
from jlora.adapters import Adapter, ModuleAdapter, target_shapes
from jlora.config import preset
from jlora.loader import Model
from jlora.model import init_params
from jlora.sampling import SamplingParams
from serving.adapter_store import HOST_MEMORY
from serving.engine import Engine, EngineConfig


def shared_adapters(cfg, n: int, rank: int, seed: int = 0) -> list[Adapter]:
    """n rank-`rank` LoRA adapters on all seven projections; they share their arrays and
    differ by scale, so host memory stays small while each load moves a full slot."""
    rng = np.random.default_rng(seed)
    arrays = {t: ((rng.normal(size=(rank, n_in)) / np.sqrt(n_in)).astype(np.float32),
                  (rng.normal(size=(n_out, rank)) * 0.02).astype(np.float32))
              for t, (n_in, n_out) in target_shapes(cfg).items()}
    return [Adapter(f"w{i}", "lora", {(layer, t): ModuleAdapter(a, b, 0.5 + i / n)
                                      for layer in range(cfg.n_layers)
                                      for t, (a, b) in arrays.items()})
            for i in range(n)]


class Recorder:
    """Token times per request and adapter load windows, taken inside the engine."""

    def __init__(self, engine: Engine):
        self.tokens: dict[str, list[float]] = {}
        self.loads: list[tuple[float, float]] = []
        self.prefill_steps: list[float] = []     # when a step holding prefill was planned
        self.gc_pauses: list[tuple[float, float, int]] = []   # (start, end, generation)
        self.lock = threading.Lock()
        gc_start = [0.0]

        def on_gc(phase, info):   # Python's collector stops every thread while it runs
            if phase == "start":
                gc_start[0] = time.monotonic()
            else:
                self.gc_pauses.append((gc_start[0], time.monotonic(), info["generation"]))
        gc.callbacks.append(on_gc)
        self.puts: list[tuple[float, float]] = []   # slot_data calls: host side of a copy
        accept, load = engine._accept, engine.adapters._load
        bank = engine.adapters.bank
        slot_data = bank.slot_data

        def timed_slot_data(*args):
            t = time.monotonic()
            out = slot_data(*args)
            with self.lock:
                self.puts.append((t, time.monotonic()))
            return out
        bank.slot_data = timed_slot_data
        schedule = engine.scheduler.schedule

        def timed_schedule():
            plan = schedule()
            if plan.prefills:
                self.prefill_steps.append(time.monotonic())
            return plan
        engine.scheduler.schedule = timed_schedule

        def timed_accept(r, items, now):
            t = time.monotonic()
            with self.lock:
                self.tokens.setdefault(r.request_id, []).extend([t] * len(items))
            accept(r, items, now)

        def timed_load(entry):
            t = time.monotonic()
            load(entry)
            with self.lock:
                self.loads.append((t, time.monotonic()))
        engine._accept, engine.adapters._load = timed_accept, timed_load

    def slowest_loads(self, since: float, n: int = 5) -> list[dict]:
        """The n slowest loads after `since`: when each started (s into the run), how long
        it took, how much of it was the copy's host side (the call that starts it; the rest
        is reading and packing, or waiting for the transfer) and how much of it Python's
        garbage collector paused every thread."""
        loads = sorted((x for x in self.loads if x[0] >= since), key=lambda x: x[0] - x[1])

        def within(a, b, intervals):
            return 1e3 * sum(max(0.0, min(b, y) - max(a, x)) for x, y, *_ in intervals)
        return [dict(start_s=a - since, ms=(b - a) * 1e3, put_ms=within(a, b, self.puts),
                     gc_ms=within(a, b, self.gc_pauses)) for a, b in loads[:n]]

    def itl(self, ids) -> dict[tuple[bool, bool], list[float]]:
        """Inter-token gaps of these requests by (overlapping a load, holding a prefill).

        A gap (a, b] ends when a step's tokens are read back; that step was planned up to one
        step before a (the next is dispatched before the previous is read), so a gap holds a
        prefill if a step with prefill tokens was planned in (a - (b - a), b]."""
        starts, ends = (np.array(x) for x in zip(*self.loads)) if self.loads else ([], [])
        prefills = np.array(sorted(self.prefill_steps))
        gaps = {(load, pre): [] for load in (True, False) for pre in (True, False)}
        for rid in ids:
            ts = self.tokens.get(rid, [])
            for a, b in zip(ts, ts[1:]):
                if b == a:   # tokens read back in the same step (prefill's first)
                    continue
                load = bool(len(starts) and np.any((starts < b) & (ends > a)))
                i = np.searchsorted(prefills, a - (b - a), side="right")
                pre = bool(i < len(prefills) and prefills[i] <= b)
                gaps[load, pre].append(b - a)
        return gaps


def run(engine: Engine, rec: Recorder, names: list[str], rate: float, n_requests: int,
        max_len: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, n_requests)
    arrivals = np.cumsum(gaps) - gaps[0]
    ins, outs = rng.integers(8, max_len, n_requests), rng.integers(8, max_len, n_requests)
    picks = rng.integers(len(names), size=n_requests)
    before = {e.name: len(e.load_seconds) for e in engine.adapters.cache.entries.values()}
    evictions = engine.adapters.cache.evictions
    streams, t0 = [], time.monotonic()
    for i in range(n_requests):
        time.sleep(max(0.0, t0 + arrivals[i] - time.monotonic()))
        prompt = rng.integers(3, engine.model.config.vocab_size, ins[i]).tolist()
        streams.append(engine.submit(prompt, SamplingParams(max_tokens=int(outs[i]),
                                                            ignore_eos=True),
                                     adapter=names[picks[i]]))
    results = [s.result() for s in streams]
    duration = time.monotonic() - t0
    ttft = [r.timings["first_token"] - r.timings["arrival"] for r in results]
    e2e = [r.timings["finished"] - r.timings["arrival"] for r in results]
    gaps = rec.itl([r.request_id for r in results])
    during, quiet = gaps[True, True] + gaps[True, False], gaps[False, True] + gaps[False, False]
    load_s = [s for e in engine.adapters.cache.entries.values()
              for s in e.load_seconds[before.get(e.name, 0):]]
    # a p99 of few gaps is nearly their maximum: what would the quiet gaps' p99 be from a
    # sample as small as the loading one (the median over random subsets of that size)?
    q = np.asarray(quiet)
    same_n = float(np.median([np.percentile(rng.choice(q, len(during), replace=False), 99)
                              for _ in range(2000)])) if 0 < len(during) < len(q) else None
    return dict(working_set=len(names), requests=n_requests, duration_s=duration,
                req_per_s=n_requests / duration,
                output_tok_per_s=sum(len(r.token_ids) for r in results) / duration,
                ttft_s=percentiles(ttft), e2e_s=percentiles(e2e),
                itl_s=percentiles(during + quiet), itl_loading_s=percentiles(during),
                itl_quiet_s=percentiles(quiet), itl_samples=(len(during), len(quiet)),
                itl_quiet_p99_same_n_s=same_n, gaps=dict(loading=during, quiet=quiet),
                # the same split within steps that hold a prefill chunk and those that do not
                # (loads start when requests arrive, and arrivals bring prefill)
                itl_by_prefill={("prefill" if pre else "decode_only"): dict(
                    loading=percentiles(gaps[True, pre]), quiet=percentiles(gaps[False, pre]),
                    samples=(len(gaps[True, pre]), len(gaps[False, pre])))
                    for pre in (True, False)},
                loads=len(load_s), evictions=engine.adapters.cache.evictions - evictions,
                load_s=percentiles(load_s), slowest_loads=rec.slowest_loads(t0),
                gc_pauses=[(round(a - t0, 3), round((b - a) * 1e3, 1), g)
                           for a, b, g in rec.gc_pauses if a >= t0 and b - a > 0.005])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama2-7b", help="a shape preset")
    ap.add_argument("--working-set", type=int, nargs="+", default=[8, 32, 128, 512])
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rate", type=float, default=8.0, help="requests per second")
    ap.add_argument("--requests", type=int, default=300, help="per working set")
    ap.add_argument("--max-len", type=int, default=256, help="input/output ~ U[8, max-len)")
    ap.add_argument("--max-seqs", type=int, default=64)
    ap.add_argument("--impl", default=None, choices=["pallas", "xla"])
    ap.add_argument("--gaps-out", default="", help="write every run's inter-token gaps "
                    "(s; overlapping a load or not) to this JSON file")
    ap.add_argument("--host-memory", default="pinned", choices=HOST_MEMORY,
                    help="where the host tier keeps adapters' slot-ready rows")
    args = ap.parse_args()

    impl = args.impl or ("pallas" if jax.default_backend() == "gpu" else "xla")
    cfg = preset(args.model)
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"model {cfg.name}, {jnp.dtype(dtype).name}, impl {impl}, {args.slots} slots, "
          f"rank {args.rank}, host memory {args.host_memory}", flush=True)
    model = Model(cfg, init_params(cfg, jax.random.key(0), dtype), None, cfg.name)
    pages = args.max_seqs * -(-2 * args.max_len // 16) + 1
    config = EngineConfig(max_seqs=args.max_seqs, page_size=16, num_pages=pages,
                          prefill_budget=512, decode_buckets=tuple(sorted({0, 16, args.max_seqs})),
                          prefill_buckets=(0, 128, 512), impl=impl, max_loras=args.slots,
                          max_lora_rank=args.rank, host_lora_gb=1e6, freeze_gc=True,
                          host_lora_memory=args.host_memory)
    t = time.perf_counter()
    engine = Engine(model, config)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    *adapters, spare = shared_adapters(cfg, max(args.working_set) + 1, args.rank)
    for a in (*adapters, spare):
        engine.adapters.load(a.name, a)     # registering packs each for a slot (host work)
    register_s = time.perf_counter() - t
    print(f"engine compiled in {compile_s:.1f} s; {len(adapters) + 1} adapters registered in "
          f"{register_s:.1f} s", flush=True)
    rec = Recorder(engine)
    engine.start()
    # warm the loop and the load path (first load, first step with an adapter) off the clock,
    # with an adapter outside every working set
    engine.submit([5] * 20, SamplingParams(max_tokens=4), adapter=spare.name).result()
    report = dict(bench="adapters", device=device.device_kind, jax=jax.__version__,
                  model=cfg.name, slots=args.slots, rank=args.rank, rate=args.rate,
                  host_memory=args.host_memory,
                  compile_s=compile_s, register_s=register_s, runs=[])
    all_gaps, pooled = {}, dict(loading=[], quiet=[])
    for i, w in enumerate(args.working_set):
        r = run(engine, rec, [a.name for a in adapters[:w]], args.rate, args.requests,
                args.max_len, seed=i)
        report["runs"].append(r)
        p = lambda d, k: f"{d[k]['p50'] * 1e3:.1f}/{d[k]['p99'] * 1e3:.1f}" \
            if d[k]["p50"] is not None else "-"  # noqa: E731
        gaps = r.pop("gaps")
        if args.gaps_out:
            all_gaps[w] = gaps
        pooled["loading"] += gaps["loading"]
        pooled["quiet"] += gaps["quiet"]
        same_n = r["itl_quiet_p99_same_n_s"]
        print(f"W={w:4d}: {r['req_per_s']:.2f} req/s {r['output_tok_per_s']:7.0f} out tok/s  "
              f"TTFT p50/p99 {p(r, 'ttft_s')} ms  ITL {p(r, 'itl_s')} ms (loading "
              f"{p(r, 'itl_loading_s')}, quiet {p(r, 'itl_quiet_s')}; samples "
              f"{r['itl_samples']}; quiet p99 from that few "
              f"{'-' if same_n is None else f'{same_n * 1e3:.1f}'})  e2e {p(r, 'e2e_s')} ms  {r['loads']} loads "
              f"({p(r, 'load_s')} ms), {r['evictions']} evictions", flush=True)
        for kind, d in r["itl_by_prefill"].items():
            print(f"        ITL p50/p99 in {kind} steps: loading {p(d, 'loading')}, quiet "
                  f"{p(d, 'quiet')} ms (samples {d['samples']})", flush=True)
        print("        slowest loads (start s, ms, of it copy call ms, GC ms): " + ", ".join(
            f"({x['start_s']:.2f}, {x['ms']:.1f}, {x['put_ms']:.1f}, {x['gc_ms']:.1f})"
            for x in r["slowest_loads"]) + f"; GC pauses > 5 ms: {r['gc_pauses'] or 'none'}",
            flush=True)
    engine.close()
    if args.gaps_out:
        with open(args.gaps_out, "w") as f:
            json.dump(all_gaps, f)
    runs = report["runs"]
    loading = [x for x in runs if x["itl_loading_s"]["p99"] and x["itl_quiet_s"]["p99"]]

    def ratio(kind):   # the worst run's loading / quiet p99 within one kind of step
        ds = [x["itl_by_prefill"][kind] for x in runs]
        return max((d["loading"]["p99"] / d["quiet"]["p99"] for d in ds
                    if d["loading"]["p99"] and d["quiet"]["p99"]), default=None)
    report["targets"] = dict(
        itl_p99_loading_over_quiet=max((x["itl_loading_s"]["p99"] / x["itl_quiet_s"]["p99"]
                                        for x in loading), default=None),
        # every run's gaps together: loads early in a small working set are few
        itl_p99_loading_over_quiet_pooled=(np.percentile(pooled["loading"], 99)
                                           / np.percentile(pooled["quiet"], 99)
                                           if pooled["loading"] else None),
        itl_p99_loading_over_quiet_decode_only=ratio("decode_only"),
        itl_p99_loading_over_quiet_prefill=ratio("prefill"),
        # the same question across runs: every gap at the largest working set (loads all the
        # time) against the smallest's (its few loads come first)
        itl_p99_largest_over_smallest=runs[-1]["itl_s"]["p99"] / runs[0]["itl_s"]["p99"],
        ttft_p50_largest_over_smallest=runs[-1]["ttft_s"]["p50"] / runs[0]["ttft_s"]["p50"])
    tg = report["targets"]
    print(f"targets: ITL p99 loading/quiet {tg['itl_p99_loading_over_quiet']} (<= 1.10; "
          f"all runs' gaps pooled {tg['itl_p99_loading_over_quiet_pooled']}; in "
          f"decode-only steps {tg['itl_p99_loading_over_quiet_decode_only']}, in steps with "
          f"prefill {tg['itl_p99_loading_over_quiet_prefill']}); "
          f"ITL p99 W={runs[-1]['working_set']} / W={runs[0]['working_set']} "
          f"{tg['itl_p99_largest_over_smallest']:.2f}; TTFT p50 W={runs[-1]['working_set']} / "
          f"W={runs[0]['working_set']} {tg['ttft_p50_largest_over_smallest']:.2f} (<= 3)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
