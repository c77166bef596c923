"""Rotary position embedding (RoPE) in the rotate-half layout of Hugging Face's Llama.

    out[..., :E/2] = x1 cos(p f) - x2 sin(p f)      out[..., E/2:] = x2 cos(p f) + x1 sin(p f)

for x = [x1 | x2] of head dim E, position p and inverse frequencies f [E/2]
(`jlora.model.rope_frequencies`), computed in float32 and rounded once to x's dtype. The
model rotates queries with this; the page write kernel (`page_write`) rotates keys with the
same formula as it writes them, and uses this as its reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate x [B, T, N, E] by its tokens' positions [B, T]."""
    angles = positions[:, :, None].astype(jnp.float32) * inv_freq      # [B, T, E/2]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]  # [B, T, 1, E/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)
