"""One engine step on the device: the step's batch, packed for one copy, and the program.

`make_batch` turns the scheduler's `Plan` into a `StepBatch` of numpy arrays (the only
host-to-device conversion of a step), `pack` flattens it into one int32 buffer, and
`engine_step` is the jitted program that runs every scheduled token through all layers (LoRA
kernels, paged attention) and samples. The engine (serving/engine.py) compiles it per shape
bucket and calls it; this module holds no state.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jlora.config import ModelConfig
from jlora.model import LoraContext, Params, logits
from jlora.paged import PagedBatch, PagedKV, forward_paged
from jlora.sampling import SamplingArrays, sample
from pallas_kernels.lora import LoraBatch, LoraBlocks
from serving import sharding
from serving.kv_cache import PageAllocator
from serving.request import Request
from serving.scheduler import Plan, SchedulerConfig


class StepBatch(NamedTuple):
    """Everything a step reads besides weights and caches (see `make_batch`).

    decode_rows [Bd]: the row of last_tokens each decode reads (max_seqs: padding);
    prefill_tokens [Np]; paged: where tokens go and what they attend to; lora_slots
    [Bd + Np]; sample_index [Ns]: which of the step's tokens are sampled (Ns = Bd + Np/Q);
    sample_rows [Ns]: the row each sampled token is stored to (max_seqs: none).
    """

    decode_rows: jax.Array
    prefill_tokens: jax.Array
    paged: PagedBatch
    lora_slots: jax.Array
    sample_index: jax.Array
    sample_rows: jax.Array
    sampling: SamplingArrays


def pack(batch: StepBatch) -> tuple[np.ndarray, tuple]:
    """The batch as one int32 buffer, so a step costs one host-to-device copy (a copy per
    array cost milliseconds per step on the GPU), and its static layout for `unpack`."""
    leaves, treedef = jax.tree.flatten(batch)
    layout = tuple((x.shape, x.dtype.str) for x in leaves)   # all 4-byte types
    flat = np.concatenate([np.ascontiguousarray(x).view(np.int32).reshape(-1) for x in leaves])
    return flat, (treedef, layout)


def unpack(flat: jax.Array, layout: tuple) -> StepBatch:
    treedef, shapes = layout
    leaves, start = [], 0
    for shape, dtype in shapes:
        x = flat[start:start + math.prod(shape)]
        if np.dtype(dtype) != np.int32:
            x = jax.lax.bitcast_convert_type(x, np.dtype(dtype))
        leaves.append(x.reshape(shape))
        start += math.prod(shape)
    return jax.tree.unflatten(treedef, leaves)


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "mesh", "layout", "mode",
                                            "lora_blocks"),
                   donate_argnames=("kv", "last_tokens"))
def engine_step(params: Params, bank, kv: PagedKV, last_tokens: jax.Array, packed: jax.Array,
                *, cfg: ModelConfig, impl: str, mesh: Mesh | None = None, layout: tuple,
                mode: str = "sample", lora_blocks: LoraBlocks = LoraBlocks()):
    """One step over all scheduled tokens; returns (kv, last_tokens, out) with out [2, Ns]:
    the sampled tokens and their logprobs' float32 bits (one array: one copy back).
    `packed` is the step's `StepBatch` as `pack` made it. With a mesh, the layers run per
    shard (serving/sharding.py). `mode` is the sampler's ("greedy" when the host knows every
    row is greedy); the step has no data-dependent branch, so dispatch never waits on it."""
    batch = unpack(packed, layout)
    tokens = jnp.concatenate([last_tokens[batch.decode_rows], batch.prefill_tokens])  # [T]
    n = 1 if mesh is None else mesh.shape[sharding.AXIS]
    local_cfg, tp_axis = sharding.local_config(cfg, n), None if mesh is None else sharding.AXIS

    def layers(params, bank, kv, tokens, paged, lora_slots):
        lora = None if bank is None else LoraContext(bank, LoraBatch(token_slots=lora_slots),
                                                     lora_blocks)
        return forward_paged(params, local_cfg, tokens, kv, paged, impl, lora, tp_axis)

    args = (params, bank, kv, tokens, batch.paged, batch.lora_slots)
    h, kv = layers(*args) if mesh is None else sharding.shard_layers(layers, mesh, *args)
    sampled, logprobs = sample(logits(params, cfg, h[batch.sample_index]), batch.sampling, mode)
    last_tokens = last_tokens.at[batch.sample_rows].set(sampled, mode="drop")
    return kv, last_tokens, jnp.stack([sampled, jax.lax.bitcast_convert_type(logprobs,
                                                                             jnp.int32)])


def make_batch(plan: Plan, sched: SchedulerConfig,
               pages: PageAllocator) -> tuple[StepBatch, list[Request | None]]:
    """The step's batch (numpy) and the request each sampled row belongs to."""
    Bd, Np, Q, Z = plan.decode_bucket, plan.prefill_bucket, sched.piece, pages.page_size
    W = pages.pages_for(sched.max_seq_len)
    NQ, pad_slot, pad_row = Np // Q, pages.num_pages * Z, sched.max_seqs
    decode_rows = np.full(Bd, pad_row, np.int32)
    d_pos = np.full(Bd, -1, np.int32)
    d_tables = np.zeros((Bd, W), np.int32)
    p_tokens = np.zeros(Np, np.int32)
    p_pos = np.full(Np, -1, np.int32)
    p_tables = np.zeros((NQ, W), np.int32)
    slots = np.full(Bd + Np, pad_slot, np.int32)
    lora = np.zeros(Bd + Np, np.int32)
    samples: list[Request | None] = [None] * (Bd + NQ)
    sample_index = np.zeros(Bd + NQ, np.int32)

    def place(i, r, pos):  # token i of the step is r's token at positions pos
        table = np.asarray(pages.tables[r], np.int32)
        slots[i] = table[pos // Z] * Z + pos % Z
        lora[i] = r.slot
        return table

    for i, r in enumerate(plan.decodes):
        decode_rows[i], d_pos[i] = r.row, r.computed - 1
        table = place(i, r, r.computed - 1)
        d_tables[i, :len(table)] = table
        samples[i], sample_index[i] = r, i
    t, n_sampled = 0, Bd
    for c in plan.prefills:
        r, n = c.request, c.length
        pos = np.arange(c.start, c.start + n)
        p_tokens[t:t + n] = r.context[c.start:c.start + n]
        p_pos[t:t + n] = pos
        table = place(Bd + t + np.arange(n), r, pos)
        p_tables[t // Q:(t + n - 1) // Q + 1, :len(table)] = table
        if c.last:
            samples[n_sampled], sample_index[n_sampled] = r, Bd + t + n - 1
            n_sampled += 1
        t += -(-n // Q) * Q
    live = [r for r in samples if r is not None]
    counters = [r.num_sampled - 1 for r in live]   # in_flight already counts this token
    sampling = _sampling_arrays(samples, Bd + NQ)
    sampling = sampling._replace(counters=_fill(samples, counters, 0, np.int32))
    rows = _fill(samples, [r.row for r in live], pad_row, np.int32)
    paged = PagedBatch(slots, d_tables, d_pos, p_tables, p_pos.reshape(NQ, Q))
    return StepBatch(decode_rows, p_tokens, paged, lora, sample_index, rows, sampling), samples


def _fill(samples, values, pad, dtype) -> np.ndarray:
    out = np.full(len(samples), pad, dtype)
    out[[i for i, r in enumerate(samples) if r is not None]] = values
    return out


def _sampling_arrays(samples, n) -> SamplingArrays:
    live = [r for r in samples if r is not None]
    key_rows = np.zeros((n, 2), np.uint32)
    for i, r in enumerate(samples):
        if r is not None:
            key_rows[i] = r.key
    p = [r.params for r in live]
    return SamplingArrays(
        temperature=_fill(samples, [x.temperature for x in p], 0.0, np.float32),
        top_p=_fill(samples, [x.top_p for x in p], 1.0, np.float32),
        top_k=_fill(samples, [x.top_k for x in p], 0, np.int32),
        keys=key_rows, counters=np.zeros(n, np.int32))
