"""The model's forward over a paged KV cache: what one serving-engine step computes.

A step runs a flat list of T tokens from many sequences: first Bd decode tokens (one per
running sequence), then prefill chunks cut into NQ pieces of Q tokens (a piece belongs to
one sequence; a chunk's last piece is padded). Every projection (and its LoRA) runs once
over all T tokens, so the weights are read once per step; attention then runs the paged
kernel twice, once over the decode tokens and once over the prefill pieces, both reading
K/V through page tables.

Cache position p of a sequence lives in page table[p // Z], offset p % Z; a token's K/V goes
to flat slot page * Z + offset of its layer's [G, P * Z, E] view (a slot >= P * Z is a
padding token's, dropped); with impl="pallas" one kernel reads K and V from the q/k/v
projection's output, rotates K and writes both in place (`pallas_kernels.page_write`). The
host side (page allocation) is `serving.kv_cache`; this module only computes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jlora.config import ModelConfig
from jlora.model import LoraContext, NewKV, Params, run_layers
from pallas_kernels.page_write import write_pages
from pallas_kernels.paged_attention import paged_attention


class PagedKV(NamedTuple):
    """Per-layer keys and values, each [G, P, Z, E]."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[1]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]


class PagedBatch(NamedTuple):
    """Where each of a step's T = Bd + NQ * Q tokens writes its K/V and what it attends to.

    write_slots        [T] int32   page * Z + offset of each token; P * Z for padding
    decode_tables      [Bd, W]     page table of each decode token's sequence
    decode_positions   [Bd]        position of each decode token; -1 for a padding row
    prefill_tables     [NQ, W]     page table of each prefill piece's sequence
    prefill_positions  [NQ, Q]     position of each prefill token; -1 for padding

    Example (Z=4, Q=2): one decode at position 5 of a sequence with pages [3, 7], and a
    3-token prompt on pages [2]: write_slots [7*4+1, 2*4+0, 2*4+1, 2*4+2, P*4],
    decode_positions [5], prefill_positions [[0, 1], [2, -1]].
    """

    write_slots: jax.Array
    decode_tables: jax.Array
    decode_positions: jax.Array
    prefill_tables: jax.Array
    prefill_positions: jax.Array

    @property
    def positions(self) -> jax.Array:
        """[T] positions of all tokens (decodes first)."""
        return jnp.concatenate([self.decode_positions, self.prefill_positions.reshape(-1)])


def init_pages(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> PagedKV:
    shape = (cfg.n_kv_heads, num_pages, page_size, cfg.head_dim)     # [G, P, Z, E]
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))  # noqa: E731
    return PagedKV(zeros(), zeros())


def attend_paged(q: jax.Array, new: NewKV, kv: tuple, batch: PagedBatch,
                 impl: str) -> tuple[jax.Array, tuple]:
    """Write the step's new keys and values (`NewKV`, rotated as they are written) into one
    layer's pages and attend q [1, T, H, E] through them."""
    if new.cfg.tp != 1:
        raise ValueError(f"the paged step runs on one shard's weights (cfg.tp=1), got "
                         f"tp={new.cfg.tp}: run it inside serving.sharding's shard_map")
    k_pages, v_pages = write_pages(kv[0], kv[1], new.qkv[0], batch.write_slots,
                                   new.positions[0], new.inv_freq, n_heads=new.cfg.n_heads,
                                   impl=impl)
    _, T, H, E = q.shape
    Bd = batch.decode_positions.shape[0]
    NQ, Q = batch.prefill_positions.shape
    outs = []
    if Bd:
        outs.append(paged_attention(q[0, :Bd, None], k_pages, v_pages, batch.decode_tables,
                                    batch.decode_positions[:, None], impl=impl))  # [Bd,1,H,E]
    if NQ:
        pieces = q[0, Bd:].reshape(NQ, Q, H, E)
        outs.append(paged_attention(pieces, k_pages, v_pages, batch.prefill_tables,
                                    batch.prefill_positions, impl=impl))          # [NQ,Q,H,E]
    out = jnp.concatenate([o.reshape(-1, H * E) for o in outs])                  # [T, H*E]
    return out[None], (k_pages, v_pages)


def forward_paged(params: Params, cfg: ModelConfig, tokens: jax.Array, kv: PagedKV,
                  batch: PagedBatch, impl: str = "xla", lora: LoraContext | None = None,
                  tp_axis: str | None = None) -> tuple[jax.Array, PagedKV]:
    """Run a step's tokens [T] through all layers; returns hidden states [T, D] and the pages
    with the tokens' K/V written. `lora.batch` gives each of the T tokens its slot. With
    tp_axis, this runs inside a shard_map on one shard's weights (serving/sharding.py)."""
    positions = jnp.maximum(batch.positions, 0)[None]                   # [1, T]
    attend = lambda q, new, c: attend_paged(q, new, c, batch, impl)     # noqa: E731
    h, (ks, vs) = run_layers(params, cfg, tokens[None], positions, attend, (kv.k, kv.v),
                             impl, lora, tp_axis)
    return h[0], PagedKV(ks, vs)
