"""Decode attention kernel benchmark: Pallas kernel vs the XLA reference, per call.

Marginal cost inside one jitted program: a `fori_loop` whose body runs the op over several
distinct KV buffers (together larger than L2, so every call reads HBM), timed at two loop
lengths; the difference over the extra calls is the per-call time. Median of repeats.
Bytes counted: K and V of the attended positions, q and the output.

    python -m benchmarks.bench_attention --shape llama2-7b --batch 1 32 64 --context 512
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.bench_decode import copy_bandwidth
from jlora.config import preset
from pallas_kernels.decode_attention import DecodeAttentionBlocks, decode_attention

CONFIGS = {
    "bs32w4s3": DecodeAttentionBlocks(block_s=32, num_warps=4, num_stages=3),
    "bs64w4s3": DecodeAttentionBlocks(block_s=64, num_warps=4, num_stages=3),
    "bs64w4s4": DecodeAttentionBlocks(block_s=64, num_warps=4, num_stages=4),
    "bs128w4s3": DecodeAttentionBlocks(block_s=128, num_warps=4, num_stages=3),
    "bs128w4s4": DecodeAttentionBlocks(block_s=128, num_warps=4, num_stages=4),
    "bs128w8s3": DecodeAttentionBlocks(block_s=128, num_warps=8, num_stages=3),
}


def per_call_seconds(fn, buffers, q, lengths, reps: int) -> float:
    def run(n):
        # The buffers are arguments, not closed over: jax >= 0.11 would capture them as
        # constants of the program (gigabytes) and compile for minutes.
        def loop(buffers, q, lengths):
            def body(_, acc):
                for k, v in buffers:
                    acc = acc + fn(q + acc, k, v, lengths)
                return acc
            return jax.lax.fori_loop(0, n, body, jnp.zeros_like(q))
        return functools.partial(jax.jit(loop), buffers, q, lengths)

    short, long = run(2), run(6)
    short().block_until_ready()
    long().block_until_ready()
    diffs = []
    for _ in range(reps):
        t = time.perf_counter()
        short().block_until_ready()
        t_short = time.perf_counter() - t
        t = time.perf_counter()
        long().block_until_ready()
        diffs.append((time.perf_counter() - t - t_short) / (4 * len(buffers)))
    return statistics.median(diffs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama2-7b", help="preset whose heads to use")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 64])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()

    cfg = preset(args.shape)
    H, G, E, S = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, args.context
    ceiling, method = copy_bandwidth()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; {cfg.name} heads "
          f"H={H} G={G} E={E}, context {S}, bf16; copy ceiling {ceiling / 1e9:.0f} GB/s "
          f"({method})")
    rows = []
    for B in args.batch:
        kv_bytes = 2 * B * G * S * E * 2
        n_buf = max(2, min(16, -(-(256 << 20) // kv_bytes)))    # > 256 MB in all: beyond L2
        keys = jax.random.split(jax.random.key(B), 2 * n_buf + 1)
        buffers = [(jax.random.normal(keys[2 * i], (B, G, S, E), jnp.bfloat16),
                    jax.random.normal(keys[2 * i + 1], (B, G, S, E), jnp.bfloat16))
                   for i in range(n_buf)]
        q = jax.random.normal(keys[-1], (B, H, E), jnp.bfloat16)
        lengths = jnp.full((B,), S, jnp.int32)
        nbytes = kv_bytes + 2 * 2 * B * H * E
        floor_us = nbytes / ceiling * 1e6
        variants = {"xla": lambda q, k, v, n: decode_attention(q, k, v, n, impl="xla")}
        for name in args.configs:
            variants[name] = (lambda blocks: lambda q, k, v, n: decode_attention(
                q, k, v, n, blocks=blocks))(CONFIGS[name])
        for name, fn in variants.items():
            t = per_call_seconds(fn, buffers, q, lengths, args.reps)
            row = dict(batch=B, context=S, variant=name, us=t * 1e6, floor_us=floor_us,
                       gbps=nbytes / t / 1e9, pct=100 * nbytes / t / ceiling)
            rows.append(row)
            print(f"B={B:3d} {name:10s} {row['us']:8.1f} us  floor {floor_us:7.1f} us  "
                  f"{row['gbps']:6.0f} GB/s = {row['pct']:5.1f}% of ceiling", flush=True)
    print(json.dumps(dict(bench="decode_attention", device=jax.devices()[0].device_kind,
                          jax=jax.__version__, shape=cfg.name, ceiling_gbps=ceiling / 1e9,
                          results=rows)))


if __name__ == "__main__":
    main()
