"""Decode attention: one query token per sequence against its KV cache (Pallas, Triton backend).

    out[b, h] = softmax_s(q[b, h] . k[b, g(h), s] / sqrt(E), s < lengths[b]) @ v[b, g(h), s]

Each program takes one (sequence, kv head) pair and one split of the cache positions: it
streams K and V in blocks of `block_s` rows with an online softmax and writes an unnormalized
partial result; splits are combined in XLA afterwards. Splitting the positions keeps the GPU
busy when sequences x kv heads alone are too few programs (batch 1). The R = H/G query heads
that share a kv head are replicated in registers to 16 rows, so both products run on the
tensor cores (the kernel is memory-bound: the extra rows cost no bytes), and folded back
before the store, so no padded copy of q or of the output ever reaches memory.

The XLA version in the same file (`decode_attention_reference`) is the CPU path and the test
oracle. This module knows nothing about pages or the model; it reads a dense [B, G, S, E] cache.
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
_TARGET_PROGRAMS = 1024  # split positions until about this many programs run
_NEG = -1e30            # finite "minus infinity": exp(_NEG - m) is 0 without NaNs
# float32 inputs get IEEE float32 products rather than TF32 (bf16 inputs are unaffected).
_HIGHEST = lax.Precision.HIGHEST


@dataclass(frozen=True)
class DecodeAttentionBlocks:
    block_s: int = 64       # cache positions per loop step
    num_warps: int = 4
    num_stages: int = 4     # best of those tried on an H200 (benchmarks/RESULTS.md)


def decode_attention_kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, *stats_refs,
                            block_s: int, split_len: int, scale: float, rep: int):
    # q_ref [Rq, E]; k_ref, v_ref [S, E]; o_ref [Rq, E]; stats_refs: m_ref, l_ref [Rq] when
    # the positions are split (o is then unnormalized), none when one program sees them all.
    b, split = pl.program_id(0), pl.program_id(2)
    start = split * split_len
    end = jnp.minimum(start + split_len, lengths_ref[b])
    q = q_ref[...]
    r_q, head_dim = q.shape
    rows = r_q * rep
    if rep > 1:  # each query row `rep` times: [Rq, E] -> [Rq * rep, E]
        q = jnp.broadcast_to(q[:, None, :], (r_q, rep, head_dim)).reshape(rows, head_dim)

    def fold(x):  # the rep identical copies of each row -> one (max of equal values: exact)
        return x if rep == 1 else x.reshape(r_q, rep, *x.shape[1:]).max(axis=1)

    def body(i, carry):
        acc, m, l = carry
        s0 = start + i * block_s
        valid = s0 + jnp.arange(block_s) < end                          # [BS]
        k = pltriton.load(k_ref.at[pl.ds(s0, block_s), :], mask=valid[:, None], other=0.0)
        v = pltriton.load(v_ref.at[pl.ds(s0, block_s), :], mask=valid[:, None], other=0.0)
        scores = jnp.dot(q, k.T, precision=_HIGHEST,
                         preferred_element_type=jnp.float32) * scale           # [Rp, BS]
        scores = jnp.where(valid[None, :], scores, _NEG)
        m_new = jnp.maximum(m, scores.max(axis=1))
        p = jnp.exp(scores - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, precision=_HIGHEST,
                                             preferred_element_type=jnp.float32)
        return acc, m_new, l * alpha + p.sum(axis=1)

    n_blocks = pl.cdiv(jnp.maximum(end - start, 0), block_s)
    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), _NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = lax.fori_loop(0, n_blocks, body, init)
    if not stats_refs:
        o_ref[...] = fold(acc / l[:, None]).astype(o_ref.dtype)
        return
    m_ref, l_ref = stats_refs
    o_ref[...] = fold(acc)
    m_ref[...] = fold(m)
    l_ref[...] = fold(l)


def _num_splits(batch: int, kv_heads: int, length: int, block_s: int) -> int:
    wanted = pl.cdiv(_TARGET_PROGRAMS, batch * kv_heads)
    return max(1, min(wanted, pl.cdiv(length, block_s)))


def _check(q, k, v, lengths, impl):
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r} is not one of {IMPLS}")
    if q.ndim != 3 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, H, E] and k, v [B, G, S, E], got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    (B, H, E), (Bk, G, _, Ek) = q.shape, k.shape
    if Bk != B or Ek != E or H % G or lengths.shape != (B,):
        raise ValueError(f"shapes do not agree: q {q.shape}, k {k.shape}, lengths "
                         f"{lengths.shape}; need the same B and E and H a multiple of G")
    if impl == "pallas" and (E < 16 or E & (E - 1)):
        raise ValueError(f"head dim E={E} must be a power of two >= 16 for the Pallas kernel")


@functools.partial(jax.jit, static_argnames=("impl", "blocks", "interpret"))
def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                     impl: str = "pallas", blocks: DecodeAttentionBlocks = DecodeAttentionBlocks(),
                     interpret: bool | None = None) -> jax.Array:
    """Attention of one query per sequence over its cached keys and values.

    q [B, H, E]; k, v [B, G, S, E] with H a multiple of G; lengths [B] int32, the number of
    cache positions each sequence attends to, clamped to [1, S] (positions >= lengths[b]
    are ignored). Returns [B, H, E] in q's dtype.
    """
    _check(q, k, v, lengths, impl)
    lengths = jnp.clip(lengths.astype(jnp.int32), 1, k.shape[2])
    if impl == "xla":
        return decode_attention_reference(q, k, v, lengths)
    (B, H, E), (_, G, S, _) = q.shape, k.shape
    R = H // G
    rows = pl.next_power_of_2(R)     # Triton tiles are powers of two: pad R=3 to 4, say
    qg = q.reshape(B, G, R, E)
    if rows != R:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - R), (0, 0)))
    n_splits = _num_splits(B, G, S, blocks.block_s)
    split_len = pl.cdiv(pl.cdiv(S, n_splits), blocks.block_s) * blocks.block_s
    kernel = functools.partial(decode_attention_kernel, block_s=blocks.block_s,
                               split_len=split_len, scale=E ** -0.5,
                               rep=max(1, _MIN_ROWS // rows))
    if n_splits == 1:  # the kernel normalizes and writes q's dtype: no combine step
        out_shape = [jax.ShapeDtypeStruct((B, G, rows, E), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, rows, E), lambda b, g, s: (b, g, 0, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((B, G, n_splits, rows, E), jnp.float32),
                     jax.ShapeDtypeStruct((B, G, n_splits, rows), jnp.float32),
                     jax.ShapeDtypeStruct((B, G, n_splits, rows), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, rows, E), lambda b, g, s: (b, g, s, 0, 0)),
                     pl.BlockSpec((None, None, None, rows), lambda b, g, s: (b, g, s, 0)),
                     pl.BlockSpec((None, None, None, rows), lambda b, g, s: (b, g, s, 0))]
    outs = pl.pallas_call(
        kernel,
        grid=(B, G, n_splits),
        in_specs=[pl.BlockSpec((B,), lambda b, g, s: (0,)),
                  pl.BlockSpec((None, None, rows, E), lambda b, g, s: (b, g, 0, 0)),
                  pl.BlockSpec((None, None, S, E), lambda b, g, s: (b, g, 0, 0)),
                  pl.BlockSpec((None, None, S, E), lambda b, g, s: (b, g, 0, 0))],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps,
                                                num_stages=blocks.num_stages),
        interpret=jax.default_backend() == "cpu" if interpret is None else interpret,
    )(lengths, qg, k, v)
    if n_splits == 1:
        out = outs[0]
    else:  # combine the splits: rescale each to the common max, then normalize
        acc, m, l = outs
        weight = jnp.exp(m - m.max(axis=2, keepdims=True))              # [B, G, NS, Rp]
        out = (acc * weight[..., None]).sum(2) / (l * weight).sum(2)[..., None]
    if rows != R:
        out = out[:, :, :R]
    return out.reshape(B, H, E).astype(q.dtype)


def decode_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                               lengths: jax.Array) -> jax.Array:
    """Plain-XLA decode attention on the same layout (the CPU path and the test oracle)."""
    (B, H, E), (_, G, S, _) = q.shape, k.shape
    qg = q.reshape(B, G, H // G, E)
    precision = _HIGHEST if q.dtype == jnp.float32 else None
    scores = jnp.einsum("bgre,bgse->bgrs", qg, k, precision=precision,
                        preferred_element_type=jnp.float32) * E ** -0.5
    visible = jnp.arange(S)[None, :] < lengths[:, None]                 # [B, S]
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrs,bgse->bgre", probs, v, precision=precision)
    return out.reshape(B, H, E).astype(q.dtype)
