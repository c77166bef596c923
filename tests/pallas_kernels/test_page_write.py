"""The page write kernel (keys rotated and values written, read from the q/k/v output, in one
launch, in place) against XLA: slices, RoPE and scatters.

On the CPU the kernel runs in Pallas interpret mode; with JAX_PLATFORMS=cuda on the GPU
machine the same tests run the compiled Triton kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.page_write import split_qkv, write_pages, write_pages_reference

CASES = [  # H, G, P, Z, E, T
    (8, 4, 6, 16, 16, 5),      # T not a power of two, GQA ratio 2
    (9, 3, 9, 4, 64, 8),       # G not a power of two (SmolLM2's 9 heads over 3 kv heads)
    (1, 1, 3, 32, 32, 1),      # one token, one head
]


def case(rng, H, G, P, Z, E, T, dtype, n_dropped=2):
    pages = [jnp.asarray(rng.standard_normal((G, P, Z, E)), dtype) for _ in range(2)]
    qkv = jnp.asarray(rng.standard_normal((T, (H + 2 * G) * E)), dtype)
    slots = rng.permutation(P * Z)[:T]             # distinct: the result is well defined
    slots[rng.permutation(T)[:min(n_dropped, T - 1)]] = rng.choice([P * Z, P * Z + 7, -1])
    positions = jnp.asarray(rng.integers(0, 4096, T), jnp.int32)
    inv_freq = jnp.asarray(10000.0 ** -(np.arange(0, E, 2) / E), jnp.float32)
    return (*pages, qkv, jnp.asarray(slots, jnp.int32), positions, inv_freq)


def assert_close(got, want, dtype):
    """Equal up to float32 rounding, or one bfloat16 rounding step (the kernel's sin and cos
    need not be XLA's to the last bit)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    tol = 1e-6 if dtype == jnp.float32 else 2 ** -7
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "H{}G{}P{}Z{}E{}T{}".format(*s))
def test_matches_xla(shape, dtype):
    H = shape[0]
    args = case(np.random.default_rng(sum(shape)), *shape, dtype)
    got = write_pages(*args, n_heads=H)
    want = write_pages_reference(*args, n_heads=H)
    for g, w, before in zip(got, want, args[:2]):
        assert g.dtype == before.dtype and g.shape == before.shape
        assert_close(g, w, dtype)
        assert not np.array_equal(np.asarray(g, np.float32), np.asarray(before, np.float32))
    np.testing.assert_array_equal(np.asarray(got[1], np.float32),   # v: copied, exact
                                  np.asarray(want[1], np.float32))


def test_keys_rotated_values_not():
    """Where a written row comes from: key head g is qkv's column block H + g, rotated (a
    position-0 key is not), value head g is block H + G + g, as it is."""
    H, G, P, Z, E = 4, 2, 2, 8, 16
    k_pages, v_pages, qkv, _, _, inv_freq = case(np.random.default_rng(1), H, G, P, Z, E, 2,
                                                 jnp.float32, n_dropped=0)
    slots, positions = jnp.asarray([3, 9], jnp.int32), jnp.asarray([0, 5], jnp.int32)
    k_out, v_out = write_pages(k_pages, v_pages, qkv, slots, positions, inv_freq, n_heads=H)
    k_out, v_out = (np.asarray(x).reshape(G, P * Z, E) for x in (k_out, v_out))
    blocks = np.asarray(qkv).reshape(2, H + 2 * G, E)
    for g in range(G):
        np.testing.assert_allclose(k_out[g, 3], blocks[0, H + g], rtol=1e-6)   # position 0
        np.testing.assert_array_equal(v_out[g, 9], blocks[1, H + G + g])
        x1, x2 = np.split(blocks[1, H + g], 2)
        c, s = np.cos(5 * np.asarray(inv_freq)), np.sin(5 * np.asarray(inv_freq))
        np.testing.assert_allclose(k_out[g, 9], np.concatenate([x1 * c - x2 * s,
                                                                x2 * c + x1 * s]), rtol=1e-5,
                                   atol=1e-6)


