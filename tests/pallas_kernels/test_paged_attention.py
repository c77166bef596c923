"""Paged attention (kernel and XLA reference) against an independent dense oracle.

Each case builds dense per-sequence keys and values first, scatters them into randomly
permuted physical pages (stale random data elsewhere, garbage page-table entries past each
sequence's pages), and compares with attention over the dense cache:
`decode_attention_reference` for one query token per block, a float64 numpy causal attention
for prefill blocks.

On the CPU the kernel runs in Pallas interpret mode; with JAX_PLATFORMS=cuda on the GPU
machine the same tests run the compiled Triton kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention_reference
from pallas_kernels.paged_attention import (
    PagedAttentionBlocks,
    paged_attention,
    paged_attention_reference,
)

# max |out - oracle| relative to max |oracle| (float32 products are IEEE, not TF32, on the GPU)
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
BLOCKS = [PagedAttentionBlocks(), PagedAttentionBlocks(block_s=16, num_warps=4, num_stages=2),
          PagedAttentionBlocks(block_s=128, num_warps=8, num_stages=3)]
DECODE = [  # H, G, E, Z, W, context of each block's sequence (0: an all-padding block)
    (4, 4, 16, 16, 8, (1, 77, 128)),        # MHA (R=1): context 1, a full table
    (8, 2, 32, 32, 5, (150, 0, 33, 160)),   # R=4, W not a power of two, a padding block
    (9, 3, 64, 16, 6, (96, 17)),            # SmolLM2's R=3 (padded to 4)
    (16, 2, 16, 16, 4, (64, 1, 40)),        # R=8
    (4, 1, 16, 32, 256, (8192,)),           # 8k context, one sequence: many splits
    (8, 2, 32, 16, 512, (8192, 3000)),      # splits past the second sequence's end
]
PREFILL = [  # H, G, E, Z, W, (cached prefix, new tokens) of each sequence; T = 16
    (8, 2, 32, 16, 8, ((0, 16), (37, 25), (100, 9))),   # R=4; a chunk of two blocks
    (4, 4, 16, 32, 4, ((5, 16), (0, 0))),               # R=1, an all-padding block
    (9, 3, 16, 16, 5, ((30, 20),)),                     # R=3 padded
    (16, 2, 16, 16, 4, ((10, 7),)),                     # R=8: 128 query rows
    (4, 1, 16, 32, 160, ((4090, 16), (900, 3))),        # long prefix: splits, one crossed
]
T_PREFILL = 16


def build(rng, seq_lens, block_seqs, positions, H, G, E, Z, W, dtype, stale=None):
    """Dense K/V per sequence [n, S, G, E] scattered into permuted pages.

    Returns (q, k_pages, v_pages, page_tables, positions), the dense (K, V) in float64, and
    the sequence of each block."""
    S, n_seqs = W * Z, len(seq_lens)
    n_pages = [-(-L // Z) for L in seq_lens]
    P = n_seqs * W + 3          # from the shapes alone: same-shaped cases share a compile
    perm = rng.permutation(P)
    tables = rng.integers(-P, 2 * P, (n_seqs, W))   # garbage past each sequence's pages
    for b, n in enumerate(n_pages):
        tables[b, :n], perm = perm[:n], perm[n:]
    kd, vd = (rng.standard_normal((n_seqs, S, G, E)) for _ in range(2))
    k_pages, v_pages = (rng.standard_normal((G, P, Z, E)) * 3 for _ in range(2))
    if stale is not None:    # the same draws either way, so only the stale slots differ
        k_pages[:], v_pages[:] = stale, stale
    for b, L in enumerate(seq_lens):
        p = np.arange(L)
        k_pages[:, tables[b, p // Z], p % Z] = kd[b, :L].transpose(1, 0, 2)
        v_pages[:, tables[b, p // Z], p % Z] = vd[b, :L].transpose(1, 0, 2)
    q = rng.standard_normal((len(block_seqs), positions.shape[1], H, E))
    cast = lambda x: jnp.asarray(x, jnp.float32).astype(dtype)
    inputs = (cast(q), cast(k_pages), cast(v_pages), jnp.asarray(tables[block_seqs], jnp.int32),
              jnp.asarray(positions, jnp.int32))
    # the oracle sees the same (rounded) values as the kernel
    dense = tuple(np.asarray(cast(x).astype(jnp.float32), np.float64) for x in (kd, vd))
    return inputs, dense, block_seqs


def decode_case(rng, case, dtype, stale=None):
    H, G, E, Z, W, contexts = case
    positions = np.array(contexts)[:, None] - 1                         # [N, 1]; 0 -> -1
    return build(rng, contexts, np.arange(len(contexts)), positions, H, G, E, Z, W, dtype,
                 stale)


def prefill_case(rng, case, dtype, stale=None):
    """Each sequence's new tokens cut into blocks of T; the last block padded with -1."""
    H, G, E, Z, W, seqs = case
    block_seqs, rows = [], []
    for b, (prefix, new) in enumerate(seqs):
        pos = np.arange(prefix, prefix + new)
        pad = -(-max(new, 1) // T_PREFILL) * T_PREFILL - new
        pos = np.pad(pos, (0, pad), constant_values=-1)
        rows += list(pos.reshape(-1, T_PREFILL))
        block_seqs += [b] * (len(pos) // T_PREFILL)
    return build(rng, [p + n for p, n in seqs], np.array(block_seqs), np.stack(rows), H, G, E,
                 Z, W, dtype, stale)


def dense_oracle(q, positions, kd, vd, block_seqs):
    """Causal attention in float64 over dense K/V [n, S, G, E]; padding rows -> 0."""
    q = np.asarray(q.astype(jnp.float32), np.float64)
    positions = np.asarray(positions)
    H, E = q.shape[2:]
    R = H // kd.shape[2]
    k = np.repeat(kd[block_seqs], R, axis=2)                            # [N, S, H, E]
    v = np.repeat(vd[block_seqs], R, axis=2)
    scores = np.einsum("nthe,nshe->nths", q, k) / np.sqrt(E)
    visible = np.arange(k.shape[1]) <= positions[:, :, None]            # [N, T, S]
    scores = np.where(visible[:, :, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True, initial=-1e300))
    probs /= np.maximum(probs.sum(-1, keepdims=True), 1e-300)
    return np.einsum("nths,nshe->nthe", probs, v)


def oracle(inputs, dense, block_seqs):
    q, _, _, _, positions = inputs
    kd, vd = dense
    if q.shape[1] > 1:
        return dense_oracle(q, positions, kd, vd, block_seqs)
    f32 = lambda x: jnp.asarray(x[block_seqs].transpose(0, 2, 1, 3), jnp.float32)
    out = jax.jit(decode_attention_reference)(q[:, 0].astype(jnp.float32), f32(kd), f32(vd),
                                              positions[:, 0] + 1)             # [N, H, E]
    valid = np.asarray(positions)[:, :, None, None] >= 0                       # [N, 1, 1, 1]
    return np.where(valid, np.asarray(out)[:, None], 0.0)


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    return np.abs(out - ref).max() / np.abs(ref).max()


def check(inputs, ref, dtype, **kw):
    q, positions = inputs[0], np.asarray(inputs[4])
    # impl="xla" is paged_attention_reference, jitted (op by op it compiles slower)
    for out in (paged_attention(*inputs, **kw), paged_attention(*inputs, impl="xla")):
        assert out.shape == q.shape and out.dtype == q.dtype
        assert rel_err(out, ref) < TOL[dtype]
        assert not np.asarray(out, np.float32)[positions < 0].any()    # padding rows: exactly 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", DECODE, ids=lambda c: "H{}G{}E{}Z{}W{}-{}".format(
    *c[:5], "-".join(map(str, c[5]))))
