"""LoRA shrink/expand kernel benchmark (h = 4096, bfloat16) against XLA and the bytes floor.

Each op is timed as its marginal cost inside one jitted program: a `fori_loop` whose body
runs the op U times, each time on different adapter slots rotating through a bank larger
than L2 (so weights come from HBM), timed at two trip counts; the difference over the extra
calls, median of repeats, minus the same loop's cost with an empty body (printed as `loop`).
Popularity of adapters among the T tokens (REFERENCE.md §1): distinct, uniform (ceil(sqrt T)
adapters), skewed (segments 1, 1, 2, 3, 5, 7, 11, ... growing x1.5), identical.

Baselines beside each Pallas op: `xla` gather-einsum (the reference), `ragged` =
jax.lax.ragged_dot over the batch's adapters (gathered first), `dense` = one adapter's plain
matmul of the same shape (the speed of light). Bytes floor per REFERENCE.md §3 (y read and
written by the expand), over the measured copy bandwidth.

    python -m benchmarks.bench_lora_kernels --ranks 16 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_decode import copy_bandwidth
from benchmarks.profiling import print_kernels
from pallas_kernels.lora import (POOL_SLACK_ROWS, LoraBatch, LoraBlocks, LoraWeights,
                                 lora_apply, lora_expand, lora_gemm_tokens, lora_project,
                                 lora_shrink)

U = 16                  # ops per loop iteration
CONFIGS = {  # named block configurations for --configs sweeps
    "default": LoraBlocks(),
    "n512": LoraBlocks(block_n=512),
    "n512s3": LoraBlocks(block_n=512, block_k=512, num_stages=3),
    "split4": LoraBlocks(max_splits=4),
    "split2n512": LoraBlocks(max_splits=2, block_n=512),
    "p1024n512": LoraBlocks(target_programs=1024, block_n=512),
    "w8n512": LoraBlocks(num_warps=8, block_n=512, block_k=512),
    "t64n512": LoraBlocks(block_t=64, block_n=512, max_splits=4),
}
BANK_BYTES = 160 << 20  # A (or B) pool size at h=4096: well beyond the 50-60 MB L2


def popularity(case: str, T: int) -> list[int]:
    """Segment sizes (tokens per adapter) of one popularity case."""
    if case == "prefill":  # 8 prompts of equal length, each on its own adapter
        return [T // 8] * 8
    if case == "distinct":
        return [1] * T
    if case == "identical":
        return [T]
    if case == "uniform":
        n = math.ceil(math.sqrt(T))
        return [T // n + (i < T % n) for i in range(n) if T // n + (i < T % n)]
    sizes = []   # skewed: floor(1.5^k) = 1, 1, 2, 3, 5, 7, 11, ... until they fill T
    while sum(sizes) < T:
        sizes.append(min(math.floor(1.5 ** len(sizes)), T - sum(sizes)))
    return sizes


def make_bank(r: int, h: int, widths, key):
    n_slots = max(2, BANK_BYTES // (2 * r * 4096)) + 1
    rows = (n_slots - 1) * r + POOL_SLACK_ROWS
    ka, *kb = jax.random.split(key, 1 + len(widths))
    M = len(widths)
    start = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.arange(n_slots - 1, dtype=jnp.int32) * r])
    weights = LoraWeights(
        a=jax.random.normal(ka, (rows, h), jnp.bfloat16) * 0.02,
        b=tuple(jax.random.normal(k, (rows, n), jnp.bfloat16) * 0.02 for k, n in zip(kb, widths)),
        a_start=jnp.tile(start, (1, M, 1)), b_start=jnp.tile(start, (1, M, 1)),
        rank=jnp.tile(jnp.full(n_slots, r, jnp.int32).at[0].set(0), (1, M, 1)),
        scale=jnp.ones((1, M, n_slots), jnp.float32), max_rank=r)
    return weights, n_slots


def batches(sizes: list[int], n_slots: int, segments: bool, rot: int):
    """U batch descriptions of the same shape, on disjoint rotating slots."""
    n = len(sizes)
    out = []
    for k in range(U):
        slots = 1 + (np.arange(n) + (rot + k) * n) % (n_slots - 1)
        if segments:
            starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
            out.append(LoraBatch(seg_starts=jnp.asarray(starts), seg_slots=jnp.asarray(
                slots, jnp.int32)))
        else:
            out.append(LoraBatch(token_slots=jnp.asarray(np.repeat(slots, sizes), jnp.int32)))
    return out


def marginal_us(body, carry, args, reps: int) -> float:
    """Per-iteration time of fori_loop(body), in microseconds (median of repeats).

    Arrays reach the program as arguments (`args`), never as captured constants.
    """
    run = jax.jit(lambda n, c, a: jax.lax.fori_loop(0, n, lambda i, c: body(c, a), c))
    jax.block_until_ready(run(1, carry, args))
    diffs = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(run(2, carry, args))
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(run(10, carry, args))
        diffs.append((time.perf_counter() - t - t1) / 8)
    return statistics.median(diffs) * 1e6


def outputs_carried(fn, x, args):
    """(body, carry) that keep every op's whole output as loop state, so XLA can neither
    drop an op nor compute only the part of its output that a consumer reads; x takes a
    negligible nudge from the last output so no op is loop-invariant (hoisted out)."""
    shapes = jax.eval_shape(lambda x, a: fn(x, a), x, args)
    carry = (x, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

    def body(c, a):
        x, outs = c
        x = x + (jax.tree.leaves(outs)[-1].ravel()[0] * 1e-30).astype(x.dtype)
        return x, fn(x, a)
    return body, carry


def shrink_ops(fn):
    """U shrinks of one x, each on its own rotation of slots."""
    def ops(x, args):
        weights, items = args
        return tuple(fn(x, weights, item) for item in items)
    return ops


def carried_us(fn, x, args, reps):
    body, carry = outputs_carried(fn, x, args)
    return marginal_us(body, carry, args, reps)


def expand_body(fn):
    def body(y, args):
        v, weights, items = args
        for item in items:
            y = fn(y, v, weights, item)
        return y
    return body


def ragged_inputs(weights, sizes, n_slots, rot=0):
    """Per-op adapter groups in ragged_dot's [G, K, N] layout, gathered from the bank."""
    n, r = len(sizes), weights.max_rank
    groups = []
    for k in range(U):
        slots = 1 + (np.arange(n) + (rot + k) * n) % (n_slots - 1)
        rows = jnp.asarray((slots - 1)[:, None] * r + np.arange(r)[None], jnp.int32)  # [n, r]
        groups.append(rows)
    return groups, jnp.asarray(sizes, jnp.int32)