def test_dropped_slots_write_nothing():
    """Slots outside [0, P * Z) (padding tokens) leave every page as it was."""
    H, G, P, Z, E, T = 2, 2, 3, 8, 16, 4
    k_pages, v_pages, qkv, _, positions, inv_freq = case(np.random.default_rng(5), H, G, P, Z,
                                                         E, T, jnp.float32)
    slots = jnp.asarray([P * Z, -1, P * Z + 100, -P * Z], jnp.int32)
    for impl in ("pallas", "xla"):
        got_k, got_v = write_pages(k_pages, v_pages, qkv, slots, positions, inv_freq,
                                   n_heads=H, impl=impl)
        np.testing.assert_array_equal(got_k, k_pages)
        np.testing.assert_array_equal(got_v, v_pages)


def test_xla_impl_is_the_reference():
    """(Up to float32 rounding: under jit, XLA fuses RoPE's sin and cos differently.)"""
    args = case(np.random.default_rng(2), *CASES[0], jnp.float32)
    for g, w in zip(write_pages(*args, n_heads=CASES[0][0], impl="xla"),
                    write_pages_reference(*args, n_heads=CASES[0][0])):
        assert_close(g, w, jnp.float32)


def test_split_qkv_is_the_models_split():
    """The reference's k and v are the model's own (`jlora.model.NewKV.split`)."""
    from jlora.config import preset
    from jlora.model import NewKV
    cfg = preset("tiny")
    H, G, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    _, _, qkv, _, positions, inv_freq = case(np.random.default_rng(3), H, G, 1, 8, E, 6,
                                             jnp.float32)
    k, v = NewKV(qkv[None], positions[None], inv_freq, cfg).split()
    for got, want in zip(split_qkv(qkv, H, G, positions, inv_freq), (k[0], v[0])):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bad, match", [
    (dict(impl="cuda"), "impl 'cuda' is not one of"),
    (dict(qkv_cols=100), r"expected qkv \[T, \(n_heads \+ 2G\) \* E = 128\]"),
    (dict(slots_len=4), r"slots and positions \[T\]"),
    (dict(freq_len=3), r"inv_freq \[E/2 = 8\]"),
    (dict(pages_ndim=3), r"expected k_pages, v_pages \[G, P, Z, E\]"),
    (dict(head_dim=24), "head dim E=24 must be a power of two"),
])
def test_bad_input_is_refused(bad, match):
    E, H, G, T = bad.get("head_dim", 16), 4, 2, 5
    pages = jnp.zeros((G, 6, 16, E)[:bad.get("pages_ndim", 4)])
    qkv = jnp.ones((T, bad.get("qkv_cols", (H + 2 * G) * E)))
    slots = jnp.arange(bad.get("slots_len", T), dtype=jnp.int32)
    inv_freq = jnp.ones((bad.get("freq_len", E // 2),))
    with pytest.raises(ValueError, match=match):
        write_pages(pages, pages, qkv, slots, jnp.arange(T), inv_freq, n_heads=H,
                    impl=bad.get("impl", "pallas"))


def llama2_7b_args(sds=jax.ShapeDtypeStruct):
    """llama2-7b's decode step at batch 32: bf16 pages of 16, 32 heads of 128."""
    pages = sds((32, 1100, 16, 128), jnp.bfloat16)
    return (pages, pages, sds((32, 96 * 128), jnp.bfloat16), sds((32,), jnp.int32),
            sds((32,), jnp.int32), sds((64,), jnp.float32))


def test_lowers_for_cuda():
    fn = jax.jit(lambda *a: write_pages(*a, n_heads=32, interpret=False),
                 donate_argnums=(0, 1))
    text = fn.trace(*llama2_7b_args()).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower()


@pytest.mark.gpu
def test_compiled_kernel_on_gpu_in_place():
    """On the GPU: the compiled kernel, under a jit that donates the pages, as the step uses
    it, matches XLA."""
    args = case(np.random.default_rng(9), 32, 32, 700, 16, 128, 32, jnp.bfloat16)
    want = write_pages_reference(*args, n_heads=32)
    fn = jax.jit(lambda *a: write_pages(*a, n_heads=32, interpret=False),
                 donate_argnums=(0, 1))
    got = fn(*[jnp.array(a, copy=True) for a in args])
    for g, w in zip(got, want):
        assert_close(g, w, jnp.bfloat16)
