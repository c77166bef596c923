"""Prefill + token-by-token decode through the KV cache equals the full-sequence forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.config import preset
from jlora import model

forward = jax.jit(model.forward, static_argnums=(1, 5))
full_logits = jax.jit(model.full_logits, static_argnums=1)
logits = jax.jit(model.logits, static_argnums=1)
init_cache, init_params = model.init_cache, model.init_params

CFG = preset("tiny").replace(qkv_bias=True)


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """Exact float32 on the GPU too (XLA's default there is TF32): these test cache logic."""
    with jax.default_matmul_precision("float32"):
        yield


@pytest.fixture(scope="module")
def params():
    p = init_params(CFG, jax.random.key(0), jnp.float32)
    return jax.tree.map(lambda w: w * 5 if w.ndim == 2 else w, p)  # sharper attention


@pytest.mark.parametrize("prefix", [1, 5, 16])
def test_prefill_then_decode_equals_full_forward(params, prefix):
    B, N, S = 3, 24, 32
    tokens = jax.random.randint(jax.random.key(1), (B, N), 0, CFG.vocab_size)
    expected = full_logits(params, CFG, tokens)                         # [B, N, V]
    cache = init_cache(CFG, B, S, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(prefix), (B, prefix))
    h, cache = forward(params, CFG, tokens[:, :prefix], pos, cache)
    got = [logits(params, CFG, h)]
    for t in range(prefix, N):
        h, cache = forward(params, CFG, tokens[:, t:t + 1], jnp.full((B, 1), t), cache)
        got.append(logits(params, CFG, h))
    got = jnp.concatenate(got, axis=1)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=2e-4)


def test_padded_batch_rows_equal_rows_run_alone(params):
    """Right padding (position = cache length) writes nothing and changes no real row."""
    S, lengths = 32, [3, 9, 6]
    rng = np.random.default_rng(2)
    rows = [rng.integers(0, CFG.vocab_size, n) for n in lengths]
    tokens = np.zeros((3, max(lengths)), np.int32)
    positions = np.full((3, max(lengths)), S, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], positions[i, :len(r)] = r, np.arange(len(r))
    h, cache = forward(params, CFG, tokens, positions, init_cache(CFG, 3, S, jnp.float32))
    for i, r in enumerate(rows):
        alone = full_logits(params, CFG, jnp.asarray(r)[None])[0]
        np.testing.assert_allclose(logits(params, CFG, h[i, :len(r)]), alone, atol=2e-4,
                                   rtol=2e-4)
        # nothing was written past the row's own tokens
        assert not np.asarray(cache.k[0][i, :, len(r):]).any()


def test_decode_of_an_inactive_row_leaves_its_cache_alone(params):
    S = 16
    cache = init_cache(CFG, 2, S, jnp.float32)
    _, cache = forward(params, CFG, jnp.array([[5], [7]]), jnp.array([[0], [S]]), cache)
    assert np.asarray(cache.k[1][0]).any() and not np.asarray(cache.k[1][1]).any()


def test_decode_with_the_pallas_kernel_equals_xla(params):
    """The model's decode path through the attention kernel (interpret mode on the CPU)."""
    B, S = 3, 48
    tokens = jax.random.randint(jax.random.key(5), (B, 20), 0, CFG.vocab_size)
    caches = {}
    for impl in ("xla", "pallas"):
        cache = init_cache(CFG, B, S, jnp.float32)
        pos = jnp.broadcast_to(jnp.arange(19), (B, 19))
        _, cache = forward(params, CFG, tokens[:, :19], pos, cache, impl)
        h, _ = forward(params, CFG, tokens[:, 19:], jnp.array([[19], [5], [S]]), cache, impl)
        caches[impl] = logits(params, CFG, h)
    np.testing.assert_allclose(caches["pallas"][:2], caches["xla"][:2], atol=1e-4, rtol=1e-4)
