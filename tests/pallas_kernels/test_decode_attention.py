"""Decode attention kernel against its XLA reference, on fresh random inputs.

On the CPU the kernel runs in Pallas interpret mode; with JAX_PLATFORMS=cuda on the GPU
machine the same tests run the compiled Triton kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import (DecodeAttentionBlocks, decode_attention,
                                             decode_attention_reference)

# max |out - ref| relative to max |ref| (float32 products are IEEE, not TF32, on the GPU too)
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
BLOCKS = [DecodeAttentionBlocks(), DecodeAttentionBlocks(block_s=16, num_warps=4, num_stages=2),
          DecodeAttentionBlocks(block_s=128, num_warps=8, num_stages=3)]
SHAPES = [  # B, H, G, S, E
    (1, 4, 4, 64, 16),      # MHA (R=1, replicated to 16 rows), one sequence: many splits
    (3, 8, 2, 100, 32),     # GQA R=4, S not a multiple of the block
    (2, 9, 3, 77, 64),      # SmolLM2's R=3 (padded to 16 rows)
    (5, 16, 2, 40, 16),     # R=8
    (2, 32, 2, 48, 16),     # R=16: no row replication
    (4, 4, 2, 130, 16),     # R=2
]


def inputs(B, H, G, S, E, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, H, E), dtype)
    k = jax.random.normal(ks[1], (B, G, S, E), dtype)
    v = jax.random.normal(ks[2], (B, G, S, E), dtype)
    lengths = jax.random.randint(ks[3], (B,), 1, S + 1).at[0].set(S)
    return q, k, v, lengths


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    return np.abs(out - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}G{}S{}E{}".format(*s))
def test_matches_reference(shape, dtype):
    q, k, v, lengths = inputs(*shape, dtype, seed=hash(shape) % 1000)
    ref = decode_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                     v.astype(jnp.float32), lengths)
    assert rel_err(decode_attention(q, k, v, lengths), ref) < TOL[dtype]


@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"bs{b.block_s}w{b.num_warps}")
def test_block_configs(blocks):
    q, k, v, lengths = inputs(2, 8, 2, 150, 32, jnp.float32, seed=7)
    ref = decode_attention_reference(q, k, v, lengths)
    assert rel_err(decode_attention(q, k, v, lengths, blocks=blocks), ref) < TOL[jnp.float32]


def test_positions_past_the_length_are_ignored():
    q, k, v, _ = inputs(2, 4, 2, 64, 16, jnp.float32, seed=3)
    lengths = jnp.array([1, 33])
    out = decode_attention(q, k, v, lengths)
    noisy_k = k.at[:, :, 40:].set(1e4)   # garbage past every length must not matter
    noisy_v = v.at[:, :, 40:].set(1e4)
    np.testing.assert_allclose(decode_attention(q, noisy_k, noisy_v, lengths), out)
    # with one position, attention returns that position's value
    assert rel_err(out[0], jnp.repeat(v[0, :, 0], 2, axis=0)) < TOL[jnp.float32]


def test_lengths_beyond_the_cache_are_clamped():
    q, k, v, _ = inputs(2, 4, 4, 32, 16, jnp.float32, seed=4)
    np.testing.assert_allclose(decode_attention(q, k, v, jnp.array([32, 100])),
                               decode_attention(q, k, v, jnp.array([32, 32])))


def test_xla_impl_is_the_reference():
    q, k, v, lengths = inputs(3, 8, 2, 50, 16, jnp.float32, seed=5)
    np.testing.assert_allclose(decode_attention(q, k, v, lengths, impl="xla"),
                               decode_attention_reference(q, k, v, lengths), rtol=1e-5,
                               atol=1e-6)  # jitted vs op-by-op: fusion may reorder sums


@pytest.mark.parametrize("bad", [
    dict(q=(2, 6, 16), k=(2, 4, 8, 16)),          # H not a multiple of G
    dict(q=(2, 4, 16), k=(3, 2, 8, 16)),          # batch differs
    dict(q=(2, 4, 12), k=(2, 2, 8, 12)),          # E not a power of two
])
def test_bad_shapes_are_refused(bad):
    q = jnp.ones(bad["q"], jnp.float32)
    k = jnp.ones(bad["k"], jnp.float32)
    with pytest.raises(ValueError, match="shapes do not agree|head dim E=12"):
        decode_attention(q, k, k, jnp.ones((bad["q"][0],), jnp.int32))


def test_bad_impl_is_refused():
    q, k, v, lengths = inputs(1, 4, 4, 16, 16, jnp.float32)
    with pytest.raises(ValueError, match="impl 'cuda' is not one of"):
        decode_attention(q, k, v, lengths, impl="cuda")


@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"bs{b.block_s}w{b.num_warps}")
@pytest.mark.parametrize("shape", [(1, 32, 32, 512, 128), (32, 32, 8, 4096, 128),
                                   (7, 9, 3, 300, 64)], ids=["llama2-b1", "llama3-b32",
                                                              "smollm2-b7"])
def test_lowers_for_cuda(shape, blocks):
    """Triton lowering rules that interpret mode does not enforce (power-of-two tiles...)."""
    B, H, G, S, E = shape
    args = [jax.ShapeDtypeStruct((B, H, E), jnp.bfloat16),
            jax.ShapeDtypeStruct((B, G, S, E), jnp.bfloat16),
            jax.ShapeDtypeStruct((B, G, S, E), jnp.bfloat16),
            jax.ShapeDtypeStruct((B,), jnp.int32)]
    fn = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, blocks=blocks,
                                                     interpret=False))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower()


@pytest.mark.gpu
def test_compiled_kernel_on_gpu_at_llama2_shape():
    q, k, v, lengths = inputs(32, 32, 32, 512, 128, jnp.bfloat16, seed=11)
    ref = decode_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                     v.astype(jnp.float32), lengths)
    assert rel_err(decode_attention(q, k, v, lengths, interpret=False), ref) < TOL[jnp.bfloat16]
