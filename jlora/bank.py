"""The adapter bank: a fixed set of device slots holding adapters in the kernels' row pools.

Per projection group (qkv, o, gate_up, down) the bank owns one A pool and one B pool per
module (`pallas_kernels.lora.LoraWeights` layout), shared by all layers, plus per-layer
tables (start rows, ranks, scales, and the Tied-LoRA / DoRA vectors). Slot s owns a fixed
range of pool rows, max_rank rows per module and layer, so loading an adapter is an
in-place write of that range and of column s of the tables: shapes never change, so the
jitted step never recompiles. A Tied-LoRA adapter writes its shared A and B once and points
every layer at them; a rank-8 adapter in a bank of max_rank 64 is read and computed at
rank 8. Slot 0 is the base model (rank 0 everywhere). DoRA's g = m / ||W + s BA|| is
computed once, at load, against the base weights.

The bank holds device arrays and the name -> slot map; which adapters to keep resident is
the caller's policy (serving/adapter_cache.py). `load` is one call; the serving engine splits
it in two, `slot_data` (host work and the host-to-device copy, on its loader thread) and
`put` (the in-place write, on its step thread). It does not read files.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jlora.adapters import GROUPS, Adapter, target_shapes
from jlora.config import ModelConfig
from jlora.model import fused_index
from pallas_kernels.lora import POOL_SLACK_ROWS, LoraWeights, v_width

FEATURES = ("tied", "dora")   # optional per-slot vectors: u, w (Tied-LoRA) and g (DoRA)
EMPTY = Adapter(name="", variant="lora", modules={})   # what an unused slot holds


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["pools", "tables"], meta_fields=["max_rank"])
@dataclass(frozen=True)
class BankArrays:
    """Device arrays: pools[group] = (A [Pa, D_in], (B_m [Pb, N_m], ...)); tables[layer][group]
    = dict of a_start, b_start, rank, scale [M, S] and optional u [M, S, R], w, g (M x [S, N])."""

    pools: dict
    tables: list
    max_rank: int

    def weights(self, layer: int, group: str) -> LoraWeights:
        a, b = self.pools[group]
        t = self.tables[layer][group]
        return LoraWeights(a=a, b=b, a_start=t["a_start"], b_start=t["b_start"],
                           rank=t["rank"], scale=t["scale"], u=t.get("u"), w=t.get("w"),
                           g=t.get("g"), max_rank=self.max_rank)


class AdapterBank:
    """Slots 1..n_slots-1 for adapters; `arrays` is what the jitted step takes."""

    def __init__(self, cfg: ModelConfig, n_slots: int, max_rank: int, dtype=jnp.bfloat16,
                 features: tuple[str, ...] = FEATURES):
        if n_slots < 2:
            raise ValueError(f"n_slots={n_slots}: a bank needs slot 0 (the base) and at least "
                             "one adapter slot")
        if not 1 <= max_rank <= 256:
            raise ValueError(f"max_rank={max_rank} must be in [1, 256]")
        unknown = set(features) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown bank features {sorted(unknown)}; known: {FEATURES}")
        self.cfg, self.n_slots, self.max_rank, self.dtype = cfg, n_slots, max_rank, dtype
        self.features = tuple(features)
        self.slots: dict[str, int] = {}          # adapter name -> slot
        self.adapters: dict[int, Adapter] = {}   # slot -> adapter
        shapes = target_shapes(cfg)
        L, S, R = cfg.n_layers, n_slots, max_rank
        Rv = v_width(max_rank)
        pools, tables = {}, [{} for _ in range(L)]
        for group, targets in GROUPS.items():
            M = len(targets)
            d_in = shapes[targets[0]][0]
            widths = [shapes[t][1] for t in targets]
            a = jnp.zeros(((S - 1) * L * M * R + POOL_SLACK_ROWS, d_in), dtype)
            b = tuple(jnp.zeros(((S - 1) * L * R + POOL_SLACK_ROWS, n), dtype) for n in widths)
            pools[group] = (a, b)
            for layer in range(L):
                t = dict(a_start=jnp.zeros((M, S), jnp.int32),
                         b_start=jnp.zeros((M, S), jnp.int32),
                         rank=jnp.zeros((M, S), jnp.int32), scale=jnp.zeros((M, S), jnp.float32))
                if "tied" in self.features:
                    t["u"] = jnp.ones((M, S, Rv), jnp.float32)
                    t["w"] = tuple(jnp.ones((S, n), jnp.float32) for n in widths)
                if "dora" in self.features:
                    t["g"] = tuple(jnp.ones((S, n), jnp.float32) for n in widths)
                tables[layer][group] = t
        self.arrays = BankArrays(pools=pools, tables=tables, max_rank=max_rank)

    # ------------------------------------------------------------------ host bookkeeping
    def slot_of(self, name: str | None) -> int:
        """The slot of a loaded adapter; None or "" is the base model (slot 0)."""
        if not name:
            return 0
        if name not in self.slots:
            raise ValueError(f"adapter {name!r} is not loaded; loaded: "
                           f"{sorted(self.slots) or 'none'}")
        return self.slots[name]

    def free_slot(self) -> int:
        used = set(self.slots.values())
        for s in range(1, self.n_slots):
            if s not in used:
                return s
        raise ValueError(f"all {self.n_slots - 1} adapter slots are in use "
                           f"({sorted(self.slots)}); unload one first")

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.arrays))

    # ------------------------------------------------------------------ loading
    def load(self, adapter: Adapter, params: dict, slot: int | None = None) -> int:
        """Write `adapter` into a slot (a free one unless given); returns the slot.

        params are the base model's (DoRA's scale is computed against them).
        """
        if adapter.name in self.slots and slot is None:
            slot = self.slots[adapter.name]
        slot = self.free_slot() if slot is None else slot
        self.put(adapter, slot, self.slot_data(adapter, params, slot))
        return slot

    def check(self, adapter: Adapter) -> None:
        """Refuse an adapter this bank cannot hold (errors name the adapter and the limit)."""
        adapter.validate(self.cfg, self.max_rank)
        if adapter.variant == "tied" and "tied" not in self.features:
            raise ValueError(f"adapter {adapter.name!r} is Tied-LoRA but this bank was made "
                             f"without the 'tied' feature ({self.features})")
        if adapter.variant == "dora" and "dora" not in self.features:
            raise ValueError(f"adapter {adapter.name!r} is DoRA but this bank was made without "
                             f"the 'dora' feature ({self.features})")

    def put(self, adapter: Adapter, slot: int, data: dict) -> None:
        """Write `slot_data(adapter, params, slot)` into the slot, in place (asynchronously:
        steps dispatched before read the old contents, steps after the new)."""
        if not 1 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} is outside 1..{self.n_slots - 1}")
        self.arrays = _write_slot(self.arrays, jnp.int32(slot), data)
        old = self.adapters.pop(slot, None)
        if old is not None and self.slots.get(old.name) == slot:
            del self.slots[old.name]
        if adapter.name:
            self.slots[adapter.name], self.adapters[slot] = slot, adapter

    def unload(self, name: str) -> None:
        """Free a slot (its rank drops to 0, so nothing reads its rows)."""
        slot = self.slot_of(name)
        self.put(EMPTY, slot, self.slot_data(EMPTY, None, slot))

    def slot_data(self, adapter: Adapter, params, slot: int) -> dict:
        """Device arrays for slot `slot`: its pool row ranges and its table column (built on
        the host, then copied; the step's arrays are not touched)."""
        self.check(adapter)
        cfg, L, R = self.cfg, self.cfg.n_layers, self.max_rank
        shapes = target_shapes(cfg)
        tied = adapter.variant == "tied"
        pools, tables = {}, [{} for _ in range(L)]
        for group, targets in GROUPS.items():
            M = len(targets)
            a_rows = np.zeros((L * M * R, shapes[targets[0]][0]), np.float32)
            b_rows = [np.zeros((L * R, shapes[t][1]), np.float32) for t in targets]
            a_base, b_base = slot_rows(L, M, R, slot, 0, 0)
            for layer in range(L):
                col = {k: np.zeros(M, np.int32) for k in ("a_start", "b_start", "rank")}
                col["scale"] = np.zeros(M, np.float32)
                u = np.ones((M, v_width(R)), np.float32)
                w = [np.ones(shapes[t][1], np.float32) for t in targets]
                g = [np.ones(shapes[t][1], np.float32) for t in targets]
                for m, target in enumerate(targets):
                    mod = adapter.modules.get((layer, target))
                    if mod is None:
                        continue
                    r = mod.rank
                    a_start, b_start = slot_rows(L, M, R, slot, layer, m, tied)
                    a_off, b_off = a_start - a_base, b_start - b_base
                    a_rows[a_off:a_off + r] = mod.a
                    b_rows[m][b_off:b_off + r] = mod.b.T
                    col["a_start"][m], col["b_start"][m] = a_start, b_start
                    col["rank"][m], col["scale"][m] = r, mod.scale
                    if mod.u is not None:
                        u[m, :r] = mod.u
                    if mod.w is not None:
                        w[m] = np.asarray(mod.w, np.float32)
                    if mod.m is not None:
                        g[m] = dora_scale(params, cfg, layer, target, mod)
                t = {k: jnp.asarray(v) for k, v in col.items()}
                if "tied" in self.features:
                    t["u"], t["w"] = jnp.asarray(u), tuple(jnp.asarray(x) for x in w)
                if "dora" in self.features:
                    t["g"] = tuple(jnp.asarray(x) for x in g)
                tables[layer][group] = t
            pools[group] = (jnp.asarray(a_rows, self.dtype), a_base,
                            tuple(jnp.asarray(x, self.dtype) for x in b_rows), b_base)
        return {"pools": pools, "tables": tables}


@functools.partial(jax.jit, donate_argnums=0)
def _write_slot(arrays: BankArrays, slot: jax.Array, data: dict) -> BankArrays:
    """Write one slot's rows and table column in place (same shapes for every slot)."""
    pools = {}
    for group, (a, b) in arrays.pools.items():
        rows_a, a_base, rows_b, b_base = data["pools"][group]
        a = jax.lax.dynamic_update_slice(a, rows_a, (a_base, 0))
        b = tuple(jax.lax.dynamic_update_slice(bm, rb, (b_base, 0)) for bm, rb in zip(b, rows_b))
        pools[group] = (a, b)
    tables = []
    for layer_tables, layer_data in zip(arrays.tables, data["tables"]):
        new = {}
        for group, t in layer_tables.items():
            d = layer_data[group]
            n = {k: t[k].at[:, slot].set(d[k]) for k in ("a_start", "b_start", "rank", "scale")}
            if "u" in t:
                n["u"] = t["u"].at[:, slot].set(d["u"])
                n["w"] = tuple(x.at[slot].set(y) for x, y in zip(t["w"], d["w"]))
            if "g" in t:
                n["g"] = tuple(x.at[slot].set(y) for x, y in zip(t["g"], d["g"]))
            new[group] = n
        tables.append(new)
    return BankArrays(pools=pools, tables=tables, max_rank=arrays.max_rank)


def slot_bytes(cfg: ModelConfig, max_rank: int, dtype) -> int:
    """Device bytes of one adapter slot's pool rows (its tables are a few KB more)."""
    shapes, L, R = target_shapes(cfg), cfg.n_layers, max_rank
    rows = sum(L * len(ts) * R * shapes[ts[0]][0] + L * R * sum(shapes[t][1] for t in ts)
               for ts in GROUPS.values())
    return rows * jnp.dtype(dtype).itemsize


def base_weight(params: dict, cfg: ModelConfig, layer: int, target: str) -> jax.Array:
    """Module `target`'s base weight [in, out] at `layer`, cut out of the fused params."""
    name, columns = fused_index(cfg, target)
    return params["layers"][layer][name][:, columns]


def slot_rows(L: int, M: int, R: int, slot: int, layer: int, m: int,
              tied: bool = False) -> tuple[int, int]:
    """First A-pool and B-pool rows of module m of a group of M at `layer` in slot `slot`.

    Slot s owns L*M*R rows of the group's A pool and L*R of each B pool; a Tied-LoRA adapter
    uses its layer-0 rows for every layer."""
    layer = 0 if tied else layer
    return (slot - 1) * L * M * R + (layer * M + m) * R, (slot - 1) * L * R + layer * R


def dora_scale(params: dict, cfg: ModelConfig, layer: int, target: str, mod) -> np.ndarray:
    """g = m / ||W + s BA|| per output channel (norm over inputs), in float32."""
    w = base_weight(params, cfg, layer, target).astype(jnp.float32)          # [in, out]
    delta = mod.scale * (jnp.asarray(mod.b) @ jnp.asarray(mod.a)).T          # [in, out]
    norm = jnp.linalg.norm(w + delta, axis=0)
    return np.asarray(jnp.asarray(mod.m) / norm, np.float32)
