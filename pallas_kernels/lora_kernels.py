"""The Pallas (Triton backend) kernels behind `pallas_kernels.lora`: shrink and expand,
each per token (decode) and per segment (prefill); shrink and expand fused per token; and
the base matmul with the adapters' term in the same launch, per token.
The math, the data layout and the public wrappers that launch these are in lora.py; this file
holds only the kernel bodies.

Tables are stacked over layers ([L, M, S]); `layer` (static) is the one a launch runs at, so
the step passes whole tables and no per-layer slice is copied out for each launch. Expand
kernels write the adapters' term alone (zero on slot-0 rows and rank-0 modules); the wrapper
adds it to the base output, where XLA fuses the add into what reads the output next.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_HIGHEST = lax.Precision.HIGHEST   # float32 tiles multiply in IEEE float32, not TF32


# per-token kernels

def shrink_tokens_kernel(slot_ref, start_ref, rank_ref, x_ref, a_ref, *rest, layer, block_r,
                         block_k, n_splits, n_kblocks, has_u):
    u_ref, o_ref = (rest if has_u else (None, *rest))
    t, m, ks = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    s = slot_ref[t]
    rank, row0 = rank_ref[layer, m, s], start_ref[layer, m, s]
    kb0, kb1 = ks * n_kblocks // n_splits, (ks + 1) * n_kblocks // n_splits

    def rank_block(rb, carry):
        rows = rb * block_r + jnp.arange(block_r)
        live = rows < rank

        def k_step(kb, acc):  # elementwise products; one cross-lane sum after the loop
            cols = pl.ds(kb * block_k, block_k)
            xk = x_ref[t, cols].astype(jnp.float32)                       # [BK]
            ak = pltriton.load(a_ref.at[pl.ds(row0 + rb * block_r, block_r), cols],
                               mask=live[:, None], other=0.0)             # [BR, BK]
            return acc + ak.astype(jnp.float32) * xk[None, :]

        acc = lax.fori_loop(kb0, kb1, k_step,
                            jnp.zeros((block_r, block_k), jnp.float32)).sum(axis=1)
        if has_u:
            u = u_ref.at[jnp.int32(layer), m, s, pl.ds(rb * block_r, block_r)]
            acc = acc * pltriton.load(u, mask=live, other=0.0).astype(jnp.float32)
        pltriton.store(o_ref.at[ks, m, t, pl.ds(rb * block_r, block_r)], acc, mask=live)
        return carry

    lax.fori_loop(0, pl.cdiv(rank, block_r), rank_block, 0)


def expand_tokens_kernel(slot_ref, start_ref, rank_ref, scale_ref, v_ref, *rest, M, layer,
                         block_r, block_n, first_block, has_w, has_g):
    """Program (t, nb): token t's term on output columns block nb (of whichever module
    holds it)."""
    b_refs, rest = rest[:M], rest[M:]
    w_refs, rest = (rest[:M], rest[M:]) if has_w else (None, rest)
    g_refs, rest = (rest[:M], rest[M:]) if has_g else (None, rest)
    (o_ref,) = rest
    t, nb = pl.program_id(0), pl.program_id(1)
    s = slot_ref[t]
    n_splits = v_ref.shape[0]   # a power of two (see _splits)
    for m in range(M):
        @pl.when((nb >= first_block[m]) & (nb < first_block[m + 1]))
        def _(m=m):
            rank, row0 = rank_ref[layer, m, s], start_ref[layer, m, s]   # slot 0: rank 0
            cols = pl.ds((nb - first_block[m]) * block_n, block_n)

            def rank_block(rb, acc):
                rows = rb * block_r + jnp.arange(block_r)
                live = rows < rank
                vr = pltriton.load(  # every split of D at once: [KS, BR], then their sum
                    v_ref.at[pl.ds(0, n_splits), jnp.int32(m), t, pl.ds(rb * block_r, block_r)],
                    mask=live[None, :], other=0.0).sum(axis=0)
                bt = pltriton.load(b_refs[m].at[pl.ds(row0 + rb * block_r, block_r), cols],
                                   mask=live[:, None], other=0.0)         # [BR, BN]
                return acc + jnp.sum(vr[:, None] * bt.astype(jnp.float32), axis=0)

            delta = lax.fori_loop(0, pl.cdiv(rank, block_r), rank_block,
                                  jnp.zeros((block_n,), jnp.float32)) * scale_ref[layer, m, s]
            if has_w:
                delta = delta * w_refs[m][layer, s, cols].astype(jnp.float32)
            if has_g:
                delta = delta * g_refs[m][layer, s, cols].astype(jnp.float32)
            o_ref[t, pl.ds(nb * block_n, block_n)] = delta.astype(o_ref.dtype)


# segment kernels

def _segment_rows(seg_ref, tile, block_t, T):
    """The row window of one tile of one segment, kept inside [0, T), and its live rows."""
    seg = pl.program_id(0)
    lo, hi = seg_ref[seg], seg_ref[seg + 1]
    first = lo + tile * block_t
    w0 = jnp.minimum(first, T - block_t)   # shift the last window back instead of overrunning
    rows = w0 + jnp.arange(block_t)
    return first < hi, w0, (rows >= first) & (rows < hi)


def shrink_segments_kernel(seg_ref, slot_ref, start_ref, rank_ref, x_ref, a_ref, *rest, layer,
                           block_t, block_r, block_k, n_rblocks, n_splits, has_u):
    u_ref, o_ref = (rest if has_u else (None, *rest))
    tile, mrk = pl.program_id(1), pl.program_id(2)   # mrk: module, rank block, split of D
    m, rb, ks = mrk // (n_rblocks * n_splits), (mrk // n_splits) % n_rblocks, mrk % n_splits
    s = slot_ref[pl.program_id(0)]
    rank, row0 = rank_ref[layer, m, s], start_ref[layer, m, s]
    T, D = x_ref.shape
    active, w0, live_t = _segment_rows(seg_ref, tile, block_t, T)

    @pl.when(active & (rb * block_r < rank))
    def _():
        live_r = rb * block_r + jnp.arange(block_r) < rank

        def k_step(kb, acc):
            cols = pl.ds(kb * block_k, block_k)
            xt = pltriton.load(x_ref.at[pl.ds(w0, block_t), cols], mask=live_t[:, None],
                               other=0.0)                                  # [BT, BK]
            at = pltriton.load(a_ref.at[pl.ds(row0 + rb * block_r, block_r), cols],
                               mask=live_r[:, None], other=0.0)            # [BR, BK]
            return acc + jnp.dot(xt, at.T, precision=_HIGHEST, preferred_element_type=jnp.float32)

        n_kblocks = D // block_k
        acc = lax.fori_loop(ks * n_kblocks // n_splits, (ks + 1) * n_kblocks // n_splits,
                            k_step, jnp.zeros((block_t, block_r), jnp.float32))
        if has_u:
            u = u_ref.at[jnp.int32(layer), m, s, pl.ds(rb * block_r, block_r)]
            acc = acc * pltriton.load(u, mask=live_r, other=0.0).astype(jnp.float32)[None, :]
        pltriton.store(o_ref.at[ks, m, pl.ds(w0, block_t), pl.ds(rb * block_r, block_r)], acc,
                       mask=live_t[:, None] & live_r[None, :])


def expand_segments_kernel(seg_ref, slot_ref, start_ref, rank_ref, scale_ref, v_ref, *rest, M,
                           layer, block_t, block_r, block_n, first_block, has_w, has_g):
    """Program (segment, tile, nb): the term of one tile of a segment's tokens on output
    columns block nb; rows outside the segment are left to their own segment's programs."""
    b_refs, rest = rest[:M], rest[M:]
    w_refs, rest = (rest[:M], rest[M:]) if has_w else (None, rest)
    g_refs, rest = (rest[:M], rest[M:]) if has_g else (None, rest)
    (o_ref,) = rest
    tile, nb = pl.program_id(1), pl.program_id(2)
    s = slot_ref[pl.program_id(0)]
    active, w0, live_t = _segment_rows(seg_ref, tile, block_t, o_ref.shape[0])
    for m in range(M):
        @pl.when(active & (nb >= first_block[m]) & (nb < first_block[m + 1]))
        def _(m=m):
            rank, row0 = rank_ref[layer, m, s], start_ref[layer, m, s]   # slot 0: rank 0
            cols = pl.ds((nb - first_block[m]) * block_n, block_n)

            def rank_block(rb, acc):
                live_r = rb * block_r + jnp.arange(block_r) < rank
                vt = pltriton.load(  # every split of D at once: [KS, BT, BR], then their sum
                    v_ref.at[pl.ds(0, v_ref.shape[0]), jnp.int32(m), pl.ds(w0, block_t),
                             pl.ds(rb * block_r, block_r)],
                    mask=(live_t[:, None] & live_r[None, :])[None], other=0.0).sum(axis=0)
                bt = pltriton.load(b_refs[m].at[pl.ds(row0 + rb * block_r, block_r), cols],
                                   mask=live_r[:, None], other=0.0)        # [BR, BN]
                return acc + jnp.dot(vt.astype(bt.dtype), bt, precision=_HIGHEST,
                                     preferred_element_type=jnp.float32)

            delta = lax.fori_loop(0, pl.cdiv(rank, block_r), rank_block,
                                  jnp.zeros((block_t, block_n), jnp.float32))
            delta = delta * scale_ref[layer, m, s]
            if has_w:
                delta = delta * w_refs[m][layer, s, cols].astype(jnp.float32)[None, :]
            if has_g:
                delta = delta * g_refs[m][layer, s, cols].astype(jnp.float32)[None, :]
            pltriton.store(o_ref.at[pl.ds(w0, block_t), pl.ds(nb * block_n, block_n)],
                           delta.astype(o_ref.dtype), mask=live_t[:, None])


