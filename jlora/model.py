"""The Llama-family forward pass as pure functions over a params pytree.

Params hold weights as [in, out], so a projection is `x @ w`:
    embed [V, D], final_norm [D], lm_head [D, V] (absent when the embeddings are tied), and
    layers: a list of L dicts, one per layer, with
        attn_norm [D], wqkv [D, (H+2G)*E] (q, k and v side by side), bqkv [(H+2G)*E] (Qwen2
        only), wo [H*E, D], mlp_norm [D], w_gate_up [D, 2F] (gate then up), w_down [F, D].
Checkpoints keep q, k, v, gate and up apart (`layer_shapes` names them); `pack_layer` joins
them, so that a decode step runs four weight matmuls per layer instead of seven: each one
streams more bytes per launch, which is what a memory-bound step is made of. For tensor
parallelism over cfg.tp shards the fused columns are grouped by shard, [q_0 k_0 v_0 | q_1 k_1
v_1 | ...] (shard i holding heads i*H/tp..), so that an even split of the columns gives each
device its own heads (`fused_index` says where a module's columns are).
Layers stay separate arrays rather than one stacked array under `lax.scan`: XLA copied each
stacked layer's slice before its matmul, a 3.3x slower decode step (REFERENCE.md §3).

The KV cache is an explicit value passed in and returned (donate it under jit). Every token
carries its absolute position; a position equal to the cache length marks a padding token,
whose keys and values are dropped instead of written. A token attends to every cached
position at or before its own, so prefill, chunked prefill and decode are one function.

This module does not sample, tokenize, batch requests or read files.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import ModelConfig
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.lora import LoraBatch, LoraBlocks, lora_project
from pallas_kernels.rope import apply_rope

Params = dict


class KVCache(NamedTuple):
    """Per-layer keys and values, each [B, G, S, E]."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def length(self) -> int:
        return self.k[0].shape[2]


class LoraContext(NamedTuple):
    """Adapters for one forward: the bank's arrays (`jlora.bank.BankArrays`) and which slot
    each of the B*T flattened tokens uses. Any object with this `project` can stand in (the
    training modules do, with one dense adapter)."""

    bank: object
    batch: LoraBatch
    blocks: LoraBlocks = LoraBlocks()   # the Pallas kernels' tiling and launch choices

    def project(self, x: jax.Array, w: jax.Array, layer: int, group: str, impl: str):
        """x [T, in] @ w of projection group `group` at `layer`, plus the adapters' term
        (with `blocks.gemm`, for the groups in `blocks.gemm_groups`, a Pallas matmul
        computes both in one launch)."""
        blocks = self.blocks
        if blocks.gemm and group not in blocks.gemm_groups:
            blocks = dataclasses.replace(blocks, gemm=False)
        return lora_project(x, w, self.bank.weights(layer, group), self.batch, impl=impl,
                            blocks=blocks)


def project(x: jax.Array, w: jax.Array, lora: LoraContext | None, layer: int, group: str,
            impl: str) -> jax.Array:
    """x [B, T, in] @ w [in, out], plus every token's adapter on this projection group."""
    if lora is None:
        return x @ w
    B, T, _ = x.shape
    return lora.project(x.reshape(B * T, -1), w, layer, group, impl).reshape(B, T, -1)