def test_decode_matches_dense_oracle(case, dtype):
    inputs, dense, seqs = decode_case(np.random.default_rng(len(case[5]) + case[4]), case,
                                      dtype)
    check(inputs, oracle(inputs, dense, seqs), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", PREFILL, ids=lambda c: "H{}G{}E{}Z{}W{}-{}".format(
    *c[:5], "-".join(f"{p}+{n}" for p, n in c[5])))
def test_prefill_matches_dense_oracle(case, dtype):
    inputs, dense, seqs = prefill_case(np.random.default_rng(len(case[5]) + case[4]), case,
                                       dtype)
    check(inputs, oracle(inputs, dense, seqs), dtype)


@pytest.mark.parametrize("seed", range(3))
def test_random_positions(seed):
    """Random contexts (0 = a padding block) and prefill pieces, same shapes every seed."""
    rng = np.random.default_rng(100 + seed)
    Z, W = 16, 12
    contexts = tuple(int(c) for c in rng.integers(0, W * Z + 1, 5))
    inputs, dense, seqs = decode_case(rng, (8, 2, 16, Z, W, contexts), jnp.float32)
    check(inputs, oracle(inputs, dense, seqs), jnp.float32)
    new = rng.integers(0, T_PREFILL + 1, 4)
    pieces = tuple((int(rng.integers(0, W * Z - n + 1)), int(n)) for n in new)
    inputs, dense, seqs = prefill_case(rng, (8, 2, 16, Z, W, pieces), jnp.float32)
    check(inputs, oracle(inputs, dense, seqs), jnp.float32)


