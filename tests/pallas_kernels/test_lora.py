"""LoRA shrink/expand kernels against their XLA references, on fresh random inputs.

Interpret mode on the CPU; with JAX_PLATFORMS=cuda on the GPU machine the same tests run the
compiled Triton kernels. Adapters are random everywhere (B included), ranks mixed, and the
batch carries slot-0 tokens unless a test says otherwise.
"""

from dataclasses import replace
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.lora import SlotAdapter, pack_lora_weights
from jlora.model import LoraContext
from pallas_kernels.lora import (POOL_SLACK_ROWS, LoraBatch, LoraBlocks, LoraWeights,
                                 lora_apply, lora_expand, lora_fused_tokens, lora_gemm_tokens,
                                 lora_project, lora_shrink)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # max |out - ref| / max |ref|
D, WIDTHS = 64, (64, 32, 32)                   # a q/k/v-like group with GQA widths
SMALL = LoraBlocks(block_t=16, block_n=32, block_k=32)


def random_weights(rng, ranks, widths=WIDTHS, dim=D, variant="lora", dtype=jnp.float32,
                   max_rank=None):
    """ranks[s][m]: rank of slot s on module m (0 = none); slot 0 stays empty."""
    slots = [None]
    for row in ranks[1:]:
        a = [rng.normal(size=(r, dim)) / np.sqrt(dim) if r else None for r in row]
        b = [rng.normal(size=(n, r)) if r else None for n, r in zip(widths, row)]
        vec = lambda n: rng.uniform(0.5, 1.5, size=n)  # noqa: E731
        slots.append(SlotAdapter(
            a=a, b=b, scale=list(rng.uniform(0.5, 2.0, size=len(widths))),
            u=[vec(r) if r else None for r in row] if variant == "tied" else None,
            w=[vec(n) for n in widths] if variant == "tied" else None,
            g=[vec(n) for n in widths] if variant == "dora" else None))
    top = max(max(r) for r in ranks)
    return pack_lora_weights(slots, dim, widths, max_rank=max_rank or top, dtype=dtype)


def inputs(rng, T, dtype, widths=WIDTHS, dim=D):
    x = jnp.asarray(rng.normal(size=(T, dim)), dtype)
    y = jnp.asarray(rng.normal(size=(T, sum(widths))), dtype)
    return x, y


def segments_of(slots):
    """Sorted segments describing a batch whose tokens are already grouped by slot."""
    bounds = [0] + [i for i in range(1, len(slots)) if slots[i] != slots[i - 1]] + [len(slots)]
    return LoraBatch(seg_starts=jnp.asarray(bounds, jnp.int32),
                     seg_slots=jnp.asarray([slots[i] for i in bounds[:-1]], jnp.int32))


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    return np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)


def check(x, y, weights, batch, dtype, blocks=LoraBlocks()):
    """Shrink and expand each against the reference; returns the kernel's new y."""
    T = x.shape[0]
    v = lora_shrink(x, weights, batch, blocks=blocks)
    v_ref = lora_shrink(x, weights, batch, impl="xla", blocks=blocks)
    slots = np.asarray(batch.token_slots) if batch.token_slots is not None else np.repeat(
        np.asarray(batch.seg_slots), np.diff(np.asarray(batch.seg_starts)))
    ranks = np.asarray(weights.rank)[weights.layer][:, slots]           # [M, T]
    live = np.arange(v.shape[-1])[None, None] < ranks[..., None]       # past a rank: unspecified
    if live.any():
        assert rel_err(np.where(live, v.sum(0), 0), v_ref[0]) < TOL[dtype]
    out = lora_expand(jnp.array(y), v_ref, weights, batch, blocks=blocks)
    ref = lora_expand(jnp.array(y), v_ref, weights, batch, impl="xla", blocks=blocks)
    assert rel_err(out, ref) < TOL[dtype]
    base = slots == 0                       # slot-0 rows come back bit for bit
    np.testing.assert_array_equal(np.asarray(out)[base], np.asarray(y)[base])
    assert out.shape == (T, sum(weights.widths)) and out.dtype == y.dtype
    return out


