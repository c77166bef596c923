"""The page write kernel (K and V in one launch, in place) against XLA's scatters.

On the CPU the kernel runs in Pallas interpret mode; with JAX_PLATFORMS=cuda on the GPU
machine the same tests run the compiled Triton kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.page_write import write_pages, write_pages_reference

CASES = [  # G, P, Z, E, T
    (4, 6, 16, 16, 5),      # T not a power of two
    (3, 9, 4, 64, 8),       # G not a power of two (SmolLM2's 3 kv heads)
    (1, 3, 32, 32, 1),      # one token, one head
]


def case(rng, G, P, Z, E, T, dtype, n_dropped=2):
    pages = [jnp.asarray(rng.standard_normal((G, P, Z, E)), dtype) for _ in range(2)]
    new = [jnp.asarray(rng.standard_normal((T, G, E)), jnp.float32) for _ in range(2)]
    slots = rng.permutation(P * Z)[:T]             # distinct: the result is well defined
    slots[rng.permutation(T)[:min(n_dropped, T - 1)]] = rng.choice([P * Z, P * Z + 7, -1])
    return (*pages, *new, jnp.asarray(slots, jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "G{}P{}Z{}E{}T{}".format(*s))
def test_matches_xla_scatters(shape, dtype):
    args = case(np.random.default_rng(sum(shape)), *shape, dtype)
    got = write_pages(*args)
    want = write_pages_reference(*args)
    for g, w, before in zip(got, want, args[:2]):
        assert g.dtype == before.dtype and g.shape == before.shape
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
        assert not np.array_equal(np.asarray(g, np.float32), np.asarray(before, np.float32))


def test_dropped_slots_write_nothing():
    """Slots outside [0, P * Z) (padding tokens) leave every page as it was."""
    G, P, Z, E, T = 2, 3, 8, 16, 4
    rng = np.random.default_rng(5)
    k_pages, v_pages, k, v, _ = case(rng, G, P, Z, E, T, jnp.float32)
    slots = jnp.asarray([P * Z, -1, P * Z + 100, -P * Z], jnp.int32)
    for impl in ("pallas", "xla"):
        got_k, got_v = write_pages(k_pages, v_pages, k, v, slots, impl=impl)
        np.testing.assert_array_equal(got_k, k_pages)
        np.testing.assert_array_equal(got_v, v_pages)


def test_xla_impl_is_the_reference():
    args = case(np.random.default_rng(2), *CASES[0], jnp.float32)
    for g, w in zip(write_pages(*args, impl="xla"), write_pages_reference(*args)):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("bad, match", [
    (dict(impl="cuda"), "impl 'cuda' is not one of"),
    (dict(k_shape=(5, 4, 8)), r"expected k_pages, v_pages \[G, P, Z, E\]"),
    (dict(slots_len=4), r"and slots \[T\], got"),
    (dict(head_dim=24), "head dim E=24 must be a power of two"),
])
def test_bad_input_is_refused(bad, match):
    E = bad.get("head_dim", 16)
    pages = jnp.zeros((4, 6, 16, E))
    k = jnp.ones(bad.get("k_shape", (5, 4, E)))
    slots = jnp.arange(bad.get("slots_len", 5), dtype=jnp.int32)
    with pytest.raises(ValueError, match=match):
        write_pages(pages, pages, k, k, slots, impl=bad.get("impl", "pallas"))


def test_lowers_for_cuda():
    """llama2-7b's decode step at batch 32: bf16 pages of 16, 32 kv heads of 128."""
    sds = jax.ShapeDtypeStruct
    pages = sds((32, 1100, 16, 128), jnp.bfloat16)
    new = sds((32, 32, 128), jnp.bfloat16)
    fn = jax.jit(lambda *a: write_pages(*a, interpret=False), donate_argnums=(0, 1))
    text = fn.trace(pages, pages, new, new, sds((32,), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower()


@pytest.mark.gpu
def test_compiled_kernel_on_gpu_in_place():
    """On the GPU: the compiled kernel, under a jit that donates the pages, as the step uses
    it, matches the scatters."""
    args = case(np.random.default_rng(9), 32, 700, 16, 128, 32, jnp.bfloat16)
    want = write_pages_reference(*args)
    fn = jax.jit(lambda *a: write_pages(*a, interpret=False), donate_argnums=(0, 1))
    got = fn(*[jnp.array(a, copy=True) for a in args])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