def rows_as_segments(row_slots: jax.Array, T: int) -> LoraBatch:
    """The LoRA batch of a [B, T] token block whose row b uses slot row_slots[b]."""
    B = row_slots.shape[0]
    return LoraBatch(seg_starts=jnp.arange(B + 1, dtype=jnp.int32) * T,
                     seg_slots=row_slots.astype(jnp.int32))


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype) -> KVCache:
    shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)  # [B, G, S, E]
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))  # noqa: E731
    return KVCache(zeros(), zeros())


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of each per-layer tensor as checkpoints store them ([in, out] here)."""
    D, E, H, G, F = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim
    shapes = dict(attn_norm=(D,), wq=(D, H * E), wk=(D, G * E), wv=(D, G * E), wo=(H * E, D),
                  mlp_norm=(D,), w_gate=(D, F), w_up=(D, F), w_down=(F, D))
    if cfg.qkv_bias:
        shapes.update(bq=(H * E,), bk=(G * E,), bv=(G * E,))
    return shapes


def pack_layer(t: dict, concat=np.concatenate, tp: int = 1) -> dict:
    """One layer's params from its separate checkpoint tensors (see the module docstring)."""
    def fuse(names):  # columns grouped by shard: [a_0 b_0 | a_1 b_1 | ...]
        w = [t[n].shape[-1] // tp for n in names]
        return concat([t[n][..., i * w[j]:(i + 1) * w[j]] for i in range(tp)
                       for j, n in enumerate(names)], axis=-1)
    layer = dict(attn_norm=t["attn_norm"], wqkv=fuse(["wq", "wk", "wv"]), wo=t["wo"],
                 mlp_norm=t["mlp_norm"], w_gate_up=fuse(["w_gate", "w_up"]), w_down=t["w_down"])
    if "bq" in t:
        layer["bqkv"] = fuse(["bq", "bk", "bv"])
    return layer


def fused_index(cfg: ModelConfig, target: str) -> tuple[str, np.ndarray]:
    """Where a checkpoint module lives in the fused params: (param name, its columns in order)."""
    D, E, H, G, F, n = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.tp
    if target in ("o", "down"):
        return {"o": "wo", "down": "w_down"}[target], np.arange(D)
    name, widths, m = {"q": ("wqkv", (H * E, G * E, G * E), 0),
                       "k": ("wqkv", (H * E, G * E, G * E), 1),
                       "v": ("wqkv", (H * E, G * E, G * E), 2),
                       "gate": ("w_gate_up", (F, F), 0), "up": ("w_gate_up", (F, F), 1)}[target]
    local = [w // n for w in widths]                    # each module's columns per shard
    start = np.arange(n) * sum(local) + sum(local[:m])   # where module m starts in shard i
    return name, (start[:, None] + np.arange(local[m])).reshape(-1)


def split_fused(y: jax.Array, widths: tuple[int, ...], tp: int) -> list[jax.Array]:
    """The modules' outputs [..., w_m] of a fused projection's output [..., sum(w)]."""
    lead = y.shape[:-1]
    y = y.reshape(*lead, tp, -1)                                        # [..., tp, cols/tp]
    cuts = np.cumsum([w // tp for w in widths])[:-1]
    return [part.reshape(*lead, -1) for part in jnp.split(y, cuts, axis=-1)]


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.bfloat16) -> Params:
    """Random weights (normal, std 0.02; norms at 1) for shape presets and benchmarks."""
    keys = iter(jax.random.split(key, len(layer_shapes(cfg)) * cfg.n_layers + 2))
    normal = lambda shape: (0.02 * jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
                            ).astype(dtype)
    layers = [pack_layer({name: jnp.ones(shape, dtype) if name.endswith("norm") else
                          normal(shape) for name, shape in layer_shapes(cfg).items()},
                         concat=jnp.concatenate, tp=cfg.tp)
              for _ in range(cfg.n_layers)]
    params = dict(embed=normal((cfg.vocab_size, cfg.dim)), layers=layers,
                  final_norm=jnp.ones((cfg.dim,), dtype))
    if not cfg.tie_embeddings:
        params["lm_head"] = normal((cfg.dim, cfg.vocab_size))
    return params


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [E/2] (float32), with Llama 3 or linear scaling applied."""
    E = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, E, 2, dtype=np.float64) / E)
    if cfg.rope_freq_factors is not None:
        inv_freq = inv_freq / np.asarray(cfg.rope_freq_factors, np.float64)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq.astype(np.float32)
    if rs.kind == "linear":
        return (inv_freq / rs.factor).astype(np.float32)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    wavelen = 2 * np.pi / inv_freq
    low_wavelen = rs.original_max_position / rs.low_freq_factor
    high_wavelen = rs.original_max_position / rs.high_freq_factor
    scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = ((rs.original_max_position / wavelen - rs.low_freq_factor)
              / (rs.high_freq_factor - rs.low_freq_factor))
    blended = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def write_kv(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """cache [B, G, S, E] with new [B, T, G, E] written at positions [B, T]; position S drops."""
    rows = jnp.arange(cache.shape[0])[:, None]                          # [B, 1]
    return cache.at[rows, :, positions, :].set(new, mode="drop")


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     positions: jax.Array) -> jax.Array:
    """Causal grouped-query attention of q [B, T, H, E] over the cache k, v [B, G, S, E]."""
    visible = jnp.arange(k.shape[2])[None, None, :] <= positions[:, :, None]  # [B, T, S]
    return masked_attention(q, k, v, visible)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     visible: jax.Array) -> jax.Array:
    """Grouped-query attention of q [B, T, H, E] over k, v [B, G, S, E], query t seeing key s
    where visible [B, T, S] (every query must see at least one key). Returns [B, T, H*E]."""
    B, T, H, E = q.shape
    G = k.shape[1]
    q = q.reshape(B, T, G, H // G, E) * (E ** -0.5)                     # [B, T, G, R, E]
    scores = jnp.einsum("btgre,bgse->bgrts", q, k,
                        preferred_element_type=jnp.float32)            # [B, G, R, T, S]
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrts,bgse->btgre", probs, v)                     # [B, T, G, R, E]
    return out.reshape(B, T, H * E)


class NewKV(NamedTuple):
    """One layer's new keys and values as the q/k/v projection left them, for `attend` to
    write into its cache: qkv [B, T, (H + 2G) * E] (columns as `fused_index` lays them out,
    keys not yet rotated), the tokens' positions [B, T] and RoPE's inverse frequencies [E/2].
    `split()` gives them as arrays; the paged cache's Pallas path instead hands qkv to the
    page write kernel, which reads k and v from it and rotates k as it writes, so neither
    is materialized on its own."""

    qkv: jax.Array
    positions: jax.Array
    inv_freq: jax.Array
    cfg: ModelConfig

    def split(self) -> tuple[jax.Array, jax.Array]:
        """k (rotated) and v, [B, T, G, E] each."""
        B, T, _ = self.qkv.shape
        H, G, E = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        _, k, v = split_fused(self.qkv, (H * E, G * E, G * E), self.cfg.tp)
        k = apply_rope(k.reshape(B, T, G, E), self.positions, self.inv_freq)
        return k, v.reshape(B, T, G, E)


def attend_dense(q: jax.Array, new: NewKV, kv: tuple, positions: jax.Array,
                 impl: str) -> tuple[jax.Array, tuple]:
    """Write the new keys and values into one layer's dense cache and attend q [B, T, H, E]
    to it."""
    k, v = new.split()
    k_cache, v_cache = kv
    k_cache = write_kv(k_cache, k.astype(k_cache.dtype), positions)
    v_cache = write_kv(v_cache, v.astype(v_cache.dtype), positions)
    if q.shape[1] == 1:  # decode: the kernel reads each sequence's cache once
        out = decode_attention(q[:, 0], k_cache, v_cache, positions[:, 0] + 1, impl=impl)
    else:
        out = causal_attention(q, k_cache, v_cache, positions)
    return out.reshape(*q.shape[:2], -1), (k_cache, v_cache)


def attention(layer: dict, cfg: ModelConfig, x: jax.Array, positions: jax.Array,
              inv_freq: jax.Array, attend, kv: tuple, impl: str,
              lora: LoraContext | None = None, index: int = 0, tp_axis: str | None = None):
    """The attention block. `attend(q, new, kv) -> (out [B, T, H*E], kv)` writes this
    layer's new keys and values (`NewKV`) into its cache `kv` and attends (dense or paged),
    with q already rotated. Inside a shard_map over `tp_axis`, the row-parallel output
    projection's partial sums are added up."""
    B, T, _ = x.shape
    H, G, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    h = rms_norm(x, layer["attn_norm"], cfg.norm_eps)
    qkv = project(h, layer["wqkv"], lora, index, "qkv", impl)          # [B, T, (H+2G)*E]
    if cfg.qkv_bias:
        qkv = qkv + layer["bqkv"]
    q = split_fused(qkv, (H * E, G * E, G * E), cfg.tp)[0]
    q = apply_rope(q.reshape(B, T, H, E), positions, inv_freq)
    out, kv = attend(q, NewKV(qkv, positions, inv_freq, cfg), kv)      # [B, T, H*E]
    out = project(out, layer["wo"], lora, index, "o", impl)
    return x + _sum_shards(out, tp_axis), kv


def _sum_shards(y: jax.Array, tp_axis: str | None) -> jax.Array:
    """Add up a row-parallel projection's per-shard partial sums (LoRA terms included: they
    are linear in the shard's inputs, so they ride on the same all-reduce)."""
    return y if tp_axis is None else jax.lax.psum(y, tp_axis)


def mlp(layer: dict, cfg: ModelConfig, x: jax.Array, impl: str = "xla",
        lora: LoraContext | None = None, index: int = 0,
        tp_axis: str | None = None) -> jax.Array:
    h = rms_norm(x, layer["mlp_norm"], cfg.norm_eps)
    gate_up = project(h, layer["w_gate_up"], lora, index, "gate_up", impl)
    gate, up = split_fused(gate_up, (cfg.ffn_dim, cfg.ffn_dim), cfg.tp)  # [B, T, F] each
    down = project(jax.nn.silu(gate) * up, layer["w_down"], lora, index, "down", impl)
    return x + _sum_shards(down, tp_axis)


def forward(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
            cache: KVCache, impl: str = "xla",
            lora: LoraContext | None = None) -> tuple[jax.Array, KVCache]:
    """Run tokens [B, T] at positions [B, T] through all layers over a dense cache.

    `impl` picks the kernels: "pallas" (GPU) or "xla" (the CPU path). `lora` adds each
    token's adapter to every projection (None: the base model alone).

    Returns the final-normed hidden states [B, T, D] and the cache with the tokens' K/V added.
    """
    attend = lambda q, new, kv: attend_dense(q, new, kv, positions, impl)  # noqa: E731
    h, (ks, vs) = run_layers(params, cfg, tokens, positions, attend,
                             (cache.k, cache.v), impl, lora)
    return h, KVCache(ks, vs)


def run_layers(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
               attend, caches: tuple, impl: str, lora: LoraContext | None,
               tp_axis: str | None = None, remat: bool = False):
    """Embedding, every layer (with `attend` over caches = (K per layer, V per layer)), final
    norm. Returns hidden states [B, T, D] and the updated caches. Inside a shard_map over
    `tp_axis`, cfg and the weights are one shard's (serving/sharding.py). remat (training):
    keep only each layer's input for the backward pass and recompute the rest there
    (gradient checkpointing: activation memory of one layer, not all, for one more forward)."""
    inv_freq = jnp.asarray(rope_frequencies(cfg))
    x = params["embed"][tokens]                                         # [B, T, D]

    def block(x, layer, kv, i):
        x, kv = attention(layer, cfg, x, positions, inv_freq, attend, kv, impl, lora, i,
                          tp_axis)
        return mlp(layer, cfg, x, impl, lora, i, tp_axis), kv
    if remat:
        block = jax.checkpoint(block, static_argnums=3)
    ks, vs = [], []
    for i, (layer, k_cache, v_cache) in enumerate(zip(params["layers"], *caches)):
        x, (k_cache, v_cache) = block(x, layer, (k_cache, v_cache), i)
        ks.append(k_cache)
        vs.append(v_cache)
    return rms_norm(x, params["final_norm"], cfg.norm_eps), (tuple(ks), tuple(vs))


def logits(params: Params, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    """Float32 logits [..., V] of final hidden states [..., D]."""
    if cfg.tie_embeddings:
        return jnp.einsum("...d,vd->...v", h, params["embed"],
                          preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", h, params["lm_head"], preferred_element_type=jnp.float32)


def full_logits(params: Params, cfg: ModelConfig, tokens: jax.Array, bank=None,
                row_slots: jax.Array | None = None, impl: str = "xla") -> jax.Array:
    """Logits [B, T, V] of whole sequences from position 0 (a fresh cache): the test oracle
    path. With a bank (`BankArrays`), row b uses adapter slot row_slots[b]."""
    B, T = tokens.shape
    cache = init_cache(cfg, B, T, params["embed"].dtype)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    lora = None if bank is None else LoraContext(bank, rows_as_segments(row_slots, T))
    h, _ = forward(params, cfg, tokens, positions, cache, impl, lora)
    return logits(params, cfg, h)