@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"bs{b.block_s}w{b.num_warps}")
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_block_configs(kind, blocks):
    rng = np.random.default_rng(7)
    if kind == "decode":   # page 16: one page per step (block_s 16) up to eight (128)
        inputs, dense, seqs = decode_case(rng, (8, 2, 16, 16, 40, (600, 0, 129)), jnp.float32)
    else:
        inputs, dense, seqs = prefill_case(rng, (8, 2, 16, 16, 12, ((150, 20),)), jnp.float32)
    check(inputs, oracle(inputs, dense, seqs), jnp.float32, blocks=blocks)


@pytest.mark.parametrize("T", [1, 16])
def test_stale_pages_and_garbage_table_entries_are_never_read(T):
    """Every cache slot the blocks do not attend to holds NaN or 1e4: the kernel never loads
    them; the reference loads (masked) finite ones only."""
    case = (8, 2, 16, 16, 6, (40, 0, 81)) if T == 1 else (8, 2, 16, 16, 6, ((40, 20), (0, 0)))
    make = decode_case if T == 1 else prefill_case
    (clean, dense, seqs), (nan, _, _), (big, _, _) = (
        make(np.random.default_rng(3), case, jnp.float32, stale) for stale in (None, np.nan, 1e4))
    out = paged_attention(*clean)
    np.testing.assert_array_equal(paged_attention(*nan), out)
    np.testing.assert_array_equal(paged_attention(*big), out)
    assert rel_err(out, oracle(clean, dense, seqs)) < TOL[jnp.float32]
    np.testing.assert_allclose(paged_attention(*big, impl="xla"),
                               paged_attention(*clean, impl="xla"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_all_padding_blocks_give_zeros(impl):
    inputs, _, _ = decode_case(np.random.default_rng(5), (8, 2, 16, 16, 4, (0, 0)), jnp.float32)
    q, k_pages, v_pages, tables, _ = inputs
    q = jnp.broadcast_to(q, (2, 16, 8, 16))                            # T = 16
    out = paged_attention(q, k_pages, v_pages, tables, jnp.full((2, 16), -1), impl=impl)
    assert out.shape == q.shape
    assert not np.asarray(out).any()


def test_xla_impl_is_the_reference():
    inputs, _, _ = prefill_case(np.random.default_rng(6), PREFILL[0], jnp.float32)
    np.testing.assert_allclose(paged_attention(*inputs, impl="xla"),
                               paged_attention_reference(*inputs), rtol=1e-5,
                               atol=1e-6)  # jitted vs op-by-op: fusion may reorder sums


@pytest.mark.parametrize("bad, match", [
    ({"q": (2, 1, 6, 16), "pages": (4, 8, 16, 16)}, "shapes do not agree"),   # H % G
    ({"q": (2, 1, 4, 32), "pages": (2, 8, 16, 16)}, "shapes do not agree"),   # E differs
    ({"q": (2, 1, 4, 16), "tables": (3, 4)}, "shapes do not agree"),          # N differs
    ({"q": (2, 2, 4, 16), "positions": (2, 1)}, "shapes do not agree"),
    ({"q": (2, 1, 4, 12), "pages": (2, 8, 16, 12)}, "head dim E=12"),
    ({"pages": (2, 8, 4, 16)}, "page size Z=4"),
    ({"q": (2, 3, 4, 16), "positions": (2, 3)}, "query block T=3"),
    ({"pages": (2, 8, 16)}, r"k_pages, v_pages \[G, P, Z, E\]"),
])
def test_bad_shapes_are_refused(bad, match):
    shapes = {"q": (2, 1, 4, 16), "pages": (2, 8, 16, 16), "tables": (2, 4), "positions": (2, 1)}
    shapes.update(bad)
    pages = jnp.ones(shapes["pages"], jnp.float32)
    with pytest.raises(ValueError, match=match):
        paged_attention(jnp.ones(shapes["q"], jnp.float32), pages, pages,
                        jnp.zeros(shapes["tables"], jnp.int32),
                        jnp.zeros(shapes["positions"], jnp.int32))


def test_bad_impl_is_refused():
    inputs, _, _ = decode_case(np.random.default_rng(1), DECODE[0], jnp.float32)
    with pytest.raises(ValueError, match="impl 'cuda' is not one of"):
        paged_attention(*inputs, impl="cuda")


LOWERED = [  # N, T, H, G, E, Z, W, P
    (32, 1, 32, 8, 128, 16, 128, 4099),     # llama3-8B-like decode (R=4), page 16
    (32, 1, 32, 8, 128, 32, 64, 2049),      # same, page 32
    (64, 1, 8, 8, 128, 16, 128, 8193),      # R=1
    (1, 1, 8, 8, 128, 32, 256, 300),        # R=1, one 8k sequence: split
    (7, 1, 9, 3, 64, 16, 100, 701),         # SmolLM2's R=3, W not a power of two
    (8, 16, 32, 8, 128, 16, 64, 1000),      # prefill pieces, R=4: 64 rows
    (8, 16, 32, 8, 128, 32, 32, 1000),
    (8, 16, 8, 8, 128, 32, 32, 1000),       # R=1: 16 rows
    (1, 16, 8, 8, 128, 16, 512, 600),       # one piece of a long prompt: split
    (5, 16, 9, 3, 64, 32, 257, 1300),       # R=3 prefill, W not a power of two
]


@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"bs{b.block_s}w{b.num_warps}")
@pytest.mark.parametrize("shape", LOWERED, ids=lambda s: "N{}T{}H{}G{}E{}Z{}W{}".format(*s))
def test_lowers_for_cuda(shape, blocks):
    """Triton lowering rules that interpret mode does not enforce (power-of-two tiles...)."""
    N, T, H, G, E, Z, W, P = shape
    sds = jax.ShapeDtypeStruct
    args = [sds((N, T, H, E), jnp.bfloat16), sds((G, P, Z, E), jnp.bfloat16),
            sds((G, P, Z, E), jnp.bfloat16), sds((N, W), jnp.int32), sds((N, T), jnp.int32)]
    fn = jax.jit(lambda *a: paged_attention(*a, blocks=blocks, interpret=False))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower()


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16])
def test_compiled_kernel_on_gpu_at_llama_shape(T):
    rng = np.random.default_rng(11)
    if T == 1:
        inputs, dense, seqs = decode_case(
            rng, (32, 8, 128, 16, 128, tuple(rng.integers(1, 2049, 32))), jnp.bfloat16)
    else:
        inputs, dense, seqs = prefill_case(
            rng, (32, 8, 128, 32, 64, ((1000, 40), (0, 16), (2000, 5))), jnp.bfloat16)
    check(inputs, oracle(inputs, dense, seqs), jnp.bfloat16, interpret=False)