def bench_case(weights, n_slots, case, T, r, ceiling, reps, baselines, configs=("default",)):
    sizes = popularity(case, T)
    n = len(sizes)
    H, N = weights.a.shape[1], sum(weights.widths)
    key = jax.random.key(T * 7 + r)
    x = jax.random.normal(key, (T, H), jnp.bfloat16)
    y = jax.random.normal(key, (T, N), jnp.bfloat16)
    bytes_shrink = 2 * T * H + 2 * n * r * H + 2 * T * r
    bytes_expand = 2 * T * r + 2 * n * r * N + 4 * T * N
    rows = []

    def record(op, variant, us, nbytes):
        floor = nbytes / ceiling * 1e6
        rows.append(dict(case=case, T=T, r=r, op=op, variant=variant, us=us, floor_us=floor,
                         gbps=nbytes / us / 1e3, pct=100 * nbytes / (us * 1e-6) / ceiling,
                         target_us=max(1.2 * floor, floor + 2.0)))

    forms = ["tokens"] + (["segments"] if case != "distinct" else [])
    for form, name in [(f, c) for f in forms for c in configs]:
        blocks = CONFIGS[name]
        tag = f"pallas-{form}" + ("" if name == "default" else f"-{name}")
        items = batches(sizes, n_slots, form == "segments", rot=0)
        v = lora_shrink(x, weights, items[0], blocks=blocks)
        record("shrink", tag, carried_us(shrink_ops(
            lambda x, w, b: lora_shrink(x, w, b, blocks=blocks)), x, (weights, items),
            reps) / U, bytes_shrink)
        record("expand", tag, marginal_us(expand_body(
            lambda y, v, w, b: lora_expand(y, v, w, b, blocks=blocks)), y, (v, weights, items),
            reps) / U, bytes_expand)
    if not baselines:
        return rows
    items = batches(sizes, n_slots, False, rot=0)
    v = lora_shrink(x, weights, items[0], impl="xla")
    record("shrink", "xla", carried_us(shrink_ops(
        lambda x, w, b: lora_shrink(x, w, b, impl="xla")), x, (weights, items),
        reps) / U, bytes_shrink)
    record("expand", "xla", marginal_us(expand_body(
        lambda y, v, w, b: lora_expand(y, v, w, b, impl="xla")), y, (v, weights, items),
        reps) / U, bytes_expand)
    groups, group_sizes = ragged_inputs(weights, sizes, n_slots)
    vr = jnp.zeros((T, r), jnp.bfloat16) + 0.01

    def ragged_shrink(x, args):
        a_pool, groups, group_sizes = args
        return tuple(jax.lax.ragged_dot(x, jnp.swapaxes(a_pool[rows_], 1, 2), group_sizes)
                     for rows_ in groups)                                # a: [n, H, r]

    def ragged_expand(yy, args):
        vr, b_pool, groups, group_sizes = args
        for rows_ in groups:
            yy = yy + jax.lax.ragged_dot(vr, b_pool[rows_], group_sizes).astype(yy.dtype)
        return yy

    record("shrink", "ragged", carried_us(ragged_shrink, x, (weights.a, groups, group_sizes),
                                          reps) / U, bytes_shrink)
    record("expand", "ragged", marginal_us(ragged_expand, y, (vr, weights.b[0], groups,
                                                              group_sizes), reps) / U,
           bytes_expand)
    dense_a = [weights.a[k * r:(k + 1) * r].T for k in range(U)]        # [H, r] each
    dense_b = [weights.b[0][k * r:(k + 1) * r] for k in range(U)]       # [r, N] each

    def dense_shrink(x, dense_a):
        return tuple(x @ a for a in dense_a)

    def dense_expand(yy, args):
        vr, dense_b = args
        for b in dense_b:
            yy = yy + (vr @ b).astype(yy.dtype)
        return yy

    record("shrink", "dense", carried_us(dense_shrink, x, dense_a, reps) / U,
           2 * T * H + 2 * r * H + 2 * T * r)
    record("expand", "dense", marginal_us(dense_expand, y, (vr, dense_b), reps) / U,
           2 * T * r + 2 * r * N + 4 * T * N)
    return rows


