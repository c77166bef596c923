"""LoRA shrink and expand for batches that mix adapters, ranks and variants (Punica's SGMV).

For token t on adapter slot s = s(t), for each module m of a projection group (q, k, v say):

    shrink   v[m, t] = (x[t] @ A_m[s]) * u_m[s]                              [T, D] -> [T, r]
    expand   y[t, cols_m] = g_m[s] * (y[t, cols_m] + scale_m[s] * (v[m, t] @ B_m[s]) * w_m[s])

LoRA has u = w = g = 1; Tied-LoRA's u and v are u and w (its A and B are shared by all
layers); DoRA's magnitude scale m / ||W + s.BA|| is g, which also scales the base output y.
y arrives holding the base projection's output of the whole group (bias not yet added). The
kernels compute the adapters' term alone, delta = g * scale * (v @ B) * w (zero on slot 0,
"no adapter"); y * g[slot] + delta is left to XLA, which fuses it into whatever reads the
projection next (with the matmul's own epilogue), so no launch reads and rewrites y.

Weights live in row pools (`LoraWeights`): row i of the A pool is one rank dimension of some
adapter's A^T, so an adapter of rank r owns r consecutive rows wherever the bank put them.
Kernels loop over exactly `rank[m, s]` rows, so ranks 8 to 256 mix in one batch without
reading or computing any padding up to the largest rank.

A batch is described one of two ways (`LoraBatch`): one slot per token (decode), served by
per-token kernels (one program per token and column block, split-K over D for the shrink);
or sorted segments (prefill), served by segment kernels whose tiles of tokens share one
adapter and multiply on the tensor cores. The shrink returns `v` as per-split partial sums
[KS, M, T, R] (float32) that the expand adds up, so no extra launch reduces them. For
per-token batches `LoraBlocks(fused_tokens=True)` does both in one launch instead (each
program keeps its token's v in registers; see `lora_fused_tokens`), and `lora_project` with
`LoraBlocks(gemm=True)` runs the base projection itself in Pallas, the expand beside it in
the same launch (`lora_gemm_tokens`).

Tables come stacked over layers and `LoraWeights.layer` picks one inside the kernels: a
step's launches take the bank's arrays as they are (slicing a layer's tables out would cost a
device copy per table per launch: 512 copies in a llama2-7b step).

Every op has `impl="pallas"|"xla"`; the XLA references at the end of the file are the CPU
path and the test oracle. This module knows nothing about models or the host-side bank
allocator.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.lora_kernels import (expand_segments_kernel, expand_tokens_kernel,
                                         fused_tokens_kernel, gemm_tokens_kernel,
                                         shrink_segments_kernel, shrink_tokens_kernel)

IMPLS = ("pallas", "xla")
POOL_SLACK_ROWS = 64   # unused rows at each pool's end: a full row block never runs past it


@functools.partial(jax.tree_util.register_dataclass, data_fields=[
    "a", "b", "a_start", "b_start", "rank", "scale", "u", "w", "g"],
    meta_fields=["max_rank", "layer"])
@dataclass(frozen=True)
class LoraWeights:
    """The adapters of one projection group of M modules (S slots each), with tables for L
    layers, used at layer `layer`.

    a        [Pa, D]          A rows of every module, slot and layer (row = one rank dim of A^T)
    b        M x [Pb_m, N_m]  B rows of module m
    a_start  [L, M, S] int32  first A row of slot s for module m; b_start likewise for B
    rank     [L, M, S] int32  0 where slot s has no adapter on module m (slot 0 always)
    scale    [L, M, S] f32    lora_alpha / r (or / sqrt(r))
    u        [L, M, S, R] or None: per-rank vector;  w, g: M x [L, S, N_m] or None
    max_rank static: the largest rank any slot may hold (sets the width R of v)
    layer    static: the layer whose tables the kernels read
    """

    a: jax.Array
    b: tuple[jax.Array, ...]
    a_start: jax.Array
    b_start: jax.Array
    rank: jax.Array
    scale: jax.Array
    u: jax.Array | None = None
    w: tuple[jax.Array, ...] | None = None
    g: tuple[jax.Array, ...] | None = None
    max_rank: int = 16
    layer: int = 0

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(b.shape[1] for b in self.b)

    def tables_at_layer(self) -> dict:
        """a_start, b_start, rank, scale [M, S], u [M, S, R], w and g M x [S, N_m] of
        `layer` (for XLA code, where a slice costs nothing)."""
        L = self.layer
        return dict(a_start=self.a_start[L], b_start=self.b_start[L], rank=self.rank[L],
                    scale=self.scale[L], u=None if self.u is None else self.u[L],
                    w=None if self.w is None else tuple(x[L] for x in self.w),
                    g=None if self.g is None else tuple(x[L] for x in self.g))


class LoraBatch(NamedTuple):
    """Which adapter each token uses: token_slots [T], or sorted segments.

    Segments: tokens seg_starts[i] <= t < seg_starts[i + 1] use slot seg_slots[i]
    (seg_starts [NSEG + 1] int32, non-decreasing, from 0 to T; seg_slots [NSEG] int32).
    Example: T=5 tokens, first 2 on slot 3, next 3 on slot 0: seg_starts [0, 2, 5], seg_slots
    [3, 0]; the same as token_slots [3, 3, 0, 0, 0].
    """

    token_slots: jax.Array | None = None
    seg_starts: jax.Array | None = None
    seg_slots: jax.Array | None = None

    @property
    def is_segments(self) -> bool:
        return self.seg_starts is not None


@dataclass(frozen=True)
class LoraBlocks:
    block_r: int = 16      # rank rows per step (at most POOL_SLACK_ROWS)
    block_k: int = 256     # shrink: input columns per step
    block_n: int = 512     # expand: output columns per program
    block_t: int = 32      # segment kernels: tokens per tile
    num_warps: int = 4
    num_stages: int = 2
    target_programs: int = 512   # the shrink splits D until about this many programs run...
    max_splits: int = 8          # ...into at most this many parts (the expand adds them up)
    fused_tokens: bool = False   # per-token batches: shrink and expand in one launch
    fused_programs: int = 256    # the fused kernel splits each module's columns into chunks
    max_chunks: int = 8          # until about this many programs run, into at most max_chunks
    gemm: bool = False           # per-token batches: the base matmul in a Pallas kernel that
    gemm_max_tokens: int = 32    # computes the expand in the same launch (`lora_project`), for
    gemm_block_t: int = 32       # steps of up to this many tokens (larger: XLA, then split;
                                 # on an H200 the gemm path is 2% slower at 64 tokens)
    gemm_block_n: int = 64
    gemm_block_k: int = 128
    gemm_block_l: int = 128      # (token, rank row) pairs per step of the term's loop
    gemm_programs: int = 264     # split D until about this many programs run (2 per SM)...
    gemm_max_splits: int = 4     # ...into at most this many float32 partial outputs
    gemm_warps: int = 4
    gemm_stages: int = 4
    # the projection groups (a bank's names) that take the gemm path when gemm is on; the
    # others keep XLA's matmul and the split kernels. On an H200 at batch 32 the gemm path
    # gains on q/k/v and down and loses on o and gate_up (benchmarks/RESULTS.md, issue 5)
    gemm_groups: tuple[str, ...] = ("qkv", "down")


def v_width(max_rank: int, blocks: LoraBlocks = LoraBlocks()) -> int:
    return max(blocks.block_r, pl.next_power_of_2(max_rank))


def fused_fits(max_rank: int, blocks: LoraBlocks = LoraBlocks()) -> bool:
    """Can `lora_fused_tokens` serve a bank of this rank? It reads all v_width rank rows of
    a slot in one tile, which the pools' slack rows must cover."""
    return v_width(max_rank, blocks) <= POOL_SLACK_ROWS


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def _compiler(blocks: LoraBlocks):
    return pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _interpret(interpret: bool | None) -> bool:
    return jax.default_backend() == "cpu" if interpret is None else interpret