MIXED = [[0, 0, 0], [8, 8, 16], [16, 0, 16], [64, 64, 8], [128, 16, 64], [32, 32, 32]]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("T", [1, 7, 16, 64, 300])
def test_per_token_mixed_ranks(T, dtype):
    rng = np.random.default_rng(T)
    weights = random_weights(rng, MIXED, dtype=dtype)
    x, y = inputs(rng, T, dtype)
    slots = jnp.asarray(rng.integers(0, len(MIXED), T), jnp.int32)
    check(x, y, weights, LoraBatch(token_slots=slots), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("T", [1, 7, 16, 64, 300])
def test_segments_mixed_ranks(T, dtype):
    rng = np.random.default_rng(100 + T)
    weights = random_weights(rng, MIXED, dtype=dtype)
    x, y = inputs(rng, T, dtype)
    slots = np.sort(rng.integers(0, len(MIXED), T))
    check(x, y, weights, segments_of(list(slots)), dtype, SMALL)


@pytest.mark.parametrize("rank", [8, 16, 64, 128])
@pytest.mark.parametrize("form", ["tokens", "segments"])
def test_each_rank_alone_all_tokens_on_one_adapter(rank, form):
    rng = np.random.default_rng(rank)
    weights = random_weights(rng, [[0, 0, 0], [rank] * 3])
    x, y = inputs(rng, 37, jnp.float32)
    batch = LoraBatch(token_slots=jnp.ones(37, jnp.int32)) if form == "tokens" \
        else segments_of([1] * 37)
    check(x, y, weights, batch, jnp.float32, SMALL)


@pytest.mark.parametrize("variant", ["tied", "dora"])
@pytest.mark.parametrize("form", ["tokens", "segments"])
def test_variants_in_one_batch(variant, form):
    rng = np.random.default_rng(7)
    weights = random_weights(rng, MIXED, variant=variant)
    assert (weights.u is not None) == (variant == "tied") and \
        (weights.g is not None) == (variant == "dora")
    x, y = inputs(rng, 50, jnp.float32)
    slots = np.sort(rng.integers(0, len(MIXED), 50))
    batch = LoraBatch(token_slots=jnp.asarray(slots, jnp.int32)) if form == "tokens" \
        else segments_of(list(slots))
    check(x, y, weights, batch, jnp.float32, SMALL)


def test_dora_scales_the_base_output_too():
    rng = np.random.default_rng(8)
    weights = random_weights(rng, [[0, 0, 0], [8, 8, 8]], variant="dora")
    x, y = inputs(rng, 4, jnp.float32)
    batch = LoraBatch(token_slots=jnp.ones(4, jnp.int32))
    zero_x = jnp.zeros_like(x)  # no LoRA delta: what is left is g * y
    out = lora_apply(zero_x, jnp.array(y), weights, batch)
    g = np.concatenate([np.asarray(gm)[0, 1] for gm in weights.g])
    np.testing.assert_allclose(out, np.asarray(y) * g[None], rtol=1e-6)


def test_empty_segments_and_slot_zero_segments():
    rng = np.random.default_rng(9)
    weights = random_weights(rng, MIXED)
    x, y = inputs(rng, 40, jnp.float32)
    batch = LoraBatch(seg_starts=jnp.asarray([0, 0, 10, 10, 25, 40, 40], jnp.int32),
                      seg_slots=jnp.asarray([3, 1, 4, 0, 2, 5], jnp.int32))
    check(x, y, weights, batch, jnp.float32, SMALL)


def test_only_slot_zero_changes_nothing():
    rng = np.random.default_rng(10)
    weights = random_weights(rng, MIXED)
    x, y = inputs(rng, 9, jnp.float32)
    out = lora_apply(x, jnp.array(y), weights, LoraBatch(token_slots=jnp.zeros(9, jnp.int32)))
    np.testing.assert_array_equal(out, y)


@pytest.mark.parametrize("widths", [(64,), (96, 96)], ids=["one-module", "gate-up"])
def test_single_and_two_module_groups(widths):
    rng = np.random.default_rng(11)
    ranks = [[0] * len(widths), [16] * len(widths), [8] * len(widths)]
    weights = random_weights(rng, ranks, widths=widths)
    x, y = inputs(rng, 20, jnp.float32, widths=widths)
    check(x, y, weights, LoraBatch(token_slots=jnp.asarray(rng.integers(0, 3, 20), jnp.int32)),
          jnp.float32, LoraBlocks(block_n=32))


def test_fused_group_equals_modules_one_by_one():
    rng = np.random.default_rng(12)
    weights = random_weights(rng, MIXED)
    x, y = inputs(rng, 30, jnp.float32)
    batch = LoraBatch(token_slots=jnp.asarray(rng.integers(0, len(MIXED), 30), jnp.int32))
    fused = lora_apply(x, jnp.array(y), weights, batch)
    parts, offset = [], 0
    for m, n in enumerate(WIDTHS):
        one = LoraWeights(a=weights.a, b=(weights.b[m],), a_start=weights.a_start[:, m:m + 1],
                          b_start=weights.b_start[:, m:m + 1], rank=weights.rank[:, m:m + 1],
                          scale=weights.scale[:, m:m + 1], max_rank=weights.max_rank)
        parts.append(lora_apply(x, jnp.array(y[:, offset:offset + n]), one, batch))
        offset += n
    np.testing.assert_allclose(fused, np.concatenate(parts, axis=1), rtol=1e-5, atol=1e-5)


def test_works_under_jit_and_vmap_free_composition():
    """Usable inside a larger jitted function (the model's step)."""
    rng = np.random.default_rng(13)
    weights = random_weights(rng, MIXED)
    x, y = inputs(rng, 8, jnp.float32)
    batch = LoraBatch(token_slots=jnp.asarray(rng.integers(0, len(MIXED), 8), jnp.int32))

    @jax.jit
    def step(x, y, weights, batch):
        return lora_apply(x * 2, y + 1, weights, batch) * 3

    ref = lora_apply(x * 2, jnp.array(y) + 1, weights, batch, impl="xla") * 3
    assert rel_err(step(x, y, weights, batch), ref) < 1e-5


@pytest.mark.parametrize("bad, message", [
    (dict(batch=LoraBatch()), "exactly one of them"),
    (dict(token_slots=np.zeros(5, np.int32)), "token_slots has shape"),
    (dict(x_dim=48), "x has 48 features but the A pool has 64"),
    (dict(impl="triton"), "impl 'triton' is not one of"),
    (dict(blocks=LoraBlocks(block_r=128)), "block_r=128 must be a power of two <= 64"),
])
def test_bad_inputs_are_refused(bad, message):
    rng = np.random.default_rng(14)
    weights = random_weights(rng, MIXED)
    x = jnp.ones((6, bad.get("x_dim", D)), jnp.float32)
    batch = bad.get("batch", LoraBatch(token_slots=jnp.asarray(
        bad.get("token_slots", np.zeros(6, np.int32)))))
    with pytest.raises(ValueError, match=message):
        lora_shrink(x, weights, batch, impl=bad.get("impl", "pallas"),
                    blocks=bad.get("blocks", LoraBlocks()))


def layered(weights: LoraWeights, layer: int) -> tuple[LoraWeights, list[LoraWeights]]:
    """The one-layer `weights` as three layers (0: no adapter anywhere, 1: as given, 2: slots
    1-4 swapped in pairs) read at `layer`, and each layer's tables on their own."""
    perm = np.arange(weights.rank.shape[-1])
    perm[1:5] = [2, 1, 4, 3]

    def three(t, slot_axis):
        first = np.zeros_like(t) if t is weights.rank else np.asarray(t)  # rank 0: no adapter
        t = np.asarray(t)
        return np.concatenate([first, t, np.take(t, perm, axis=slot_axis)])
    vecs = lambda vs: None if vs is None else tuple(jnp.asarray(three(v, 1)) for v in vs)  # noqa
    stacked = LoraWeights(
        a=weights.a, b=weights.b, a_start=jnp.asarray(three(weights.a_start, 2)),
        b_start=jnp.asarray(three(weights.b_start, 2)), rank=jnp.asarray(three(weights.rank, 2)),
        scale=jnp.asarray(three(weights.scale, 2)),
        u=None if weights.u is None else jnp.asarray(three(weights.u, 2)),
        w=vecs(weights.w), g=vecs(weights.g), max_rank=weights.max_rank, layer=layer)
    one = lambda x: None if x is None else x[i:i + 1]   # noqa: E731
    singles = []
    for i in range(3):
        singles.append(LoraWeights(
            a=weights.a, b=weights.b, a_start=one(stacked.a_start), b_start=one(stacked.b_start),
            rank=one(stacked.rank), scale=one(stacked.scale), u=one(stacked.u),
            w=None if stacked.w is None else tuple(one(v) for v in stacked.w),
            g=None if stacked.g is None else tuple(one(v) for v in stacked.g),
            max_rank=weights.max_rank))
    return stacked, singles


@pytest.mark.parametrize("variant", ["lora", "tied", "dora"])
@pytest.mark.parametrize("form", ["tokens", "segments", "fused", "gemm"])
def test_kernels_read_the_tables_of_their_layer(form, variant):
    """Tables stacked over layers (as the bank keeps them): each kernel reads `layer`'s, and
    gives what that layer's tables alone give."""
    rng = np.random.default_rng(23)
    weights = random_weights(rng, UP_TO_64, variant=variant)
    x, y = inputs(rng, 12, jnp.float32)
    slots = np.sort(rng.integers(0, len(UP_TO_64), 12))
    batch = segments_of(list(slots)) if form == "segments" else \
        LoraBatch(token_slots=jnp.asarray(slots, jnp.int32))
    blocks = {"fused": FUSED, "gemm": GEMM}.get(form, SMALL)
    w = base_weight(rng, jnp.float32)
    apply = (lambda wts, **kw: lora_project(x, w, wts, batch, **kw)) if form == "gemm" else \
        (lambda wts, **kw: lora_apply(x, jnp.array(y), wts, batch, **kw))   # noqa: E731
    outs = []
    for layer in range(3):
        stacked, singles = layered(weights, layer)
        with jax.default_matmul_precision("highest"):   # x @ w not in TF32 on the GPU
            ref = apply(singles[layer], impl="xla")
            np.testing.assert_array_equal(apply(stacked, impl="xla"), ref)
        out = apply(stacked, blocks=blocks)
        assert rel_err(out, ref) < TOL[jnp.float32]
        outs.append(np.asarray(out))
    if variant != "dora":       # layer 0 has no adapter: the base output as it was
        base = jnp.matmul(x, w, precision="highest") if form == "gemm" else y
        np.testing.assert_allclose(outs[0], base, rtol=1e-5, atol=1e-5)
    assert not np.allclose(outs[1], outs[2])   # the swapped slots really read other rows


def test_layer_out_of_range_is_refused():
    stacked, _ = layered(random_weights(np.random.default_rng(24), UP_TO_64), 0)
    bad = LoraWeights(**{**stacked.__dict__, "layer": 3})
    with pytest.raises(ValueError, match=r"layer=3 is not in \[0, 3\)"):
        lora_shrink(jnp.ones((2, D)), bad, LoraBatch(token_slots=jnp.zeros(2, jnp.int32)))


def test_expand_checks_y_width():
    weights = random_weights(np.random.default_rng(15), MIXED)
    with pytest.raises(ValueError, match=r"y has 100 columns but the modules' outputs add up "
                                         r"to 128 \(\(64, 32, 32\)\)"):
        lora_expand(jnp.ones((4, 100)), jnp.zeros((1, 3, 4, 128)), weights,
                    LoraBatch(token_slots=jnp.zeros(4, jnp.int32)))


# Every configuration the model and the benchmark use, lowered for CUDA on the CPU: Triton's
# rules (power-of-two tiles, dot operands >= 16) are not enforced by interpret mode.
LOWERED = [  # (T, D, widths, max_rank, tied/dora vectors, form, blocks)
    (1, 4096, (4096,), 16, False, "tokens", LoraBlocks()),
    (64, 4096, (4096, 1024, 1024), 64, True, "tokens", LoraBlocks()),
    (256, 4096, (11008, 11008), 64, True, "tokens", LoraBlocks()),
    (300, 11008, (4096,), 128, False, "tokens", LoraBlocks(block_r=32, block_k=128)),
    (4096, 4096, (4096,), 64, False, "segments", LoraBlocks(block_t=64, block_r=32)),
    (7, 576, (576, 192, 192), 256, True, "segments", LoraBlocks()),
]


def abstract_weights(dim, widths, max_rank, vectors) -> LoraWeights:
    """A bf16 bank of 32 slots and 32 layers as shapes only (for lowering), read at layer 5,
    tied/DoRA vectors if asked."""
    sds = jax.ShapeDtypeStruct
    L, M, S, P = 32, len(widths), 32, 4096
    table = lambda dt=jnp.int32: sds((L, M, S), dt)  # noqa: E731
    return LoraWeights(
        a=sds((P, dim), jnp.bfloat16), b=tuple(sds((P, n), jnp.bfloat16) for n in widths),
        a_start=table(), b_start=table(), rank=table(), scale=table(jnp.float32),
        u=sds((L, M, S, max_rank), jnp.float32) if vectors else None,
        w=tuple(sds((L, S, n), jnp.float32) for n in widths) if vectors else None,
        g=tuple(sds((L, S, n), jnp.float32) for n in widths) if vectors else None,
        max_rank=max_rank, layer=5)


@pytest.mark.parametrize("case", LOWERED, ids=lambda c: f"T{c[0]}-{c[5]}-r{c[3]}")
def test_lowers_for_cuda(case):
    T, dim, widths, max_rank, vectors, form, blocks = case
    sds = jax.ShapeDtypeStruct
    weights = abstract_weights(dim, widths, max_rank, vectors)
    batch = LoraBatch(token_slots=sds((T,), jnp.int32)) if form == "tokens" else \
        LoraBatch(seg_starts=sds((9,), jnp.int32), seg_slots=sds((8,), jnp.int32))
    fn = jax.jit(lambda x, y, w, b: lora_apply(x, y, w, b, blocks=blocks, interpret=False))
    text = fn.trace(sds((T, dim), jnp.bfloat16), sds((T, sum(widths)), jnp.bfloat16), weights,
                    batch).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("triton") >= 2   # both kernels went through the Triton lowering


@pytest.mark.parametrize("form", ["tokens", "segments"])
def test_shrink_split_over_d_adds_up(form):
    """A wide D cut into many column blocks: the shrink splits it and the expand re-adds."""
    rng = np.random.default_rng(16)
    dim = 256
    weights = random_weights(rng, MIXED, dim=dim)
    x, y = inputs(rng, 5, jnp.float32, dim=dim)
    slots = np.sort(rng.integers(0, len(MIXED), 5))
    batch = LoraBatch(token_slots=jnp.asarray(slots, jnp.int32)) if form == "tokens" \
        else segments_of(list(slots))
    blocks = LoraBlocks(block_k=32, block_t=16)
    assert lora_shrink(x, weights, batch, blocks=blocks).shape[0] > 1   # really split
    check(x, y, weights, batch, jnp.float32, blocks)


def test_inside_shard_map_over_tokens():
    """Tokens split over a mesh, adapters replicated: each device runs the kernels locally."""
    from jax.sharding import PartitionSpec as P
    n = len(jax.devices())
    mesh = jax.make_mesh((n,), ("tokens",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(17)
    weights = random_weights(rng, MIXED)
    T = 8 * n
    x, y = inputs(rng, T, jnp.float32)
    slots = jnp.asarray(rng.integers(0, len(MIXED), T), jnp.int32)

    def local(x, y, slots, weights):
        return lora_apply(x, y, weights, LoraBatch(token_slots=slots))

    sharded = jax.jit(jax.shard_map(
        local, mesh=mesh, in_specs=(P("tokens"), P("tokens"), P("tokens"), P()),
        out_specs=P("tokens"), check_vma=False))   # check_vma off: interpret-mode pallas_call
    ref = lora_apply(x, jnp.array(y), weights, LoraBatch(token_slots=slots), impl="xla")
    assert rel_err(sharded(x, y, slots, weights), ref) < 1e-5


@pytest.mark.parametrize("form", ["tokens", "segments"])
def test_xla_path_holds_no_per_token_adapter_rows(form):
    """The XLA path once gathered each token's adapter rows ([T, R, D] and [T, R, N] per
    module): a long prefill with adapters asked the CPU for hundreds of GB. Its scratch
    memory must stay within a few times its inputs and outputs, whatever T * R."""
    rng = np.random.default_rng(18)
    dim, widths, T = 576, (576, 192, 192), 4096                  # SmolLM2's q/k/v group
    weights = random_weights(rng, [[0, 0, 0], [16, 8, 16], [64, 64, 64]], widths, dim)
    x, y = inputs(rng, T, jnp.float32, widths, dim)
    slots = np.sort(rng.integers(0, 3, T))
    batch = LoraBatch(token_slots=jnp.asarray(slots, jnp.int32)) if form == "tokens" \
        else segments_of(list(slots))
    fn = jax.jit(lambda x, y, w, b: lora_apply(x, y, w, b, impl="xla"))
    temp = fn.lower(x, y, weights, batch).compile().memory_analysis().temp_size_in_bytes
    io = 4 * T * (dim + sum(widths) + len(widths) * 64)           # x, y and v, float32
    assert temp < 2 * io < 4 * T * 64 * dim                        # the old gather of A alone
    small = slice(0, 64)                                          # and it computes the same
    sub = LoraBatch(token_slots=jnp.asarray(slots[small], jnp.int32))
    check(x[small], y[small], weights, sub, jnp.float32, SMALL)


# The fused per-token kernel: shrink and expand in one launch.

FUSED = LoraBlocks(fused_tokens=True, block_n=32, block_k=32)
UP_TO_64 = [[0, 0, 0], [8, 8, 16], [16, 0, 16], [64, 64, 8], [32, 32, 32], [1, 4, 2]]


def check_fused(x, y, weights, slots, dtype, blocks=FUSED):
    batch = LoraBatch(token_slots=jnp.asarray(slots, jnp.int32))
    ref = lora_apply(x, jnp.array(y), weights, batch, impl="xla")
    out = lora_fused_tokens(x, jnp.array(y), weights, batch, blocks=blocks)
    assert rel_err(out, ref) < TOL[dtype]
    base = np.asarray(slots) == 0
    np.testing.assert_array_equal(np.asarray(out)[base], np.asarray(y)[base])
    assert out.shape == y.shape and out.dtype == y.dtype
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("T", [1, 7, 64])
@pytest.mark.parametrize("variant", ["lora", "tied", "dora"])
def test_fused_tokens_mixed_ranks_and_variants(variant, T, dtype):
    rng = np.random.default_rng(200 + T)
    weights = random_weights(rng, UP_TO_64, variant=variant, dtype=dtype)
    x, y = inputs(rng, T, dtype)
    slots = rng.integers(0, len(UP_TO_64), T)
    slots[0] = 3                                   # the widest rank is always in the batch
    check_fused(x, y, weights, slots, dtype)


@pytest.mark.parametrize("programs", [1, 8, 64, 10_000], ids=lambda p: f"programs{p}")
def test_fused_tokens_any_chunking_gives_the_same(programs):
    """Chunks split each module's column blocks (unevenly, some chunks holding none of a
    narrow module's blocks) and recompute the shrink: every split must give one answer."""
    rng = np.random.default_rng(21)
    weights = random_weights(rng, UP_TO_64, widths=(96, 32, 16))
    x, y = inputs(rng, 5, jnp.float32, widths=(96, 32, 16))
    blocks = LoraBlocks(fused_tokens=True, block_n=16, block_k=16, fused_programs=programs)
    check_fused(x, y, weights, [1, 3, 0, 5, 4], jnp.float32, blocks)


def test_apply_takes_the_fused_kernel_only_where_it_fits():
    """lora_apply with fused_tokens: per-token batches of ranks <= POOL_SLACK_ROWS go to the
    fused kernel; segments and wider banks keep the split kernels (same results)."""
    rng = np.random.default_rng(22)
    narrow, wide = random_weights(rng, UP_TO_64), random_weights(rng, MIXED)   # 64, 128
    assert narrow.max_rank <= POOL_SLACK_ROWS < wide.max_rank
    x, y = inputs(rng, 6, jnp.float32)
    slots = [1, 2, 3, 0, 4, 5]
    tokens = LoraBatch(token_slots=jnp.asarray(slots, jnp.int32))
    sds = jax.ShapeDtypeStruct
    for weights, batch, fused in [(narrow, tokens, True), (wide, tokens, False),
                                  (narrow, segments_of(sorted(slots)), False)]:
        fn = jax.jit(lambda x, y, w, b: lora_apply(x, y, w, b, blocks=FUSED))
        ref = lora_apply(x, jnp.array(y), weights, batch, impl="xla")
        np.testing.assert_allclose(fn(x, jnp.array(y), weights, batch), ref, rtol=1e-5,
                                   atol=1e-5)
        jaxpr = str(jax.make_jaxpr(fn)(sds(x.shape, x.dtype), sds(y.shape, y.dtype), weights,
                                       batch))
        assert jaxpr.count("pallas_call") == (1 if fused else 2), (fused, jaxpr.count(
            "pallas_call"))
    with pytest.raises(ValueError, match=r"R=128 rank rows per slot at once; at most 64 "
                                         r"\(max_rank=128\)"):
        lora_fused_tokens(x, jnp.array(y), wide, tokens, blocks=FUSED)


# the base matmul in Pallas with the adapters' term in the same launch (lora_project with
# blocks.gemm)

GEMM = LoraBlocks(gemm=True, gemm_max_tokens=64, gemm_block_t=16, gemm_block_n=32,
                  gemm_block_k=16, gemm_programs=64)


def base_weight(rng, dtype, widths=WIDTHS, dim=D):
    return jnp.asarray(rng.normal(size=(dim, sum(widths))) / np.sqrt(dim), dtype)


def kernels_of(fn, *args) -> list[str]:
    """The Pallas kernels `fn` launches, by function name, in order."""
    def walk(jaxpr, out):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                out.append(eqn.params["jaxpr"].debug_info.func_name)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else [param]:
                    sub = getattr(sub, "jaxpr", sub)        # a closed jaxpr's own
                    if hasattr(sub, "eqns"):
                        walk(sub, out)
        return out
    return walk(jax.make_jaxpr(fn)(*args).jaxpr, [])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("T", [1, 7, 40])
@pytest.mark.parametrize("variant", ["lora", "tied", "dora"])
def test_gemm_project_mixed_ranks_and_variants(variant, T, dtype):
    """Ranks 8-128 and slot 0 in one batch, tiles of 16 tokens (T = 40: three, the last
    padded), D split into parts: the projection with its adapters equals XLA's."""
    rng = np.random.default_rng(300 + T)
    weights = random_weights(rng, MIXED, variant=variant, dtype=dtype)
    x, w = inputs(rng, T, dtype)[0], base_weight(rng, dtype)
    slots = rng.integers(0, len(MIXED), T)
    slots[0] = 4                                   # rank 128 is always in the batch
    batch = LoraBatch(token_slots=jnp.asarray(slots, jnp.int32))
    out = lora_project(x, w, weights, batch, blocks=GEMM)
    with jax.default_matmul_precision("highest"):    # not TF32 on the GPU: the kernel isn't
        ref = lora_project(x, w, weights, batch, impl="xla")
    assert out.shape == (T, sum(WIDTHS)) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    if T > 1 and variant != "dora":
        assert not np.allclose(np.asarray(out, np.float32), np.asarray(x @ w, np.float32),
                               atol=1e-2)           # the adapters' term is really there
    assert kernels_of(lambda x: lora_project(x, w, weights, batch, blocks=GEMM), x) == \
        ["shrink_tokens_kernel", "gemm_tokens_kernel"]


@pytest.mark.parametrize("programs", [1, 16, 10_000], ids=lambda p: f"programs{p}")
def test_gemm_any_split_of_d_gives_the_same(programs):
    """D cut into 1, 2 or 4 float32 parts (the term goes into part 0, DoRA's g scales every
    part): one answer."""
    rng = np.random.default_rng(31)
    weights = random_weights(rng, UP_TO_64, variant="dora")
    x, w = inputs(rng, 9, jnp.float32)[0], base_weight(rng, jnp.float32)
    batch = LoraBatch(token_slots=jnp.asarray([1, 3, 0, 5, 4, 2, 2, 0, 3], jnp.int32))
    blocks = LoraBlocks(gemm=True, gemm_block_n=16, gemm_block_k=16, gemm_programs=programs)
    with jax.default_matmul_precision("highest"):
        ref = lora_project(x, w, weights, batch, impl="xla")
    assert rel_err(lora_project(x, w, weights, batch, blocks=blocks), ref) < TOL[jnp.float32]


def test_gemm_alone_is_the_matmul():
    rng = np.random.default_rng(32)
    x, w = jnp.asarray(rng.normal(size=(5, 96)), jnp.float32), base_weight(rng, jnp.float32,
                                                                           (48, 80), 96)
    out = lora_gemm_tokens(x, w, None, None, None, blocks=GEMM)
    assert rel_err(out, jnp.matmul(x, w, precision="highest")) < TOL[jnp.float32]


def test_project_takes_the_gemm_kernel_only_for_small_token_batches():
    """blocks.gemm: per-token batches of up to gemm_max_tokens tokens; segments and larger
    steps keep XLA's matmul and the split kernels; blocks.gemm off: the split kernels."""
    rng = np.random.default_rng(33)
    weights = random_weights(rng, MIXED)
    w = base_weight(rng, jnp.float32)
    capped = LoraBlocks(gemm=True, gemm_max_tokens=8)
    split = ["shrink_tokens_kernel", "expand_tokens_kernel"]
    for T, batch, blocks, want in [
            (8, None, capped, ["shrink_tokens_kernel", "gemm_tokens_kernel"]),
            (9, None, capped, split),
            (8, None, LoraBlocks(), split),
            (8, segments_of([1, 1, 2, 2, 2, 0, 0, 0]), capped,
             ["shrink_segments_kernel", "expand_segments_kernel"])]:
        batch = batch or LoraBatch(token_slots=jnp.ones(T, jnp.int32))
        x = jnp.ones((T, D), jnp.float32)
        assert kernels_of(lambda x: lora_project(x, w, weights, batch, blocks=blocks), x) \
            == want, (T, blocks)


def test_the_model_takes_the_gemm_path_only_for_its_gemm_groups():
    """LoraContext.project with blocks.gemm: the groups in blocks.gemm_groups get the
    shrink + Pallas matmul; the others XLA's matmul + the split kernels; the same sums."""
    rng = np.random.default_rng(34)
    weights = random_weights(rng, MIXED)
    w, x = base_weight(rng, jnp.float32), jnp.asarray(rng.normal(size=(8, D)), jnp.float32)
    batch = LoraBatch(token_slots=jnp.asarray(rng.integers(0, len(MIXED), 8), jnp.int32))
    lora = LoraContext(SimpleNamespace(weights=lambda layer, group: weights), batch,
                       replace(GEMM, gemm_groups=("qkv",)))
    outs = {}
    for group, want in [("qkv", ["shrink_tokens_kernel", "gemm_tokens_kernel"]),
                        ("o", ["shrink_tokens_kernel", "expand_tokens_kernel"])]:
        fn = lambda x: lora.project(x, w, 0, group, "pallas")  # noqa: E731
        assert kernels_of(fn, x) == want, group
        outs[group] = fn(x)
    np.testing.assert_allclose(outs["qkv"], outs["o"], rtol=2e-5, atol=2e-5)


def test_gemm_refuses_mismatched_shapes():
    rng = np.random.default_rng(34)
    weights = random_weights(rng, MIXED)
    batch = LoraBatch(token_slots=jnp.zeros(4, jnp.int32))
    x = jnp.ones((4, D), jnp.float32)
    with pytest.raises(ValueError, match=r"x has 64 features but w is \(32, 128\)"):
        lora_gemm_tokens(x, jnp.ones((32, 128)), None, weights, batch)
    with pytest.raises(ValueError, match=r"w has 96 columns but the modules' outputs add up "
                                         r"to 128"):
        lora_gemm_tokens(x, jnp.ones((D, 96)), jnp.zeros((1, 3, 4, 128)), weights, batch)
    with pytest.raises(ValueError, match=r"v must be the shrink's \[KS, M=3, T=4, R\] partial "
                                         r"sums, got None"):
        lora_gemm_tokens(x, jnp.ones((D, 128)), None, weights, batch)


# (kernel, T, D, widths, max_rank, tied/dora vectors): llama2-7b's four groups, llama3-8b's
# q/k/v, SmolLM2's, through the one-launch kernels (fused: shrink + expand; gemm: the
# shrink, then the matmul with the term), lowered for CUDA as that many Triton kernels
TOKENS_LOWERED = [
    ("fused", 1, 4096, (4096, 4096, 4096), 16, False),
    ("fused", 32, 4096, (4096,), 16, True),
    ("fused", 64, 4096, (11008, 11008), 32, True),
    ("fused", 256, 11008, (4096,), 16, False),
    ("fused", 528, 4096, (4096, 1024, 1024), 64, True),
    ("fused", 7, 576, (576, 192, 192), 64, True),
    ("gemm", 1, 4096, (4096, 4096, 4096), 16, False),
    ("gemm", 32, 4096, (4096,), 16, True),
    ("gemm", 32, 4096, (11008, 11008), 64, True),
    ("gemm", 64, 11008, (4096,), 16, False),
    ("gemm", 48, 4096, (4096, 1024, 1024), 256, True),
    ("gemm", 7, 576, (576, 192, 192), 64, True),
]


@pytest.mark.parametrize("case", TOKENS_LOWERED,
                         ids=lambda c: f"{c[0]}-T{c[1]}-D{c[2]}-r{c[4]}")
def test_lowers_for_cuda_in_one_launch(case):
    kernel, T, dim, widths, max_rank, vectors = case
    sds = jax.ShapeDtypeStruct
    weights = abstract_weights(dim, widths, max_rank, vectors)
    if kernel == "fused":   # second operand: the base output y, or the base weight w
        fn = lambda x, y, wts, b: lora_apply(  # noqa: E731
            x, y, wts, b, blocks=LoraBlocks(fused_tokens=True), interpret=False)
        second = sds((T, sum(widths)), jnp.bfloat16)
    else:
        fn = lambda x, w, wts, b: lora_project(  # noqa: E731
            x, w, wts, b, blocks=LoraBlocks(gemm=True, gemm_max_tokens=64), interpret=False)
        second = sds((dim, sum(widths)), jnp.bfloat16)
    text = jax.jit(fn).trace(sds((T, dim), jnp.bfloat16), second, weights, LoraBatch(
        token_slots=sds((T,), jnp.int32))).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == {"fused": 1, "gemm": 2}[kernel]
