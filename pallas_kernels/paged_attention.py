"""Paged attention: query tokens attend causally to their sequence's KV cache through its page
table (Pallas, Triton backend).

    out[n, t, h] = softmax_s(q[n, t, h] . K_n[s, g(h)] / sqrt(E), s <= positions[n, t])
                   @ V_n[s, g(h)]
    K_n[s, g] = k_pages[g, page_tables[n, s // Z], s % Z]          (V_n likewise)

The cache of one layer is a pool of P physical pages of Z positions, [G, P, Z, E] with the kv
heads first (tensor parallelism splits axis 0). A query block n is T tokens of one sequence:
T = 1 is a decode token, T = 16 a piece of a prefill chunk that continues a cached prefix. The
caller has already written the keys and values of every attended position, the query tokens'
own included. A token at position -1 is padding: its output is 0.

Each program takes one (query block, kv head) pair and one split of the block's pages (the
number of splits is static, from N, G and W; each block cuts its own length into that many
runs). It reads page ids from the page table (an ordinary int32 input) and gathers those
pages' rows of K and V from the head's [P * Z, E] view, `block_s` positions (a whole number
of pages) per loop step, with an online softmax; each of its T x R query rows is masked by
its own position (causal inside the block). The walk stops at the block's last position, so
an all-padding block, or a split past a short sequence's end, costs a launch and a store.
Split results are unnormalized and combined in XLA afterwards. As in `decode_attention`, query
rows are replicated in registers to at least 16 so both products run on the tensor cores.

The XLA version (`paged_attention_reference`) is the CPU path. This module only reads pages:
the model's step writes them (`page_write`, called by `jlora.paged`), the host allocates them (`serving.kv_cache`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

IMPLS = ("pallas", "xla")
_MIN_ROWS = 16          # tensor-core products need >= 16 rows
_TARGET_PROGRAMS = 1024  # split the pages until about this many programs run
_NEG = -1e30            # finite "minus infinity": exp(_NEG - m) is 0 without NaNs
# float32 inputs get IEEE float32 products rather than TF32 (bf16 inputs are unaffected).
_HIGHEST = lax.Precision.HIGHEST


@dataclass(frozen=True)
class PagedAttentionBlocks:
    block_s: int = 64       # cache positions per loop step, rounded up to a whole page
    num_warps: int = 4
    num_stages: int = 4


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _split_run(max_pos, table_len: int, page_size: int, step_pages: int, n_splits: int):
    """This program's pages [first, last) and positions [first * Z, end) of its block.

    The block reads positions [0, max_pos + 1): its pages are cut into n_splits equal runs of
    whole loop steps, by the block's own length (not the table's), so a short sequence in a
    long table still spreads over every split; a run past the end is empty.
    """
    end = jnp.clip(max_pos + 1, 0, table_len * page_size)
    n_pages = pl.cdiv(end, page_size)
    split_len = pl.cdiv(pl.cdiv(n_pages, step_pages), n_splits) * step_pages
    first = pl.program_id(2) * split_len
    last = jnp.minimum(first + split_len, n_pages)
    return first, last, jnp.minimum(end, last * page_size)


def paged_attention_kernel(table_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, *stats_refs,
                           page_size: int, step_pages: int, n_splits: int, scale: float,
                           rep: int):
    # table_ref [W] page ids; pos_ref [T]; q_ref [T, Rp, E]; k_ref, v_ref [P * Z, E] (this kv
    # head's pages, flattened); o_ref [T, Rp, E]; stats_refs: m_ref, l_ref [T, Rp] when the
    # pages are split (o is then unnormalized), none when one program sees them all.
    n_tok, r_p, head_dim = q_ref.shape
    block_s = step_pages * page_size
    q = q_ref[...].reshape(n_tok * r_p, head_dim)                      # [T * Rp, E]
    rows = n_tok * r_p * rep
    if rep > 1:  # each query row `rep` times: [T * Rp, E] -> [rows, E]
        q = jnp.broadcast_to(q[:, None, :], (n_tok * r_p, rep, head_dim)).reshape(rows, head_dim)
    pos = pos_ref[...]                                                  # [T]
    row_pos = jnp.broadcast_to(pos[:, None], (n_tok, r_p * rep)).reshape(rows)

    first, last, end = _split_run(pos.max(), table_ref.shape[0], page_size, step_pages,
                                  n_splits)

    def fold(x):  # the rep identical copies of each row -> one (max of equal values: exact)
        x = x if rep == 1 else x.reshape(n_tok * r_p, rep, *x.shape[1:]).max(axis=1)
        return x.reshape(n_tok, r_p, *x.shape[1:])

    def body(i, carry):
        acc, m, l = carry
        page0 = first + i * step_pages
        j = jnp.arange(block_s)
        page = page0 + lax.div(j, page_size)                          # [BS] page of each row
        ids = pltriton.load(table_ref.at[page], mask=page < last, other=0)
        slot = ids * page_size + lax.rem(j, page_size)                 # [BS] row in k_ref
        key_pos = page0 * page_size + j
        valid = key_pos < end
        at = (slot[:, None], jnp.arange(head_dim)[None, :])   # a row gather: [BS, E]
        k = pltriton.load(k_ref.at[at], mask=valid[:, None], other=0.0)
        v = pltriton.load(v_ref.at[at], mask=valid[:, None], other=0.0)
        scores = jnp.dot(q, k.T, precision=_HIGHEST,
                         preferred_element_type=jnp.float32) * scale           # [rows, BS]
        visible = valid[None, :] & (key_pos[None, :] <= row_pos[:, None])
        scores = jnp.where(visible, scores, _NEG)
        m_new = jnp.maximum(m, scores.max(axis=1))
        # zero, not exp(0), where a row has seen no visible position yet (m_new still _NEG)
        p = jnp.where(visible, jnp.exp(scores - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, precision=_HIGHEST,
                                             preferred_element_type=jnp.float32)
        return acc, m_new, l * alpha + p.sum(axis=1)

    n_steps = pl.cdiv(jnp.maximum(last - first, 0), step_pages)
    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), _NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = lax.fori_loop(0, n_steps, body, init)
    if not stats_refs:  # padding rows saw nothing: acc = 0, l = 0 -> 0
        o_ref[...] = fold(acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)
        return
    m_ref, l_ref = stats_refs
    o_ref[...] = fold(acc)
    m_ref[...] = fold(m)
    l_ref[...] = fold(l)


def _num_splits(blocks: int, kv_heads: int, steps: int) -> int:
    wanted = pl.cdiv(_TARGET_PROGRAMS, blocks * kv_heads)
    return max(1, min(wanted, steps))


def _check(q, k_pages, v_pages, page_tables, positions, impl, blocks):
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r} is not one of {IMPLS}")
    if q.ndim != 4 or k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"expected q [N, T, H, E] and k_pages, v_pages [G, P, Z, E], got q "
                         f"{q.shape}, k_pages {k_pages.shape}, v_pages {v_pages.shape}")
    (N, T, H, E), (G, _, Z, Ek) = q.shape, k_pages.shape
    if (Ek != E or H % G or page_tables.ndim != 2 or page_tables.shape[0] != N
            or positions.shape != (N, T)):
        raise ValueError(f"shapes do not agree: q {q.shape}, k_pages {k_pages.shape}, "
                         f"page_tables {page_tables.shape}, positions {positions.shape}; need "
                         f"the same E, H a multiple of G, page_tables [N, W], positions [N, T]")
    if impl != "pallas":
        return
    if not (E >= 16 and _is_pow2(E)):
        raise ValueError(f"head dim E={E} must be a power of two >= 16 for the Pallas kernel")
    if not (Z >= 8 and _is_pow2(Z)):
        raise ValueError(f"page size Z={Z} must be a power of two >= 8 for the Pallas kernel")
    if not _is_pow2(T):
        raise ValueError(f"query block T={T} must be a power of two for the Pallas kernel")
    if not _is_pow2(blocks.block_s):
        raise ValueError(f"block_s={blocks.block_s} must be a power of two")


@functools.partial(jax.jit, static_argnames=("impl", "blocks", "interpret"))
def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                    page_tables: jax.Array, positions: jax.Array, *, impl: str = "pallas",
                    blocks: PagedAttentionBlocks = PagedAttentionBlocks(),
                    interpret: bool | None = None) -> jax.Array:
    """Causal attention of query blocks over their sequences' paged KV caches.

    q [N, T, H, E]: N blocks of T query tokens, each block from one sequence; k_pages,
    v_pages [G, P, Z, E] with H a multiple of G; page_tables [N, W] int32, the pages of each
    block's sequence (entries past its last position are never read); positions [N, T]
    int32, each token's position, -1 for padding. Token (n, t) attends to its sequence's
    positions 0..positions[n, t] (at most W * Z - 1). Returns [N, T, H, E] in q's dtype,
    zeros for padding tokens.

    Semantics: out[n, t] = attention(q[n, t], K_n[:positions[n, t] + 1], V_n[...]).
    """
    _check(q, k_pages, v_pages, page_tables, positions, impl, blocks)
    page_tables = page_tables.astype(jnp.int32)
    positions = positions.astype(jnp.int32)
    if impl == "xla":
        return paged_attention_reference(q, k_pages, v_pages, page_tables, positions)
    (N, T, H, E), (G, P, Z, _), W = q.shape, k_pages.shape, page_tables.shape[1]
    R = H // G
    r_p = pl.next_power_of_2(R)      # Triton tiles are powers of two: pad R=3 to 4, say
    qg = q.reshape(N, T, G, R, E)
    if r_p != R:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, r_p - R), (0, 0)))
    step_pages = max(1, blocks.block_s // Z)
    n_splits = _num_splits(N, G, pl.cdiv(W, step_pages))
    kernel = functools.partial(paged_attention_kernel, page_size=Z, step_pages=step_pages,
                               n_splits=n_splits, scale=E ** -0.5,
                               rep=max(1, _MIN_ROWS // (T * r_p)))
    if n_splits == 1:  # the kernel normalizes and writes q's dtype: no combine step
        out_shape = [jax.ShapeDtypeStruct((N, T, G, r_p, E), q.dtype)]
        out_specs = [pl.BlockSpec((None, T, None, r_p, E), lambda n, g, s: (n, 0, g, 0, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((N, n_splits, T, G, r_p, E), jnp.float32),
                     jax.ShapeDtypeStruct((N, n_splits, T, G, r_p), jnp.float32),
                     jax.ShapeDtypeStruct((N, n_splits, T, G, r_p), jnp.float32)]
        out_specs = [
            pl.BlockSpec((None, None, T, None, r_p, E), lambda n, g, s: (n, s, 0, g, 0, 0)),
            pl.BlockSpec((None, None, T, None, r_p), lambda n, g, s: (n, s, 0, g, 0)),
            pl.BlockSpec((None, None, T, None, r_p), lambda n, g, s: (n, s, 0, g, 0))]
    pages_spec = pl.BlockSpec((None, P * Z, E), lambda n, g, s: (g, 0, 0))
    outs = pl.pallas_call(
        kernel,
        grid=(N, G, n_splits),
        in_specs=[pl.BlockSpec((None, W), lambda n, g, s: (n, 0)),
                  pl.BlockSpec((None, T), lambda n, g, s: (n, 0)),
                  pl.BlockSpec((None, T, None, r_p, E), lambda n, g, s: (n, 0, g, 0, 0)),
                  pages_spec, pages_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps,
                                                num_stages=blocks.num_stages),
        interpret=jax.default_backend() == "cpu" if interpret is None else interpret,
    )(page_tables, positions, qg, k_pages.reshape(G, P * Z, E), v_pages.reshape(G, P * Z, E))
    if n_splits == 1:
        out = outs[0]
    else:  # combine the splits: rescale each to the common max, then normalize
        acc, m, l = outs
        weight = jnp.exp(m - m.max(axis=1, keepdims=True))          # [N, NS, T, G, Rp]
        total = (l * weight).sum(1)                                   # [N, T, G, Rp]
        out = (acc * weight[..., None]).sum(1) / jnp.where(total == 0.0, 1.0, total)[..., None]
    if r_p != R:
        out = out[:, :, :, :R]
    return out.reshape(N, T, H, E).astype(q.dtype)


def paged_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                              page_tables: jax.Array, positions: jax.Array) -> jax.Array:
    """Plain-XLA paged attention (the CPU path): gather each block's pages into a dense
    [G, N, W * Z, E] view, then masked attention. Cache slots past a block's last position
    are read (and masked), so they must hold finite values; garbage page ids are clamped."""
    (N, T, H, E), (G, _, Z, _), W = q.shape, k_pages.shape, page_tables.shape[1]
    k = k_pages.at[:, page_tables].get(mode="clip").reshape(G, N, W * Z, E)
    v = v_pages.at[:, page_tables].get(mode="clip").reshape(G, N, W * Z, E)
    qg = q.reshape(N, T, G, H // G, E)
    precision = _HIGHEST if q.dtype == jnp.float32 else None
    # batch dims (g, n) lead in the gathered K and V as they come: XLA transposes only q
    scores = jnp.einsum("ntgre,gnse->gntrs", qg, k, precision=precision,
                        preferred_element_type=jnp.float32) * E ** -0.5
    visible = jnp.arange(W * Z) <= positions[:, :, None]               # [N, T, S]
    scores = jnp.where(visible[None, :, :, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("gntrs,gnse->ntgre", probs, v, precision=precision)
    out = jnp.where(positions[:, :, None, None, None] >= 0, out, 0)     # padding tokens -> 0
    return out.reshape(N, T, H, E).astype(q.dtype)