# ----------------------------------------------------------------------------- public wrappers

def _check(x_or_y, weights: LoraWeights, batch: LoraBatch, impl: str, what: str,
           blocks: LoraBlocks):
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r} is not one of {IMPLS}")
    if (batch.token_slots is None) == (batch.seg_starts is None):
        raise ValueError("describe the batch by token_slots or by seg_starts and seg_slots, "
                         "exactly one of them")
    if batch.is_segments and (batch.seg_slots is None or batch.seg_starts.ndim != 1 or
                              batch.seg_slots.shape != (batch.seg_starts.shape[0] - 1,)):
        raise ValueError(f"seg_starts must be [NSEG + 1] and seg_slots [NSEG], got "
                         f"{getattr(batch.seg_starts, 'shape', None)} and "
                         f"{getattr(batch.seg_slots, 'shape', None)}")
    T = x_or_y.shape[0]
    if not batch.is_segments and batch.token_slots.shape != (T,):
        raise ValueError(f"token_slots has shape {batch.token_slots.shape}, expected ({T},)")
    M = len(weights.b)
    tables = (weights.a_start, weights.b_start, weights.rank, weights.scale)
    if M == 0 or any(t.ndim != 3 or t.shape != tables[0].shape for t in tables) \
            or tables[0].shape[1] != M:
        raise ValueError(f"a_start, b_start, rank and scale must all be [L, M={M}, S], got "
                         f"{[t.shape for t in tables]}")
    L, _, S = tables[0].shape
    if not 0 <= weights.layer < L:
        raise ValueError(f"layer={weights.layer} is not in [0, {L}) (the tables' layers)")
    if blocks.block_r > POOL_SLACK_ROWS or blocks.block_r & (blocks.block_r - 1):
        raise ValueError(f"block_r={blocks.block_r} must be a power of two <= {POOL_SLACK_ROWS}")
    if weights.a.ndim != 2 or weights.a.shape[0] < POOL_SLACK_ROWS:
        raise ValueError(f"the A pool must be [rows >= {POOL_SLACK_ROWS}, D], got "
                         f"{weights.a.shape}")
    for name in ("w", "g"):
        vecs = getattr(weights, name)
        if vecs is not None and [v.shape for v in vecs] != [(L, S, n) for n in weights.widths]:
            raise ValueError(f"{name} must be one [L={L}, S={S}, N_m] array per module, got "
                             f"{[v.shape for v in vecs]}")
    if weights.u is not None and (weights.u.ndim != 4 or weights.u.shape[:3] != (L, M, S)):
        raise ValueError(f"u must be [L={L}, M={M}, S={S}, R], got {weights.u.shape}")
    if what == "shrink" and x_or_y.shape[1] != weights.a.shape[1]:
        raise ValueError(f"x has {x_or_y.shape[1]} features but the A pool has "
                         f"{weights.a.shape[1]}")
    if what == "expand" and x_or_y.shape[1] != sum(weights.widths):
        raise ValueError(f"y has {x_or_y.shape[1]} columns but the modules' outputs add up to "
                         f"{sum(weights.widths)} ({weights.widths})")


