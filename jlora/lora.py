"""Packing adapters into the row pools the LoRA kernels read (`pallas_kernels.lora`).

`pack_lora_weights` takes, per slot, each module's A [r, D] and B [N, r] in PEFT's layout
(plus optional Tied-LoRA u, w and DoRA g) and lays them out as one `LoraWeights`: A rows in
one pool, B rows in one pool per module, with start/rank/scale tables (of one layer). Slot 0
stays empty (the base model). Ranks may differ per slot and per module. This module does not
load files or manage a live bank; it builds one group's weights in one go.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from pallas_kernels.lora import POOL_SLACK_ROWS, LoraWeights


@dataclass
class SlotAdapter:
    """One slot's adapter on the M modules of a group; None where a module has none."""

    a: Sequence[np.ndarray | None]               # per module [r_m, D] (PEFT lora_A)
    b: Sequence[np.ndarray | None]               # per module [N_m, r_m] (PEFT lora_B)
    scale: Sequence[float]
    u: Sequence[np.ndarray | None] | None = None  # per module [r_m]
    w: Sequence[np.ndarray | None] | None = None  # per module [N_m]
    g: Sequence[np.ndarray | None] | None = None  # per module [N_m]
    extra: dict = field(default_factory=dict)


def pack_lora_weights(slots: Sequence[SlotAdapter | None], dim: int, widths: Sequence[int],
                      max_rank: int, dtype=jnp.bfloat16) -> LoraWeights:
    """Row pools and tables for len(slots) slots; slots[0] must be None (the base model)."""
    if slots and slots[0] is not None:
        raise ValueError("slot 0 is the base model and holds no adapter")
    M, S = len(widths), len(slots)
    a_start, b_start = np.zeros((M, S), np.int32), np.zeros((M, S), np.int32)
    rank, scale = np.zeros((M, S), np.int32), np.zeros((M, S), np.float32)
    a_rows: list[np.ndarray] = []
    b_rows: list[list[np.ndarray]] = [[] for _ in range(M)]
    n_a, n_b = 0, [0] * M
    for s, ad in enumerate(slots):
        if ad is None:
            continue
        for m in range(M):
            if ad.a[m] is None:
                continue
            r = ad.a[m].shape[0]
            if ad.a[m].shape != (r, dim) or ad.b[m].shape != (widths[m], r):
                raise ValueError(f"slot {s} module {m}: A {ad.a[m].shape} and B "
                                 f"{ad.b[m].shape} do not fit D={dim}, N={widths[m]}")
            if r > max_rank:
                raise ValueError(f"slot {s} module {m}: rank {r} exceeds max_rank {max_rank}")
            a_start[m, s], b_start[m, s], rank[m, s] = n_a, n_b[m], r
            scale[m, s] = ad.scale[m]
            a_rows.append(np.asarray(ad.a[m], np.float32))
            b_rows[m].append(np.asarray(ad.b[m], np.float32).T)
            n_a += r
            n_b[m] += r
    slack = lambda n: np.zeros((POOL_SLACK_ROWS, n), np.float32)  # noqa: E731
    a_pool = np.concatenate(a_rows + [slack(dim)])
    b_pools = tuple(jnp.asarray(np.concatenate(rows + [slack(n)]), dtype)
                    for rows, n in zip(b_rows, widths))

    def vectors(name, length):
        if all(ad is None or getattr(ad, name) is None for ad in slots):
            return None
        fill = 0.0 if name == "u" else 1.0
        out = [np.full((S, length(m)), fill, np.float32) for m in range(M)]
        for s, ad in enumerate(slots):
            for m in range(M):
                vec = None if ad is None or getattr(ad, name) is None else getattr(ad, name)[m]
                if vec is not None:
                    out[m][s, :len(vec)] = vec
        return out

    u = vectors("u", lambda m: max_rank)
    w, g = vectors("w", lambda m: widths[m]), vectors("g", lambda m: widths[m])
    if u is not None:  # modules of slots without a u get ones over their rank
        for s, ad in enumerate(slots):
            for m in range(M):
                if ad is not None and ad.a[m] is not None and (ad.u is None or ad.u[m] is None):
                    u[m][s, :rank[m, s]] = 1.0
    one = lambda x: jnp.asarray(x)[None]   # tables of one layer  # noqa: E731
    return LoraWeights(
        a=jnp.asarray(a_pool, dtype), b=b_pools, a_start=one(a_start), b_start=one(b_start),
        rank=one(rank), scale=one(scale), u=None if u is None else one(np.stack(u)),
        w=None if w is None else tuple(one(x) for x in w),
        g=None if g is None else tuple(one(x) for x in g), max_rank=max_rank)