def bench_fused(T, r, h, reps):
    """q/k/v in one launch pair vs three: shrink + expand, distinct adapters."""
    widths = (h, h // 4, h // 4)   # llama3-8b's GQA widths at h=4096
    weights, n_slots = make_bank(r, h, widths, jax.random.key(99))
    x = jax.random.normal(jax.random.key(1), (T, h), jnp.bfloat16)
    y = jax.random.normal(jax.random.key(2), (T, sum(widths)), jnp.bfloat16)
    items = batches([1] * T, n_slots, False, rot=0)
    singles = [LoraWeights(a=weights.a, b=(weights.b[m],), a_start=weights.a_start[:, m:m + 1],
                           b_start=weights.b_start[:, m:m + 1], rank=weights.rank[:, m:m + 1],
                           scale=weights.scale[:, m:m + 1], max_rank=r) for m in range(3)]

    def fused(yy, args):
        x, weights, items = args
        for b in items:
            yy = lora_expand(yy, lora_shrink(x, weights, b), weights, b)
        return yy

    def separate(ys, args):
        x, singles, items = args
        for b in items:
            ys = tuple(lora_expand(ym, lora_shrink(x, w, b), w, b) for ym, w in zip(ys, singles))
        return ys

    parts = (y[:, :h], y[:, h:h + h // 4], y[:, h + h // 4:])
    t_fused = marginal_us(fused, y, (x, weights, items), reps) / U
    t_sep = marginal_us(separate, parts, (x, singles, items), reps) / U
    return dict(T=T, r=r, fused_us=t_fused, separate_us=t_sep, ratio=t_fused / t_sep)


def groups(h: int) -> dict:
    """llama2-7b's projection groups at h = 4096: (input features D, module widths)."""
    f = -(-h * 43 // 16) // 16 * 16   # 11008 at h = 4096
    return {"qkv": (h, (h, h, h)), "o": (h, (h,)), "gate_up": (h, (f, f)), "down": (f, (h,))}


APPLY = {"split": LoraBlocks(), "fused": LoraBlocks(fused_tokens=True)}


def bench_apply(group: str, h: int, case: str, T: int, r: int, ceiling: float,
                reps: int) -> dict:
    """Shrink + expand of one projection group as the decode step runs it (one slot per
    token): the split kernels (two launches) against the fused one and XLA's reference."""
    D, widths = groups(h)[group]
    weights, n_slots = make_bank(r, D, widths, jax.random.key(T + r))
    sizes = popularity(case, T)
    items = batches(sizes, n_slots, False, rot=0)
    x = jax.random.normal(jax.random.key(1), (T, D), jnp.bfloat16)
    y = jax.random.normal(jax.random.key(2), (T, sum(widths)), jnp.bfloat16)
    out = dict(group=group, case=case, T=T, r=r)
    ref = lora_apply(x, jnp.array(y), weights, items[0], impl="xla")   # y is donated
    for name, blocks in [*APPLY.items(), ("xla", None)]:
        impl = "xla" if blocks is None else "pallas"
        blocks = blocks or LoraBlocks()
        got = lora_apply(x, jnp.array(y), weights, items[0], impl=impl, blocks=blocks)
        err = float(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32)).max())
        assert err <= 0.05 * float(jnp.abs(ref.astype(jnp.float32)).max()), (name, err)

        def body(yy, args, impl=impl, blocks=blocks):
            x, weights, items = args
            for b in items:
                yy = lora_apply(x, yy, weights, b, impl=impl, blocks=blocks)
            return yy
        out[f"{name}_us"] = marginal_us(body, y, (x, weights, items), reps) / U
    n = len(sizes)
    nbytes = 2 * T * D + 2 * n * r * (D + sum(widths)) + 4 * T * sum(widths)
    out["floor_us"] = nbytes / ceiling * 1e6
    return out


GEMMS = {  # --project: Pallas matmul tilings (the base matmul and LoRA in one launch)
    "g64": LoraBlocks(gemm=True),
    "g128": LoraBlocks(gemm=True, gemm_block_n=128),
    "g64k256": LoraBlocks(gemm=True, gemm_block_k=256, gemm_stages=3),
    "g32k256": LoraBlocks(gemm=True, gemm_block_n=32, gemm_block_k=256, gemm_stages=3),
    "g64p132": LoraBlocks(gemm=True, gemm_programs=132),
    "g128w8": LoraBlocks(gemm=True, gemm_block_n=128, gemm_warps=8, gemm_programs=528),
    "g64l256": LoraBlocks(gemm=True, gemm_block_l=256),
    "g64s3": LoraBlocks(gemm=True, gemm_stages=3),
}


def bench_project(group: str, h: int, case: str, T: int, r: int, ceiling: float, reps: int,
                  gemms: list[str], pgemm: bool = True) -> dict:
    """One projection group of the decode step, base matmul included: XLA's matmul alone
    (`base`), the Pallas matmul alone (`pgemm:<tiling>`), XLA's matmul + the split kernels
    (`split`, today's step) and the shrink + the Pallas matmul computing the expand too
    (`gemm:<tiling>`). 8 ops per loop iteration, each on its own adapter slots and its own
    copy of the base weight (together past L2). Microseconds per op, bytes floor beside."""
    D, widths = groups(h)[group]
    N = sum(widths)
    weights, n_slots = make_bank(r, D, widths, jax.random.key(T + r))
    sizes = popularity(case, T)
    items = batches(sizes, n_slots, False, rot=0)[:8]     # 8 ops a loop: shorter compiles
    ws = [jax.random.normal(jax.random.key(10 + i), (D, N), jnp.bfloat16) * 0.02
          for i in range(len(items))]   # a weight per op: XLA may not merge equal matmuls
    x = jax.random.normal(jax.random.key(1), (T, D), jnp.bfloat16)
    ref = lora_project(x, ws[0], weights, items[0], impl="xla")
    variants = {"base": None, "split": LoraBlocks()}
    for g in gemms:   # any T takes the gemm path here (the engine's cap is its own choice)
        blocks = dataclasses.replace(GEMMS[g], gemm_max_tokens=max(T, GEMMS[g].gemm_max_tokens))
        if pgemm:
            variants[f"pgemm:{g}"] = blocks
        variants[f"gemm:{g}"] = blocks
    out = dict(group=group, case=case, T=T, r=r)
    for name, blocks in variants.items():
        if name == "base":
            fn = lambda x, w, b: x @ w                                         # noqa: E731
        elif name.startswith("pgemm"):
            fn = lambda x, w, b, bl=blocks: lora_gemm_tokens(x, w, None, None, None,  # noqa
                                                             blocks=bl)
        else:
            fn = lambda x, w, b, bl=blocks: lora_project(x, w, weights, b, blocks=bl)  # noqa
        got = fn(x, ws[0], items[0])
        want = x @ ws[0] if name == "base" or name.startswith("pgemm") else ref
        err = float(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)).max())
        assert err <= 0.02 * float(jnp.abs(want.astype(jnp.float32)).max()), (name, err)

        def ops(x, args, fn=fn):
            ws, items = args
            return tuple(fn(x, w, b) for w, b in zip(ws, items))
        out[f"{name}_us"] = carried_us(ops, x, (ws, items), reps) / len(items)
    n = len(sizes)
    out["base_floor_us"] = (2 * D * N + 2 * T * (D + N)) / ceiling * 1e6
    out["floor_us"] = out["base_floor_us"] + 2 * n * r * (D + N) / ceiling * 1e6
    return out


