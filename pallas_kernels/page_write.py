"""Writing a step's keys and values into the paged KV cache, both in one launch (Pallas,
Triton backend).

    k_pages[g, slots[t] // Z, slots[t] % Z] = k[t, g]      (v likewise; slots >= P * Z dropped)

XLA writes each of K and V with its own scatter kernel: two launches a layer, about 3 us
each on an H200 at batch 32, for 256 KB each. This kernel writes both in one launch, in
place: the page arrays are aliased to its outputs, so under a jit that donates the cache
nothing is copied. One program per (token, kv head) stores a row of E for K and one for V.
A slot outside [0, P * Z) (a padding token's) is masked off: nothing is written.

`write_pages_reference` is the XLA version (the CPU path, and this kernel's test oracle).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.paged_attention import _is_pow2

IMPLS = ("pallas", "xla")


def page_write_kernel(slot_ref, k_ref, v_ref, k_in, v_in, k_out, v_out):
    # slot_ref [1]; k_ref, v_ref [E] (token t, head g); k_in, v_in: the aliased inputs (not
    # read); k_out, v_out [P * Z, E] (head g's pages, flattened).
    del k_in, v_in
    n_slots, head_dim = k_out.shape
    slot = slot_ref[0]
    valid = jnp.full((1, head_dim), (slot >= 0) & (slot < n_slots))
    row = pl.ds(jnp.clip(slot, 0, n_slots - 1), 1)
    pltriton.store(k_out.at[row, :], k_ref[...].astype(k_out.dtype)[None], mask=valid)
    pltriton.store(v_out.at[row, :], v_ref[...].astype(v_out.dtype)[None], mask=valid)


def write_pages_reference(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
                          slots: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Plain XLA: one scatter per array."""
    G, P, Z, E = k_pages.shape
    slots = jnp.where(slots < 0, P * Z, slots)     # dropped, not counted from the end

    def write(pages, new):
        flat = pages.reshape(G, P * Z, E)
        flat = flat.at[:, slots, :].set(new.transpose(1, 0, 2).astype(pages.dtype),
                                        mode="drop")
        return flat.reshape(G, P, Z, E)
    return write(k_pages, k), write(v_pages, v)


@functools.partial(jax.jit, static_argnames=("impl", "interpret"))
def write_pages(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
                slots: jax.Array, *, impl: str = "pallas",
                interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """k_pages, v_pages [G, P, Z, E] with k, v [T, G, E] written at flat slots [T] int32
    (slot = page * Z + offset; a slot outside [0, P * Z) is dropped). Returns the two page
    arrays; with impl="pallas" they are written in place when the caller donates them."""
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r} is not one of {IMPLS}")
    if (k_pages.ndim != 4 or k_pages.shape != v_pages.shape or k.ndim != 3
            or k.shape != v.shape or k.shape[1:] != (k_pages.shape[0], k_pages.shape[3])
            or slots.shape != k.shape[:1]):
        raise ValueError(f"expected k_pages, v_pages [G, P, Z, E], k, v [T, G, E] and slots "
                         f"[T], got {k_pages.shape}, {v_pages.shape}, {k.shape}, {v.shape} "
                         f"and {slots.shape}")
    slots = slots.astype(jnp.int32)
    if impl == "pallas" and not _is_pow2(k.shape[2]):
        raise ValueError(f"head dim E={k.shape[2]} must be a power of two for the Pallas "
                         f"kernel")
    if impl == "xla":
        return write_pages_reference(k_pages, v_pages, k, v, slots)
    (G, P, Z, E), T = k_pages.shape, k.shape[0]
    pages_spec = pl.BlockSpec((None, P * Z, E), lambda t, g: (g, 0, 0))
    new_spec = pl.BlockSpec((None, None, E), lambda t, g: (t, g, 0))
    k_out, v_out = pl.pallas_call(
        page_write_kernel,
        grid=(T, G),
        in_specs=[pl.BlockSpec((1,), lambda t, g: (t,)), new_spec, new_spec, pages_spec,
                  pages_spec],
        out_specs=[pages_spec, pages_spec],
        out_shape=[jax.ShapeDtypeStruct((G, P * Z, E), k_pages.dtype)] * 2,
        input_output_aliases={3: 0, 4: 1},
        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=jax.default_backend() == "cpu" if interpret is None else interpret,
    )(slots, k, v, k_pages.reshape(G, P * Z, E), v_pages.reshape(G, P * Z, E))
    return k_out.reshape(G, P, Z, E), v_out.reshape(G, P, Z, E)
