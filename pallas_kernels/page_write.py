"""Writing a step's keys and values into the paged KV cache, both in one launch, straight
from the q/k/v projection's output (Pallas, Triton backend).

    k_pages[g, slots[t] // Z, slots[t] % Z] = rope(k[t, g], positions[t])
    v_pages[g, slots[t] // Z, slots[t] % Z] = v[t, g]          (slots outside [0, P * Z) dropped)

where k and v are columns of qkv [T, (H + 2G) * E]: H query heads, then G key heads, then G
value heads, E columns each. The keys are rotated by RoPE (`pallas_kernels.rope`) here, as
they are written.

XLA would take three kernels a layer for this: a RoPE fusion for k, a copy that slices v
out of qkv, and a scatter (two, before this kernel existed: about 3 us each on an H200 at
batch 32). This kernel is one launch that reads its operands from qkv as it stands and
writes in place: the page arrays are aliased to its outputs, so under a jit that donates
the cache nothing is copied. One program per (token, kv head) loads the two halves of its
key and its value, rotates the key in float32 and stores a row of E for each. A slot
outside [0, P * Z) (a padding token's) is masked off: nothing is written.

`write_pages_reference` is the XLA version (the CPU path, and this kernel's test oracle).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.paged_attention import _is_pow2
from pallas_kernels.rope import apply_rope

IMPLS = ("pallas", "xla")


def page_write_kernel(slot_ref, pos_ref, freq_ref, k1_ref, k2_ref, v_ref, k_in, v_in, k_out,
                      v_out):
    # slot_ref, pos_ref [1]; freq_ref [E/2]; k1_ref, k2_ref [E/2] (the halves of token t's
    # key of head g), v_ref [E]; k_in, v_in: the aliased inputs (not read); k_out, v_out
    # [P * Z, E] (head g's pages, flattened).
    del k_in, v_in
    n_slots, head_dim = k_out.shape
    half = head_dim // 2
    slot = slot_ref[0]
    ok = (slot >= 0) & (slot < n_slots)
    row = pl.ds(jnp.clip(slot, 0, n_slots - 1), 1)
    angle = pos_ref[0].astype(jnp.float32) * freq_ref[...]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = k1_ref[...].astype(jnp.float32), k2_ref[...].astype(jnp.float32)
    for cols, rotated in ((pl.ds(0, half), x1 * cos - x2 * sin),
                          (pl.ds(half, half), x2 * cos + x1 * sin)):
        value = rotated.astype(k1_ref.dtype).astype(k_out.dtype)   # rounded as XLA's RoPE
        pltriton.store(k_out.at[row, cols], value[None], mask=jnp.full((1, half), ok))
    pltriton.store(v_out.at[row, :], v_ref[...].astype(v_out.dtype)[None],
                   mask=jnp.full((1, head_dim), ok))


def split_qkv(qkv: jax.Array, n_heads: int, n_kv_heads: int, positions: jax.Array,
              inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """k (rotated) and v [T, G, E] of qkv [T, (H + 2G) * E], in XLA."""
    T = qkv.shape[0]
    E = qkv.shape[1] // (n_heads + 2 * n_kv_heads)
    k = qkv[:, n_heads * E:(n_heads + n_kv_heads) * E].reshape(T, n_kv_heads, E)
    v = qkv[:, (n_heads + n_kv_heads) * E:].reshape(T, n_kv_heads, E)
    return apply_rope(k[None], positions[None], inv_freq)[0], v


def write_pages_reference(k_pages: jax.Array, v_pages: jax.Array, qkv: jax.Array,
                          slots: jax.Array, positions: jax.Array, inv_freq: jax.Array, *,
                          n_heads: int) -> tuple[jax.Array, jax.Array]:
    """Plain XLA: slices of qkv, RoPE, one scatter per array."""
    G, P, Z, E = k_pages.shape
    k, v = split_qkv(qkv, n_heads, G, positions, inv_freq)
    slots = jnp.where(slots < 0, P * Z, slots)     # dropped, not counted from the end

    def write(pages, new):
        flat = pages.reshape(G, P * Z, E)
        flat = flat.at[:, slots, :].set(new.transpose(1, 0, 2).astype(pages.dtype),
                                        mode="drop")
        return flat.reshape(G, P, Z, E)
    return write(k_pages, k), write(v_pages, v)


@functools.partial(jax.jit, static_argnames=("n_heads", "impl", "interpret"))
def write_pages(k_pages: jax.Array, v_pages: jax.Array, qkv: jax.Array, slots: jax.Array,
                positions: jax.Array, inv_freq: jax.Array, *, n_heads: int,
                impl: str = "pallas", interpret: bool | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """k_pages, v_pages [G, P, Z, E] with the keys (rotated by RoPE at positions [T], inverse
    frequencies inv_freq [E/2]) and values of qkv [T, (n_heads + 2G) * E] written at flat
    slots [T] int32 (slot = page * Z + offset; a slot outside [0, P * Z) is dropped).
    Returns the two page arrays; with impl="pallas" they are written in place when the
    caller donates them."""
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r} is not one of {IMPLS}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"expected k_pages, v_pages [G, P, Z, E], got {k_pages.shape} and "
                         f"{v_pages.shape}")
    (G, P, Z, E), T = k_pages.shape, qkv.shape[0]
    if (qkv.ndim != 2 or qkv.shape[1] != (n_heads + 2 * G) * E or slots.shape != (T,)
            or positions.shape != (T,) or inv_freq.shape != (E // 2,)):
        raise ValueError(f"expected qkv [T, (n_heads + 2G) * E = {(n_heads + 2 * G) * E}], "
                         f"slots and positions [T] and inv_freq [E/2 = {E // 2}], got "
                         f"{qkv.shape}, {slots.shape}, {positions.shape} and {inv_freq.shape}")
    slots, positions = slots.astype(jnp.int32), positions.astype(jnp.int32)
    inv_freq = inv_freq.astype(jnp.float32)
    if impl == "xla":
        return write_pages_reference(k_pages, v_pages, qkv, slots, positions, inv_freq,
                                     n_heads=n_heads)
    if not (E >= 4 and _is_pow2(E)):
        raise ValueError(f"head dim E={E} must be a power of two >= 4 for the Pallas kernel")
    H, half = n_heads, E // 2
    row_spec = pl.BlockSpec((1,), lambda t, g: (t,))
    pages_spec = pl.BlockSpec((None, P * Z, E), lambda t, g: (g, 0, 0))
    k_out, v_out = pl.pallas_call(
        page_write_kernel,
        grid=(T, G),
        in_specs=[row_spec, row_spec, pl.BlockSpec((half,), lambda t, g: (0,)),
                  pl.BlockSpec((None, half), lambda t, g: (t, 2 * (H + g))),      # k, 1st half
                  pl.BlockSpec((None, half), lambda t, g: (t, 2 * (H + g) + 1)),  # k, 2nd half
                  pl.BlockSpec((None, E), lambda t, g: (t, H + G + g)),           # v
                  pages_spec, pages_spec],
        out_specs=[pages_spec, pages_spec],
        out_shape=[jax.ShapeDtypeStruct((G, P * Z, E), k_pages.dtype)] * 2,
        input_output_aliases={6: 0, 7: 1},
        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=jax.default_backend() == "cpu" if interpret is None else interpret,
    )(slots, positions, inv_freq, qkv, qkv, qkv, k_pages.reshape(G, P * Z, E),
      v_pages.reshape(G, P * Z, E))
    return k_out.reshape(G, P, Z, E), v_out.reshape(G, P, Z, E)
