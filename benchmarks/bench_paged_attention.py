"""Paged decode attention benchmark: Pallas kernel vs its XLA reference vs dense decode attention.

One query token per sequence (decode) over a full context, K/V in pages of Z positions
scattered at random over the pool (a random permutation of the physical pages). Same timing
method as `bench_attention`: marginal cost inside one jitted program, a `fori_loop` over
several distinct KV pools (together larger than L2, so every call reads HBM), timed at two
loop lengths; the median over repeats of the per-call difference. The dense baseline is
`decode_attention` over a contiguous [B, G, S, E] cache of the same bytes.
Bytes counted: K and V of the attended positions, q and the output.

    python -m benchmarks.bench_paged_attention --batch 1 8 32 64 128 256 --context 512 2048

The Pallas kernel's tiling is swept with --block-s, --num-warps and --num-stages (every
combination of the values given).
"""

from __future__ import annotations

import argparse
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_attention import per_call_seconds
from benchmarks.bench_decode import copy_bandwidth
from jlora.config import preset
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.paged_attention import PagedAttentionBlocks, paged_attention

VARIANTS = ("pallas", "xla", "dense")
_L2_BYTES = 256 << 20     # rotate through more KV bytes than this: beyond any L2


def paged_inputs(B: int, G: int, H: int, S: int, E: int, Z: int, n_buf: int, seed: int):
    """n_buf pools of B * S / Z pages [G, P, Z, E] each, one scattered page table [B, W]."""
    W = S // Z
    keys = jax.random.split(jax.random.key(seed), 2 * n_buf + 1)
    pools = [tuple(jax.random.normal(keys[2 * i + j], (G, B * W, Z, E), jnp.bfloat16)
                   for j in range(2)) for i in range(n_buf)]
    tables = np.random.default_rng(seed).permutation(B * W).reshape(B, W)
    meta = (jnp.asarray(tables, jnp.int32), jnp.full((B, 1), S - 1, jnp.int32))
    return pools, jax.random.normal(keys[-1], (B, 1, H, E), jnp.bfloat16), meta


def dense_inputs(B: int, G: int, H: int, S: int, E: int, n_buf: int, seed: int):
    keys = jax.random.split(jax.random.key(seed), 2 * n_buf + 1)
    caches = [tuple(jax.random.normal(keys[2 * i + j], (B, G, S, E), jnp.bfloat16)
                    for j in range(2)) for i in range(n_buf)]
    return caches, jax.random.normal(keys[-1], (B, H, E), jnp.bfloat16), jnp.full((B,), S)


def _pallas(blocks: PagedAttentionBlocks):
    return lambda q, k, v, meta: paged_attention(q, k, v, *meta, blocks=blocks)


def _xla(q, k, v, meta):
    return paged_attention(q, k, v, *meta, impl="xla")


def time_case(B: int, S: int, H: int, G: int, E: int, args) -> dict[str, float]:
    """Per-call seconds of each variant, keyed by name (paged ones per page size)."""
    kv_bytes = 2 * B * G * S * E * 2
    n_buf = max(2, min(16, -(-_L2_BYTES // kv_bytes)))
    times = {}
    for Z in args.page_size if {"pallas", "xla"} & set(args.variants) else []:
        pools, q, meta = paged_inputs(B, G, H, S, E, Z, n_buf, seed=B + S + Z)
        if "pallas" in args.variants:
            for bs, nw, ns in itertools.product(args.block_s, args.num_warps, args.num_stages):
                blocks = PagedAttentionBlocks(block_s=bs, num_warps=nw, num_stages=ns)
                times[f"pallas-z{Z}-bs{bs}-w{nw}-s{ns}"] = per_call_seconds(
                    _pallas(blocks), pools, q, meta, args.reps)
        if "xla" in args.variants:
            times[f"xla-z{Z}"] = per_call_seconds(_xla, pools, q, meta, args.reps)
        del pools
    if "dense" in args.variants:
        caches, q, lengths = dense_inputs(B, G, H, S, E, n_buf, seed=B + S)
        times["dense"] = per_call_seconds(decode_attention, caches, q, lengths, args.reps)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama2-7b", help="preset whose heads to use")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    ap.add_argument("--context", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--long", nargs="*", default=["1x8192"],
                    help="extra BATCHxCONTEXT cases, e.g. 1x8192 4x16384")
    ap.add_argument("--page-size", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--block-s", type=int, nargs="+", default=[64],
                    help="the Pallas kernel's cache positions per loop step")
    ap.add_argument("--num-warps", type=int, nargs="+", default=[PagedAttentionBlocks.num_warps])
    ap.add_argument("--num-stages", type=int, nargs="+",
                    default=[PagedAttentionBlocks.num_stages])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()

    cfg = preset(args.shape)
    H, G, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    cases = [(B, S) for S in args.context for B in args.batch]
    cases += [tuple(int(x) for x in c.split("x")) for c in args.long]
    ceiling, method = copy_bandwidth()
    device = jax.devices()[0].device_kind
    print(f"device: {device}, jax {jax.__version__}; {cfg.name} heads H={H} G={G} E={E}, "
          f"bf16, pages scattered at random; copy ceiling {ceiling / 1e9:.0f} GB/s ({method})")
    rows = []
    for B, S in cases:
        nbytes = 2 * B * G * S * E * 2 + 2 * 2 * B * H * E
        floor_us = nbytes / ceiling * 1e6
        for name, t in time_case(B, S, H, G, E, args).items():
            row = {"batch": B, "context": S, "variant": name, "us": t * 1e6,
                   "floor_us": floor_us, "gbps": nbytes / t / 1e9,
                   "pct": 100 * nbytes / t / ceiling}
            rows.append(row)
            print(f"B={B:3d} S={S:5d} {name:24s} {row['us']:9.1f} us  floor {floor_us:8.1f} us"
                  f"  {row['gbps']:6.0f} GB/s = {row['pct']:5.1f}% of ceiling", flush=True)
    print(json.dumps({"bench": "paged_attention", "device": device, "jax": jax.__version__,
                      "shape": cfg.name, "ceiling_gbps": ceiling / 1e9, "results": rows}))


if __name__ == "__main__":
    main()