def _block(n: int, cap: int, what: str) -> int:
    size = _pow2_divisor(n, cap)
    if size < 16:
        raise ValueError(f"{what}={n} must be a multiple of 16 for the Pallas LoRA kernels")
    return size


def _padded_u(weights: LoraWeights, R: int):
    u = weights.u
    if u is not None and u.shape[3] < R:
        u = jnp.pad(u, ((0, 0), (0, 0), (0, 0), (0, R - u.shape[3])))
    return u


@functools.partial(jax.jit, static_argnames=("impl", "blocks", "interpret"))
def lora_shrink(x: jax.Array, weights: LoraWeights, batch: LoraBatch, *, impl: str = "pallas",
                blocks: LoraBlocks = LoraBlocks(), interpret: bool | None = None) -> jax.Array:
    """v = (x @ A[slot]) * u for every module of the group.

    x [T, D] -> float32 partial sums [KS, M, T, R] (R = v_width(max_rank)); v is their sum
    over the first axis. Entries at or past a token's rank are unspecified.
    """
    _check(x, weights, batch, impl, "shrink", blocks)
    R = v_width(weights.max_rank, blocks)
    if impl == "xla":
        return lora_shrink_reference(x, weights, token_slots_of(batch, x.shape[0]), R)
    T, D = x.shape
    M, BR = len(weights.b), blocks.block_r
    BK = _block(D, blocks.block_k, "input features D")
    u = _padded_u(weights, R)
    tables = [weights.a_start, weights.rank]
    operands = [x, weights.a] + ([u] if u is not None else [])
    n_kblocks = D // BK
    if batch.is_segments:
        BT = blocks.block_t
        xp = jnp.pad(x, ((0, max(0, BT - T)), (0, 0)))
        Tp, n_seg = xp.shape[0], batch.seg_slots.shape[0]
        tiles = pl.cdiv(Tp, BT)
        n_splits = _splits(n_kblocks, tiles * M * (R // BR), blocks)
        kernel = functools.partial(shrink_segments_kernel, layer=weights.layer, block_t=BT,
                                   block_r=BR, block_k=BK, n_rblocks=R // BR,
                                   n_splits=n_splits, has_u=u is not None)
        out = pl.pallas_call(
            kernel, grid=(n_seg, tiles, M * (R // BR) * n_splits),
            out_shape=jax.ShapeDtypeStruct((n_splits, M, Tp, R), jnp.float32),
            compiler_params=_compiler(blocks), interpret=_interpret(interpret),
        )(batch.seg_starts, batch.seg_slots, *tables, xp, *operands[1:])
        return out[:, :, :T]
    n_splits = _splits(n_kblocks, T * M, blocks)
    kernel = functools.partial(shrink_tokens_kernel, layer=weights.layer, block_r=BR,
                               block_k=BK, n_splits=n_splits, n_kblocks=n_kblocks,
                               has_u=u is not None)
    return pl.pallas_call(
        kernel, grid=(T, M, n_splits),
        out_shape=jax.ShapeDtypeStruct((n_splits, M, T, R), jnp.float32),
        compiler_params=_compiler(blocks), interpret=_interpret(interpret),
    )(batch.token_slots, *tables, *operands)


def _splits(n_kblocks: int, programs: int, blocks: LoraBlocks) -> int:
    """How many parts to split D into: a power of two (the expand loads them as one tile),
    at most max_splits, so that about target_programs programs run."""
    wanted = min(n_kblocks, blocks.max_splits, max(1, blocks.target_programs // programs))
    return 1 << (wanted.bit_length() - 1)


@functools.partial(jax.jit, static_argnames=("impl", "blocks", "interpret"), donate_argnums=0)
def lora_expand(y: jax.Array, v: jax.Array, weights: LoraWeights, batch: LoraBatch, *,
                impl: str = "pallas", blocks: LoraBlocks = LoraBlocks(),
                interpret: bool | None = None) -> jax.Array:
    """y[:, cols_m] = g * (y[:, cols_m] + scale * (v_m @ B_m[slot]) * w) for every module m.

    y [T, sum N_m] (donated); v [KS, M, T, R] from `lora_shrink`. The kernel computes the
    adapters' term; adding it to y is an elementwise XLA op (see `add_term`).
    """
    _check(y, weights, batch, impl, "expand", blocks)
    if impl == "xla":
        delta = lora_expand_reference(v, weights, token_slots_of(batch, y.shape[0]), y.dtype)
    else:
        delta = _expand_term(v, weights, batch, y.shape[0], y.dtype, blocks, interpret)
    return add_term(y, delta, weights, batch)


def add_term(y: jax.Array, delta: jax.Array, weights: LoraWeights,
             batch: LoraBatch) -> jax.Array:
    """y * g[slot] + delta, in float32 and rounded once (g: DoRA's, 1 on other slots)."""
    out = y.astype(jnp.float32)
    if weights.g is not None:
        slots = token_slots_of(batch, y.shape[0])
        out = out * jnp.concatenate([g[weights.layer][slots] for g in weights.g], axis=1)
    return (out + delta.astype(jnp.float32)).astype(y.dtype)


def _expand_term(v: jax.Array, weights: LoraWeights, batch: LoraBatch, T: int, dtype,
                 blocks: LoraBlocks, interpret: bool | None) -> jax.Array:
    """The Pallas expand: every token's term [T, sum N_m] in `dtype`."""
    M, BR = len(weights.b), blocks.block_r
    widths = weights.widths
    BN = min(_block(n, blocks.block_n, "module output width") for n in widths)
    first_block = tuple(sum(n // BN for n in widths[:m]) for m in range(M + 1))
    has_w, has_g = weights.w is not None, weights.g is not None
    vectors = [*(weights.w or ()), *(weights.g or ())]
    tables = [weights.b_start, weights.rank, weights.scale]
    statics = dict(M=M, layer=weights.layer, block_r=BR, block_n=BN, first_block=first_block,
                   has_w=has_w, has_g=has_g)
    if batch.is_segments:
        BT = blocks.block_t
        pad = max(0, BT - T)
        vp = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else v
        out = pl.pallas_call(
            functools.partial(expand_segments_kernel, block_t=BT, **statics),
            grid=(batch.seg_slots.shape[0], pl.cdiv(T + pad, BT), first_block[-1]),
            out_shape=jax.ShapeDtypeStruct((T + pad, sum(widths)), dtype),
            compiler_params=_compiler(blocks), interpret=_interpret(interpret),
        )(batch.seg_starts, batch.seg_slots, *tables, vp, *weights.b, *vectors)
        return out[:T] if pad else out
    return pl.pallas_call(
        functools.partial(expand_tokens_kernel, **statics),
        grid=(T, first_block[-1]),
        out_shape=jax.ShapeDtypeStruct((T, sum(widths)), dtype),
        compiler_params=_compiler(blocks), interpret=_interpret(interpret),
    )(batch.token_slots, *tables, v, *weights.b, *vectors)


def lora_apply(x: jax.Array, y: jax.Array, weights: LoraWeights, batch: LoraBatch, *,
               impl: str = "pallas", blocks: LoraBlocks = LoraBlocks(),
               interpret: bool | None = None) -> jax.Array:
    """Shrink then expand: y (the group's base output) plus every token's adapter.
    With `blocks.fused_tokens`, a per-token batch whose bank holds ranks <= POOL_SLACK_ROWS
    runs both in one kernel (`lora_fused_tokens`)."""
    if (impl == "pallas" and blocks.fused_tokens and not batch.is_segments
            and fused_fits(weights.max_rank, blocks)):
        return lora_fused_tokens(x, y, weights, batch, blocks=blocks, interpret=interpret)
    v = lora_shrink(x, weights, batch, impl=impl, blocks=blocks, interpret=interpret)
    return lora_expand(y, v, weights, batch, impl=impl, blocks=blocks, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def lora_fused_tokens(x: jax.Array, y: jax.Array, weights: LoraWeights, batch: LoraBatch, *,
                      blocks: LoraBlocks = LoraBlocks(), interpret: bool | None = None
                      ) -> jax.Array:
    """`lora_apply` for one slot per token in a single Pallas launch: program (t, m, c)
    computes token t's v = x[t] @ A_m[slot] (all R = v_width(max_rank) rank rows in one
    tile, rows past the slot's rank masked off, so no memory is read for them) and expands
    it into chunk c of module m's column blocks; chunks are added until about
    `blocks.fused_programs` programs run. R must be <= POOL_SLACK_ROWS."""
    _check(x, weights, batch, "pallas", "shrink", blocks)
    _check(y, weights, batch, "pallas", "expand", blocks)
    if batch.is_segments:
        raise ValueError("lora_fused_tokens takes token_slots, not segments")
    R = v_width(weights.max_rank, blocks)
    if not fused_fits(weights.max_rank, blocks):
        raise ValueError(f"the fused kernel reads R={R} rank rows per slot at once; at most "
                         f"{POOL_SLACK_ROWS} (max_rank={weights.max_rank})")
    T, D = x.shape
    M, widths = len(weights.b), weights.widths
    tile = 4096                                  # f32 elements of one [R, block] tile
    BK = _block(D, min(blocks.block_k, max(16, tile // R)), "input features D")
    BN = min(_block(n, min(blocks.block_n, max(16, 2 * tile // R)), "module output width")
             for n in widths)
    n_blocks = tuple(n // BN for n in widths)
    n_chunks = max(1, min(blocks.max_chunks, max(n_blocks), blocks.fused_programs // (T * M)))
    u = _padded_u(weights, R)
    has_u, has_w, has_g = u is not None, weights.w is not None, weights.g is not None
    kernel = functools.partial(
        fused_tokens_kernel, M=M, layer=weights.layer, R=R, block_k=BK, block_n=BN,
        n_chunks=n_chunks, n_blocks=n_blocks,
        col_offset=tuple(sum(widths[:m]) for m in range(M)), has_u=has_u, has_w=has_w,
        has_g=has_g)
    operands = [*weights.b, *([u] if has_u else []), *(weights.w or ()), *(weights.g or ())]
    delta = pl.pallas_call(
        kernel, grid=(T, M * n_chunks),
        out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
        compiler_params=_compiler(blocks), interpret=_interpret(interpret),
    )(batch.token_slots, weights.a_start, weights.b_start, weights.rank, weights.scale, x,
      weights.a, *operands)
    return add_term(y, delta, weights, batch)


def lora_project(x: jax.Array, w: jax.Array, weights: LoraWeights, batch: LoraBatch, *,
                 impl: str = "pallas", blocks: LoraBlocks = LoraBlocks(),
                 interpret: bool | None = None) -> jax.Array:
    """The group's projection x @ w plus every token's adapter: [T, sum N_m] in x's dtype.

    With `blocks.gemm` (Pallas, one slot per token, T <= gemm_max_tokens) two launches do it:
    the shrink, then the Pallas matmul that computes the expand in the same launch
    (`lora_gemm_tokens`). Otherwise XLA's matmul, then `lora_apply`."""
    if (impl == "pallas" and blocks.gemm and not batch.is_segments
            and x.shape[0] <= blocks.gemm_max_tokens):
        v = lora_shrink(x, weights, batch, blocks=blocks, interpret=interpret)
        return lora_gemm_tokens(x, w, v, weights, batch, blocks=blocks, interpret=interpret)
    return lora_apply(x, x @ w, weights, batch, impl=impl, blocks=blocks, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def lora_gemm_tokens(x: jax.Array, w: jax.Array, v: jax.Array | None,
                     weights: LoraWeights | None, batch: LoraBatch | None, *,
                     blocks: LoraBlocks = LoraBlocks(), interpret: bool | None = None
                     ) -> jax.Array:
    """x [T, D] @ w [D, sum N_m] plus every token's adapter term from the shrink's partial
    sums v (`lora_shrink`), g * (x @ w) + delta, in one Pallas launch: programs for the
    matmul (D split into up to gemm_max_splits parts when the column blocks alone give too
    few programs) and programs for the term run side by side, each writing a float32
    partial sum that XLA adds up inside whatever reads the projection. With weights None,
    the plain matmul (for benchmarks)."""
    T, D = x.shape
    if w.shape[0] != D:
        raise ValueError(f"x has {D} features but w is {w.shape}")
    N = w.shape[1]
    if weights is not None:
        _check(x, weights, batch, "pallas", "shrink", blocks)
        if batch.is_segments:
            raise ValueError("lora_gemm_tokens takes token_slots, not segments")
        if N != sum(weights.widths):
            raise ValueError(f"w has {N} columns but the modules' outputs add up to "
                             f"{sum(weights.widths)} ({weights.widths})")
        if v is None or v.ndim != 4 or v.shape[1:3] != (len(weights.b), T):
            raise ValueError(f"v must be the shrink's [KS, M={len(weights.b)}, T={T}, R] "
                             f"partial sums, got {getattr(v, 'shape', None)}")
    widths = weights.widths if weights is not None else (N,)
    BN = min(_block(n, blocks.gemm_block_n, "module output width") for n in widths)
    BK = _block(D, blocks.gemm_block_k, "input features D")
    BT = max(16, min(blocks.gemm_block_t, pl.next_power_of_2(T)))
    Tp = pl.cdiv(T, BT) * BT
    programs = (Tp // BT) * (N // BN)
    wanted = min(D // BK, blocks.gemm_max_splits, max(1, blocks.gemm_programs // programs))
    n_splits = 1 << (wanted.bit_length() - 1)
    xp = jnp.pad(x, ((0, Tp - T), (0, 0))) if Tp > T else x
    parts = n_splits + (weights is not None)        # the adapters' term: one part more
    out_dtype = x.dtype if parts == 1 else jnp.float32
    compiler = pltriton.CompilerParams(num_warps=blocks.gemm_warps,
                                       num_stages=blocks.gemm_stages)
    common = dict(grid=(Tp // BT, N // BN, parts),
                  out_shape=jax.ShapeDtypeStruct((parts, Tp, N), out_dtype),
                  compiler_params=compiler, interpret=_interpret(interpret))
    statics = dict(block_t=BT, block_k=BK, block_n=BN, n_splits=n_splits)
    if weights is None:
        zero = jnp.zeros((Tp,), jnp.int32)
        out = pl.pallas_call(functools.partial(
            gemm_tokens_kernel, M=0, layer=0, first_block=(), has_w=False, has_g=False,
            block_l=16, **statics), **common)(zero, zero, zero, zero, xp, w, zero)
    else:
        slots = jnp.pad(batch.token_slots, (0, Tp - T))        # padding rows: slot 0
        vp = jnp.pad(v, ((0, 0), (0, 0), (0, Tp - T), (0, 0))) if Tp > T else v
        M, R = len(widths), v.shape[3]
        first_block = tuple(sum(n // BN for n in widths[:m]) for m in range(M + 1))
        kernel = functools.partial(   # whole tokens per chunk of the term's loop
            gemm_tokens_kernel, M=M, layer=weights.layer, first_block=first_block,
            has_w=weights.w is not None, has_g=weights.g is not None,
            block_l=max(R, min(blocks.gemm_block_l, BT * R)), **statics)
        out = pl.pallas_call(kernel, **common)(
            slots, weights.b_start, weights.rank, weights.scale, xp, w, vp, *weights.b,
            *(weights.w or ()), *(weights.g or ()))
    out = out[0] if parts == 1 else out.sum(axis=0).astype(x.dtype)
    return out[:T] if Tp > T else out


# ----------------------------------------------------------------------------- XLA references

def token_slots_of(batch: LoraBatch, T: int) -> jax.Array:
    """Per-token slots [T] of either batch description."""
    if not batch.is_segments:
        return batch.token_slots
    seg = jnp.searchsorted(batch.seg_starts, jnp.arange(T), side="right") - 1
    return batch.seg_slots[jnp.clip(seg, 0, batch.seg_slots.shape[0] - 1)]


def _slot_rows(pool, start, rank, R):
    """One slot's adapter rows [R, cols] from a pool (rows past its rank read as 0)."""
    i = jnp.arange(R)
    live = i < rank                                                    # [R]
    return jnp.where(live[:, None], pool[jnp.where(live, start + i, 0)], 0), live


def _per_slot(slots: jax.Array, n_slots: int, init: jax.Array, term) -> jax.Array:
    """Sum over slots s of where(slots == s, term(s), 0), one slot at a time and only for
    slots the batch uses: memory is that of one term ([T, cols]), never a per-token copy of
    adapter rows ([T, R, cols], which ran the CPU path out of memory on long prefills), and
    the work is that of the distinct slots in the batch, not of the whole bank."""
    def body(s, acc):
        used = slots == s
        return lax.cond(used.any(), lambda: jnp.where(used[:, None], term(s), acc),
                        lambda: acc)
    return lax.fori_loop(1, n_slots, body, init)       # slot 0 has no adapter


def lora_shrink_reference(x: jax.Array, weights: LoraWeights, slots: jax.Array,
                          R: int) -> jax.Array:
    """Shrink slot by slot: [1, M, T, R] float32 (zeros past each rank and on slot 0)."""
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    t = weights.tables_at_layer()
    u = t["u"]
    if u is not None:
        u = jnp.pad(u, ((0, 0), (0, 0), (0, max(0, R - u.shape[2]))))[:, :, :R]
    out = []
    for m in range(len(weights.b)):
        def term(s, m=m):
            a, live = _slot_rows(weights.a, t["a_start"][m, s], t["rank"][m, s], R)
            v = jnp.einsum("td,rd->tr", x, a, precision=precision,
                           preferred_element_type=jnp.float32)         # [T, R]
            if u is not None:
                v = v * u[m, s].astype(jnp.float32)
            return jnp.where(live, v, 0.0)
        out.append(_per_slot(slots, t["a_start"].shape[1],
                             jnp.zeros((x.shape[0], R), jnp.float32), term))
    return jnp.stack(out)[None]


def lora_expand_reference(v: jax.Array, weights: LoraWeights, slots: jax.Array,
                          dtype) -> jax.Array:
    """The adapters' term [T, sum N_m] (in `dtype`) from the partial sums v [KS, M, T, R],
    slot by slot."""
    R = v.shape[-1]
    v = v.sum(axis=0)                                                  # [M, T, R]
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    t = weights.tables_at_layer()
    parts = []
    for m, n in enumerate(weights.widths):
        def term(s, m=m):
            b, live = _slot_rows(weights.b[m], t["b_start"][m, s], t["rank"][m, s], R)
            delta = jnp.einsum("tr,rn->tn", jnp.where(live, v[m], 0.0), b.astype(jnp.float32),
                               precision=precision) * t["scale"][m, s]  # [T, N]
            if t["w"] is not None:
                delta = delta * t["w"][m][s].astype(jnp.float32)
            if t["g"] is not None:
                delta = delta * t["g"][m][s].astype(jnp.float32)
            return delta
        parts.append(_per_slot(slots, t["a_start"].shape[1],
                               jnp.zeros((v.shape[1], n), jnp.float32), term).astype(dtype))
    return jnp.concatenate(parts, axis=1)