# shrink and expand in one launch, per token

def fused_tokens_kernel(slot_ref, a_start_ref, b_start_ref, rank_ref, scale_ref, x_ref, a_ref,
                        *rest, M, layer, R, block_k, block_n, n_chunks, n_blocks, col_offset,
                        has_u, has_w, has_g):
    """Program (t, m * n_chunks + c): token t's shrink for module m (all R rank rows at once,
    so v stays in registers), then its expand into chunk c of module m's column blocks.
    Chunks recompute the shrink (its A rows come from L2 after the first) to give small
    batches more programs; no partial sums go through memory, and there is one launch."""
    b_refs, rest = rest[:M], rest[M:]
    u_ref, rest = (rest[0], rest[1:]) if has_u else (None, rest)
    w_refs, rest = (rest[:M], rest[M:]) if has_w else (None, rest)
    g_refs, rest = (rest[:M], rest[M:]) if has_g else (None, rest)
    (o_ref,) = rest
    t, mc = pl.program_id(0), pl.program_id(1)
    s, c = slot_ref[t], mc % n_chunks
    rows = jnp.arange(R)
    for m in range(M):
        nb0, nb1 = c * n_blocks[m] // n_chunks, (c + 1) * n_blocks[m] // n_chunks

        @pl.when((mc // n_chunks == m) & (nb1 > nb0))
        def _(m=m, nb0=nb0, nb1=nb1):
            rank = rank_ref[layer, m, s]                                  # slot 0: rank 0
            live = rows < rank
            a0, b0 = a_start_ref[layer, m, s], b_start_ref[layer, m, s]

            def k_step(kb, acc):
                cols = pl.ds(kb * block_k, block_k)
                xk = x_ref[t, cols].astype(jnp.float32)                   # [BK]
                ak = pltriton.load(a_ref.at[pl.ds(a0, R), cols], mask=live[:, None],
                                   other=0.0)                             # [R, BK]
                return acc + ak.astype(jnp.float32) * xk[None, :]

            n_k = jnp.minimum(rank, 1) * (x_ref.shape[1] // block_k)    # rank 0: no steps
            v = lax.fori_loop(0, n_k, k_step,
                              jnp.zeros((R, block_k), jnp.float32)).sum(axis=1)   # [R]
            if has_u:
                v = v * pltriton.load(u_ref.at[jnp.int32(layer), jnp.int32(m), s, pl.ds(0, R)],
                                      mask=live, other=0.0).astype(jnp.float32)
            v = v * scale_ref[layer, m, s]

            def n_step(nb, carry):
                cols = pl.ds(nb * block_n, block_n)
                bt = pltriton.load(b_refs[m].at[pl.ds(b0, R), cols], mask=live[:, None],
                                   other=0.0)                             # [R, BN]
                delta = jnp.sum(v[:, None] * bt.astype(jnp.float32), axis=0)
                if has_w:
                    delta = delta * w_refs[m][layer, s, cols].astype(jnp.float32)
                if has_g:
                    delta = delta * g_refs[m][layer, s, cols].astype(jnp.float32)
                o_ref[t, pl.ds(col_offset[m] + nb * block_n, block_n)] = delta.astype(o_ref.dtype)
                return carry

            lax.fori_loop(nb0, nb1, n_step, 0)


# the base projection and the adapters' term in one launch, per token

def gemm_tokens_kernel(slot_ref, b_start_ref, rank_ref, scale_ref, x_ref, w_ref, v_ref, *rest,
                       M, layer, block_t, block_k, block_n, block_l, n_splits, first_block,
                       has_w, has_g):
    """Program (tile, nb, p) writes partial sum p of tile x column block nb: for p <
    n_splits, x[tile] @ W[part p of D, nb] (times DoRA's g); p = n_splits is the adapters'
    term alone. The term runs in programs of its own, beside the matmul's, so its short
    latency-bound loop hides behind their streaming instead of trailing them; the partial
    sums add up outside (M = 0: no term, the plain matmul).

    The term is a small matmul loop whose "K" runs over the tile's (token, rank row) pairs,
    block_l at a time: chunk c multiplies a block-diagonal [BT, block_l] piece of v (token
    t's row r at column t*R + r) by the [block_l, BN] rows of B those pairs name, gathered
    from each token's slot (rows past a token's rank masked: never read). Tables are read
    once per tile; chunks pick their tokens' entries by one-hot sums."""
    b_refs, rest = rest[:M], rest[M:]
    w_refs, rest = (rest[:M], rest[M:]) if has_w else (None, rest)
    g_refs, rest = (rest[:M], rest[M:]) if has_g else (None, rest)
    (o_ref,) = rest
    tile, nb, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    D = x_ref.shape[1]
    t0, cols = tile * block_t, pl.ds(nb * block_n, block_n)
    n_k = D // block_k
    precision = _HIGHEST if x_ref.dtype == jnp.float32 else None
    if M:
        slots = slot_ref[pl.ds(t0, block_t)]                                # [BT]
        # gathers index with arrays only (interpret mode takes no mix of arrays and slices)
        rows, lanes = slots[:, None], jnp.arange(block_n)[None, :]

    def module_g(m):     # DoRA's g of module m on this column block, [BT, BN]
        mcols = (nb - first_block[m]) * block_n + lanes
        return g_refs[m][jnp.int32(layer), rows, mcols].astype(jnp.float32)

    @pl.when(part < n_splits)
    def _():
        def k_step(kb, acc):
            kcols = pl.ds(kb * block_k, block_k)
            return acc + jnp.dot(x_ref[pl.ds(t0, block_t), kcols], w_ref[kcols, cols],
                                 preferred_element_type=jnp.float32, precision=precision)

        acc = lax.fori_loop(part * n_k // n_splits, (part + 1) * n_k // n_splits, k_step,
                            jnp.zeros((block_t, block_n), jnp.float32))
        if not has_g:
            o_ref[part, pl.ds(t0, block_t), cols] = acc.astype(o_ref.dtype)
        for m in range(M if has_g else 0):
            @pl.when((nb >= first_block[m]) & (nb < first_block[m + 1]))
            def _(m=m):
                o_ref[part, pl.ds(t0, block_t), cols] = (acc * module_g(m)).astype(o_ref.dtype)

    if M == 0:
        return
    n_v, R = v_ref.shape[0], v_ref.shape[3]
    j = jnp.arange(block_l)
    tokens = jnp.arange(block_t)[:, None]
    for m in range(M):
        @pl.when((part == n_splits) & (nb >= first_block[m]) & (nb < first_block[m + 1]))
        def _(m=m):
            mcols = (nb - first_block[m]) * block_n + lanes                 # [1, BN]
            lm = (jnp.int32(layer), jnp.int32(m))
            rank, row0 = rank_ref[(*lm, slots)], b_start_ref[(*lm, slots)]  # [BT] each

            def l_step(c, delta):
                tok, r = c * (block_l // R) + j // R, j % R                  # [BL] each
                pick = tokens == tok[None, :]                                # [BT, BL]
                live = r < jnp.sum(jnp.where(pick, rank[:, None], 0), axis=0)
                row = jnp.sum(jnp.where(pick, row0[:, None], 0), axis=0) + r
                vj = pltriton.load(v_ref.at[jnp.arange(n_v)[:, None], jnp.int32(m),
                                            (t0 + tok)[None, :], r[None, :]],
                                   mask=live[None, :], other=0.0).sum(axis=0)  # [BL]
                bt = pltriton.load(b_refs[m].at[row[:, None], mcols], mask=live[:, None],
                                   other=0.0)                                # [BL, BN]
                vt = jnp.where(pick, vj[None, :], 0.0).astype(bt.dtype)     # [BT, BL]
                return delta + jnp.dot(vt, bt, preferred_element_type=jnp.float32,
                                       precision=precision)

            delta = lax.fori_loop(0, block_t * R // block_l, l_step,
                                  jnp.zeros((block_t, block_n), jnp.float32))
            delta = delta * scale_ref[(*lm, slots)][:, None]
            if has_w:
                delta = delta * w_refs[m][jnp.int32(layer), rows, mcols].astype(jnp.float32)
            if has_g:
                delta = delta * module_g(m)
            o_ref[n_splits, pl.ds(t0, block_t), cols] = delta.astype(o_ref.dtype)