def profile_ops(r: int, h: int):
    """Kernels of one shrink + expand, distinct T=64 (tokens) and identical T=256 (segments)."""
    weights, n_slots = make_bank(r, h, (h,), jax.random.key(5))
    for case, T, segments in (("distinct", 64, False), ("identical", 256, True)):
        batch = batches(popularity(case, T), n_slots, segments, rot=3)[0]
        x = jax.random.normal(jax.random.key(1), (T, h), jnp.bfloat16)
        y = [jax.random.normal(jax.random.key(2), (T, h), jnp.bfloat16)]

        def work():
            y[0] = lora_expand(y[0], lora_shrink(x, weights, batch), weights, batch)
            y[0].block_until_ready()

        work()
        print_kernels(work, 10, f"shrink + expand, {case} T={T} r={r}, "
                                f"{'segments' if segments else 'tokens'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="*", default=[16, 64])
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 16, 32, 64, 128, 256])
    ap.add_argument("--cases", nargs="+", default=["distinct", "uniform", "skewed", "identical"])
    ap.add_argument("--baselines", nargs="*", default=["distinct", "identical"],
                    help="cases that also time the xla, ragged and dense baselines")
    ap.add_argument("--prefill", action="store_true", help="also T=4096 in 8 segments")
    ap.add_argument("--fused", type=int, nargs="*", default=[], help="T values for q/k/v fusion")
    ap.add_argument("--apply", type=int, nargs="*", default=[],
                    help="T values: llama2-7b's groups, split vs fused shrink + expand")
    ap.add_argument("--apply-cases", nargs="+", default=["distinct", "identical"])
    ap.add_argument("--project", type=int, nargs="*", default=[],
                    help="T values: llama2-7b's groups with their base matmul, XLA + split "
                         "kernels vs the Pallas matmul computing LoRA in the same launch")
    ap.add_argument("--gemms", nargs="+", default=["g64"], choices=list(GEMMS),
                    help="--project: Pallas matmul tilings")
    ap.add_argument("--pgemm", action="store_true",
                    help="--project: also time the Pallas matmul alone")
    ap.add_argument("--groups", nargs="+", default=["qkv", "o", "gate_up", "down"],
                    help="--project: which of llama2-7b's projection groups")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=4096, help="h (smaller for smoke runs)")
    ap.add_argument("--profile", action="store_true", help="list the kernels of a few cases")
    ap.add_argument("--configs", nargs="+", default=["default"], choices=list(CONFIGS),
                    help="block configurations of the Pallas ops to time")
    args = ap.parse_args()
    h = args.hidden

    ceiling, method = copy_bandwidth()
    loop = marginal_us(lambda c, a: c + 1, jnp.zeros((), jnp.float32), (), args.reps) / U
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, h={h}, bf16; copy "
          f"ceiling {ceiling / 1e9:.0f} GB/s ({method}); empty-loop share per op {loop:.2f} us")
    print(f"{'case':9s} {'T':>4s} {'r':>3s} {'op':6s} {'variant':26s} {'us':>8s} "
          f"{'floor':>7s} {'target':>7s} {'GB/s':>6s} {'%ceil':>6s}")
    rows = []

    def report(row):
        row["us"] -= loop
        row["gbps"] = row["gbps"] * (row["us"] + loop) / row["us"]
        row["pct"] = row["pct"] * (row["us"] + loop) / row["us"]
        rows.append(row)
        mark = "" if not row["variant"].startswith("pallas") else \
            (" ok" if row["us"] <= row["target_us"] else " MISS")
        print(f"{row['case']:9s} {row['T']:4d} {row['r']:3d} {row['op']:6s} "
              f"{row['variant']:26s} {row['us']:8.2f} {row['floor_us']:7.2f} "
              f"{row['target_us']:7.2f} {row['gbps']:6.0f} {row['pct']:6.1f}{mark}", flush=True)

    for r in args.ranks:
        weights, n_slots = make_bank(r, h, (h,), jax.random.key(r))
        for T in args.tokens:
            for case in args.cases:
                for row in bench_case(weights, n_slots, case, T, r, ceiling, args.reps,
                                      case in args.baselines, args.configs):
                    report(row)
        if args.prefill:
            for row in bench_case(weights, n_slots, "prefill", 4096, r, ceiling,
                                  max(5, args.reps // 4), True):
                report(row)
    if args.profile:
        profile_ops(16, h)
    fused = []
    for T in args.fused:
        f = bench_fused(T, 16, h, args.reps)
        f["fused_us"] -= loop
        f["separate_us"] -= loop
        f["ratio"] = f["fused_us"] / f["separate_us"]
        fused.append(f)
        print(f"fused q/k/v T={T} r=16: one launch pair {f['fused_us']:.2f} us vs three "
              f"{f['separate_us']:.2f} us: ratio {f['ratio']:.2f} (target <= 0.8)")
    applied = []
    for T in args.apply:
        for case in args.apply_cases:
            for group in groups(h):
                a = bench_apply(group, h, case, T, 16, ceiling, args.reps)
                for k in ("split_us", "fused_us", "xla_us"):
                    a[k] -= loop
                applied.append(a)
                print(f"apply {group:7s} {case:9s} T={T:3d} r=16: split {a['split_us']:7.2f} "
                      f"fused {a['fused_us']:7.2f} xla {a['xla_us']:7.2f} us, floor "
                      f"{a['floor_us']:6.2f} us; fused / split "
                      f"{a['fused_us'] / a['split_us']:.2f}", flush=True)
    projected = []
    for T in args.project:
        for case in args.apply_cases:
            for group in args.groups:
                p = bench_project(group, h, case, T, 16, ceiling, args.reps, args.gemms,
                                  args.pgemm)
                for k in p:
                    if k.endswith("_us") and "floor" not in k:
                        p[k] -= loop
                projected.append(p)
                times = "  ".join(f"{k[:-3]} {v:6.2f}" for k, v in p.items()
                                  if k.endswith("_us") and "floor" not in k)
                print(f"project {group:7s} {case:9s} T={T:3d}: {times}  floor base "
                      f"{p['base_floor_us']:.2f} with LoRA {p['floor_us']:.2f} us", flush=True)
    print(json.dumps(dict(bench="lora_kernels", device=jax.devices()[0].device_kind,
                          jax=jax.__version__, ceiling_gbps=ceiling / 1e9, loop_us=loop,
                          results=rows, fused=fused, apply=applied, project=projected)))


if __name__ == "__main__":
    main()
