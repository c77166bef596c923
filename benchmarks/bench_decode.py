"""Decode-step benchmark: one jitted step (all layers + sampling) of a shape preset.

Times `jlora.generate.decode_step` as the serving loop runs it: steps dispatched back to
back with the KV cache donated, each fed the previous step's tokens; the median over
repeats of the per-step time. Every step streams all weights and the whole KV cache from
HBM (gigabytes, far beyond L2), so no cache flush is needed between steps.

Reports step time, tokens/s and achieved bandwidth against the device-to-device copy
ceiling measured in the same run (torch's copy_ when torch is there, else an XLA copy).
The last line of stdout is one JSON document.

    python -m benchmarks.bench_decode --model llama2-7b --batch 1 32 64 --context 512
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.profiling import print_kernels
from jlora.adapters import GROUPS, target_shapes
from jlora.bank import AdapterBank, BankArrays
from jlora.config import preset
from jlora.generate import decode_step
from jlora.model import KVCache, init_params
from jlora.sampling import SamplingParams, make_sampling_arrays, seed_key
from pallas_kernels import default_impl


def copy_bandwidth(nbytes: int = 4 << 30, reps: int = 20) -> tuple[float, str]:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    try:
        import torch
        if torch.cuda.is_available():
            src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
            dst = torch.empty_like(src)
            times = []
            for i in range(reps + 3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                dst.copy_(src)
                end.record()
                torch.cuda.synchronize()
                if i >= 3:
                    times.append(start.elapsed_time(end) / 1e3)
            del src, dst
            torch.cuda.empty_cache()
            return 2 * nbytes / statistics.median(times), "torch copy_"
    except ImportError:
        pass
    nbytes = nbytes if jax.default_backend() == "gpu" else 1 << 28
    x = jnp.arange(nbytes // 2, dtype=jnp.float32).astype(jnp.bfloat16)
    copy = jax.jit(lambda a: a * 1 + 0)
    copy(x).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times), "xla elementwise copy"


def random_cache(cfg, batch, length, dtype, key) -> KVCache:
    shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
    keys = jax.random.split(key, 2 * cfg.n_layers)
    make = jax.jit(lambda k: jax.random.normal(k, shape, dtype))
    return KVCache(tuple(make(keys[i]) for i in range(cfg.n_layers)),
                   tuple(make(keys[cfg.n_layers + i]) for i in range(cfg.n_layers)))


def random_bank(cfg, n_adapters: int, rank: int, dtype, key) -> AdapterBank:
    """A bank of n random rank-`rank` LoRA adapters on all seven projections, filled on the
    device (the benchmark times decoding, not loading)."""
    bank = AdapterBank(cfg, n_adapters + 1, rank, dtype, features=())
    L, S, R = cfg.n_layers, n_adapters + 1, rank
    keys = iter(jax.random.split(key, 64))
    fill = lambda x: (0.02 * jax.random.normal(next(keys), x.shape, jnp.float32)  # noqa: E731
                      ).astype(x.dtype)
    pools = {g: (fill(a), tuple(fill(b) for b in bs)) for g, (a, bs) in bank.arrays.pools.items()}
    tables = {}
    for group, targets in GROUPS.items():
        M = len(targets)
        a_start = np.zeros((L, M, S), np.int32)
        b_start = np.zeros((L, M, S), np.int32)
        for layer, m, s in np.ndindex(L, M, S - 1):
            a_start[layer, m, s + 1], b_start[layer, m, s + 1] = \
                bank.slot_rows(M, s + 1, layer, m)
        rank_t = np.full((L, M, S), R, np.int32)
        rank_t[:, :, 0] = 0
        tables[group] = dict(a_start=jnp.asarray(a_start), b_start=jnp.asarray(b_start),
                             rank=jnp.asarray(rank_t),
                             scale=jnp.full((L, M, S), 0.5, jnp.float32))
    bank.arrays = BankArrays(pools=pools, tables=tables, max_rank=R)
    bank.slots = {f"random-{s}": s for s in range(1, S)}
    return bank


def adapter_bytes(cfg, rank: int, dtype) -> int:
    """Bytes of one rank-`rank` adapter on all seven projections of every layer."""
    per_layer = sum(n_in + n_out for n_in, n_out in target_shapes(cfg).values())
    return cfg.n_layers * rank * per_layer * jnp.dtype(dtype).itemsize


def bench_batch(params, cfg, batch: int, context: int, dtype, steps: int, reps: int,
                impl: str, bank=None, rank: int = 0) -> dict:
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    if not cfg.tie_embeddings:  # only `batch` rows of the embedding table are read
        weight_bytes -= params["embed"].nbytes
    kv_bytes = 2 * cfg.n_layers * batch * cfg.n_kv_heads * context * cfg.head_dim * \
        jnp.dtype(dtype).itemsize
    cache = random_cache(cfg, batch, context, dtype, jax.random.key(batch))
    sampling = jax.device_put(make_sampling_arrays(
        [SamplingParams()] * batch, np.stack([seed_key(i) for i in range(batch)]),
        [0] * batch, batch))
    tokens = jax.random.randint(jax.random.key(1), (batch,), 0, cfg.vocab_size)
    positions = jnp.full((batch,), context - 1, jnp.int32)  # attend over the whole context
    arrays, row_slots, lora_bytes = None, None, 0
    if bank is not None:   # row b on its own adapter (distinct, while there are enough)
        n = bank.n_slots - 1
        arrays = bank.arrays
        row_slots = jnp.asarray(1 + np.arange(batch) % n, jnp.int32)
        lora_bytes = min(batch, n) * adapter_bytes(cfg, rank, dtype)
    step = functools.partial(decode_step, cfg=cfg, impl=impl)

    t = time.perf_counter()
    tokens, _, cache = step(params, cache, tokens, positions, sampling, arrays, row_slots)
    tokens.block_until_ready()
    compile_s = time.perf_counter() - t
    for _ in range(3):
        tokens, _, cache = step(params, cache, tokens, positions, sampling, arrays, row_slots)
    tokens.block_until_ready()
    per_step = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(steps):
            tokens, _, cache = step(params, cache, tokens, positions, sampling, arrays, row_slots)
        tokens.block_until_ready()
        per_step.append((time.perf_counter() - t) / steps)
    step_s = statistics.median(per_step)
    total = weight_bytes + kv_bytes + lora_bytes
    return dict(impl=impl, batch=batch, context=context, adapters=0 if bank is None else
                bank.n_slots - 1, rank=rank, step_ms=step_s * 1e3,
                spread_ms=(max(per_step) - min(per_step)) * 1e3, tokens_per_s=batch / step_s,
                weight_gb=weight_bytes / 1e9, kv_gb=kv_bytes / 1e9, lora_gb=lora_bytes / 1e9,
                achieved_gbps=total / step_s / 1e9, compile_s=compile_s)


def profile_kernels(params, cfg, batch: int, context: int, dtype, impl: str, steps: int = 5):
    """Print the GPU kernels of one decode step (see benchmarks/profiling.py)."""
    cache = random_cache(cfg, batch, context, dtype, jax.random.key(7))
    sampling = jax.device_put(make_sampling_arrays(
        [SamplingParams()] * batch, np.stack([seed_key(i) for i in range(batch)]),
        [0] * batch, batch))
    positions = jnp.full((batch,), context - 1, jnp.int32)
    state = [jnp.zeros((batch,), jnp.int32) + 3, cache]

    def work():
        state[0], _, state[1] = decode_step(params, state[1], state[0], positions, sampling,
                                            cfg=cfg, impl=impl)
        state[0].block_until_ready()

    work()
    print_kernels(work, steps, f"kernels of one {impl} decode step, batch {batch}, "
                               f"context {context}", top=25)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama2-7b", help="a shape preset")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 64])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    ap.add_argument("--reps", type=int, default=25, help="timed repeats (median taken)")
    ap.add_argument("--impl", nargs="+", default=[default_impl()], choices=["pallas", "xla"],
                    help="decode attention implementations to time (default: pallas on GPU)")
    ap.add_argument("--adapters", type=int, default=0,
                    help="also time each batch with this many distinct LoRA adapters (all 7 "
                         "projections); rows take adapters round-robin")
    ap.add_argument("--rank", type=int, default=16, help="rank of those adapters")
    ap.add_argument("--profile", type=int, nargs="*", default=[],
                    help="batch sizes whose kernels to list (needs torch with CUDA)")
    args = ap.parse_args()

    dtype = jnp.dtype(args.dtype)
    cfg = preset(args.model)
    ceiling, method = copy_bandwidth()
    params = init_params(cfg, jax.random.key(0), dtype)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"model {cfg.name} ({cfg.n_params / 1e9:.2f} B params, {args.dtype})")
    print(f"copy ceiling: {ceiling / 1e9:.0f} GB/s ({method}, read + write counted)")
    bank = random_bank(cfg, args.adapters, args.rank, dtype, jax.random.key(3)) \
        if args.adapters else None
    rows = []
    for impl, b, with_bank in [(i, b, w) for i in args.impl for b in args.batch
                               for w in ([False, True] if bank else [False])]:
        r = bench_batch(params, cfg, b, args.context, dtype, args.steps, args.reps, impl,
                        bank if with_bank else None, args.rank)
        r["pct_of_ceiling"] = 100 * r["achieved_gbps"] * 1e9 / ceiling
        r["floor_ms"] = (r["weight_gb"] + r["kv_gb"] + r["lora_gb"]) * 1e9 / ceiling * 1e3
        r["vs_floor"] = r["step_ms"] / r["floor_ms"]
        rows.append(r)
        lora = f" + {r['adapters']} adapters r={r['rank']} {r['lora_gb']:.2f} GB" \
            if with_bank else ""
        print(f"{impl:6s} batch {b:3d}  ctx {args.context}  step {r['step_ms']:7.3f} ms "
              f"(spread {r['spread_ms']:.3f})  floor {r['floor_ms']:.3f} ms "
              f"({r['vs_floor']:.2f}x)  {r['tokens_per_s']:8.0f} tok/s  weights "
              f"{r['weight_gb']:.2f} GB + KV {r['kv_gb']:.2f} GB{lora}  "
              f"{r['achieved_gbps']:6.0f} GB/s = {r['pct_of_ceiling']:.1f}% of ceiling  "
              f"(compile {r['compile_s']:.1f} s)", flush=True)
    for b in args.profile:
        profile_kernels(params, cfg, b, args.context, dtype, args.impl[0])
    print(json.dumps(dict(bench="decode_step", device=device.device_kind, jax=jax.__version__,
                          model=cfg.name, dtype=args.dtype, ceiling_gbps=ceiling / 1e9,
                          ceiling_method=method, results=rows)))


if __name__ == "__main__":
    main()
