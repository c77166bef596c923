"""The adapter bank: a fixed set of device slots holding adapters in the kernels' row pools.

Per projection group (qkv, o, gate_up, down) the bank owns one A pool and one B pool per
module (`pallas_kernels.lora.LoraWeights` layout), shared by all layers, plus tables stacked
over layers (start rows, ranks, scales, and the Tied-LoRA / DoRA vectors). Slot s owns a
fixed range of pool rows, its rank capacity R_s rows per module and layer (max_rank unless
`slot_ranks` sets each slot's; slots of small capacity cost proportionally less memory), so
loading an adapter is an in-place write of that range and of column s of the tables: shapes
never change, so the jitted step never recompiles. A Tied-LoRA adapter writes its shared A
and B once and points every layer at them; a rank-8 adapter in a slot of capacity 64 is
read and computed at rank 8. Slot 0 is the base model (rank 0 everywhere). DoRA's
g = m / ||W + s BA|| is computed once, when the adapter is packed, against the base weights.

The bank holds device arrays and the name -> slot map; which adapters to keep resident is
the caller's policy (serving/adapter_cache.py). `load` is one call; the serving engine splits
it in three: `pack` (the host work, once per adapter, kept in its host tier), `slot_data`
(the slot's offsets and the host-to-device copy, on its loader thread) and `put` (the
in-place write, on its step thread). It does not read files.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

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
    """Device arrays: pools[group] = (A [Pa, D_in], (B_m [Pb, N_m], ...)); tables[group] = dict
    of a_start, b_start, rank, scale [L, M, S] and optional u [L, M, S, R], w, g (M x [L, S, N]),
    stacked over layers so the whole bank is a few dozen arrays (each jitted call that takes
    it flattens every leaf on the host: per-layer tables made that 1,099 leaves)."""

    pools: dict
    tables: dict
    max_rank: int

    def weights(self, layer: int, group: str) -> LoraWeights:
        """The group's pools and all layers' tables, read at `layer` (no slice is taken:
        inside a jitted step each would be a device copy per launch)."""
        a, b = self.pools[group]
        t = self.tables[group]
        return LoraWeights(a=a, b=b, a_start=t["a_start"], b_start=t["b_start"], rank=t["rank"],
                           scale=t["scale"], u=t.get("u"), w=t.get("w"), g=t.get("g"),
                           max_rank=self.max_rank, layer=layer)


class AdapterBank:
    """Slots 1..n_slots-1 for adapters; `arrays` is what the jitted step takes."""

    def __init__(self, cfg: ModelConfig, n_slots: int, max_rank: int, dtype=jnp.bfloat16,
                 features: tuple[str, ...] = FEATURES, slot_ranks: tuple[int, ...] = ()):
        if n_slots < 2:
            raise ValueError(f"n_slots={n_slots}: a bank needs slot 0 (the base) and at least "
                             "one adapter slot")
        if not 1 <= max_rank <= 256:
            raise ValueError(f"max_rank={max_rank} must be in [1, 256]")
        slot_ranks = tuple(slot_ranks) or (max_rank,) * (n_slots - 1)
        if len(slot_ranks) != n_slots - 1 or not all(1 <= r <= max_rank for r in slot_ranks):
            raise ValueError(f"slot_ranks={slot_ranks} must give each of the {n_slots - 1} "
                             f"adapter slots a rank capacity in [1, max_rank={max_rank}]")
        unknown = set(features) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown bank features {sorted(unknown)}; known: {FEATURES}")
        self.cfg, self.n_slots, self.max_rank, self.dtype = cfg, n_slots, max_rank, dtype
        self.features = tuple(features)
        self.slots: dict[str, int] = {}          # adapter name -> slot
        self.adapters: dict[int, Adapter] = {}   # slot -> adapter
        self.slot_ranks = (0, *slot_ranks)      # rank capacity of each slot (slot 0: base)
        self._rows = np.cumsum(self.slot_ranks)  # rank rows before each slot's
        shapes = target_shapes(cfg)
        L, S, rows = cfg.n_layers, n_slots, int(self._rows[-1])
        Rv = v_width(max_rank)
        pools, tables = {}, {}
        for group, targets in GROUPS.items():
            M = len(targets)
            d_in = shapes[targets[0]][0]
            widths = [shapes[t][1] for t in targets]
            a = jnp.zeros((rows * L * M + POOL_SLACK_ROWS, d_in), dtype)
            b = tuple(jnp.zeros((rows * L + POOL_SLACK_ROWS, n), dtype) for n in widths)
            pools[group] = (a, b)
            t = dict(a_start=jnp.zeros((L, M, S), jnp.int32),
                     b_start=jnp.zeros((L, M, S), jnp.int32),
                     rank=jnp.zeros((L, M, S), jnp.int32), scale=jnp.zeros((L, M, S), jnp.float32))
            if "tied" in self.features:
                t["u"] = jnp.ones((L, M, S, Rv), jnp.float32)
                t["w"] = tuple(jnp.ones((L, S, n), jnp.float32) for n in widths)
            if "dora" in self.features:
                t["g"] = tuple(jnp.ones((L, S, n), jnp.float32) for n in widths)
            tables[group] = t
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

    def free_slot(self, rank: int = 1) -> int:
        """The free slot of the least capacity that holds `rank`."""
        used = set(self.slots.values())
        free = [s for s in range(1, self.n_slots) if s not in used and self.slot_ranks[s] >= rank]
        if not free:
            raise ValueError(f"no free adapter slot holds rank {rank} (slots in use: "
                             f"{sorted(self.slots)}); unload one first")
        return min(free, key=lambda s: self.slot_ranks[s])

    def slot_rows(self, M: int, slot: int, layer: int, m: int,
                  tied: bool = False) -> tuple[int, int]:
        """First A-pool and B-pool rows of module m of a group of M at `layer` in `slot`.

        Slot s owns L*M*R_s rows of the group's A pool and L*R_s of each B pool; a Tied-LoRA
        adapter uses its layer-0 rows for every layer."""
        L, R, base = self.cfg.n_layers, self.slot_ranks[slot], int(self._rows[slot - 1])
        a, b = _rows_in_slot(M, R, 0 if tied else layer, m)
        return base * L * M + a, base * L + b

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.arrays))

    # ------------------------------------------------------------------ loading
    def load(self, adapter: Adapter, params: dict, slot: int | None = None) -> int:
        """Write `adapter` into a slot (a free one unless given); returns the slot.

        params are the base model's (DoRA's scale is computed against them).
        """
        self.check(adapter)
        if adapter.name in self.slots and slot is None:
            slot = self.slots[adapter.name]
        slot = self.free_slot(adapter.max_rank if adapter.modules else 1) if slot is None \
            else slot
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

    def put(self, adapter: Adapter, slot: int, data: "SlotData") -> None:
        """Write `slot_data(adapter, params, slot)` into the slot, in place (asynchronously:
        steps dispatched before read the old contents, steps after the new)."""
        if not 1 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} is outside 1..{self.n_slots - 1}")
        arrays, sharding = data.arrays, jax.tree.leaves(self.arrays)[0].sharding
        if len(sharding.device_set) > 1:   # a bank laid out over a mesh: every device gets
            # the slot's rows, and the bank's layout decides what each keeps
            arrays = jax.device_put(arrays, jax.sharding.NamedSharding(
                sharding.mesh, jax.sharding.PartitionSpec()))
        self.arrays = _write_slot(self.arrays, jnp.int32(slot), arrays, layout=data.layout)
        old = self.adapters.pop(slot, None)
        if old is not None and self.slots.get(old.name) == slot:
            del self.slots[old.name]
        if adapter.name:
            self.slots[adapter.name], self.adapters[slot] = slot, adapter

    def unload(self, name: str) -> None:
        """Free a slot (its rank drops to 0, so nothing reads its rows)."""
        slot = self.slot_of(name)
        self.put(EMPTY, slot, self.slot_data(EMPTY, None, slot))

    def pack(self, adapter: Adapter, params, capacity: int) -> "Packed":
        """`adapter` laid out on the host for a slot of rank capacity `capacity`: the casts to
        the bank's dtype, B's transposes and the DoRA scales, which are most of a load's host
        work, done once (the adapter cache keeps the result with its host copy)."""
        self.check(adapter)
        cfg, L, R = self.cfg, self.cfg.n_layers, capacity
        if adapter.modules and adapter.max_rank > R:
            raise ValueError(f"adapter {adapter.name!r} has rank {adapter.max_rank}; a slot "
                             f"of capacity {R} cannot hold it")
        shapes, dtype = target_shapes(cfg), np.dtype(self.dtype)
        tied = adapter.variant == "tied"
        row_shapes = _row_shapes(cfg, R)
        rows = np.zeros(sum(int(np.prod(x)) for x in row_shapes), dtype)
        views = iter(_split(rows, row_shapes))   # each group's A rows, then its B rows
        tables = {}
        for group, targets in GROUPS.items():
            M, widths = len(targets), [shapes[t][1] for t in targets]
            a_rows = next(views)
            b_rows = [next(views) for _ in widths]
            t = {k: np.zeros((L, M), np.int32) for k in ("a_start", "b_start", "rank")}
            t["scale"] = np.zeros((L, M), np.float32)
            t["u"] = np.ones((L, M, v_width(self.max_rank)), np.float32)
            t["w"] = tuple(np.ones((L, n), np.float32) for n in widths)
            t["g"] = tuple(np.ones((L, n), np.float32) for n in widths)
            for layer, m in np.ndindex(L, M):
                mod = adapter.modules.get((layer, targets[m]))
                if mod is None:
                    continue
                r = mod.rank
                a_start, b_start = _rows_in_slot(M, R, 0 if tied else layer, m)
                a_rows[a_start:a_start + r] = mod.a
                # transpose first: a cast reading B's columns in place is 5x slower
                b_rows[m][b_start:b_start + r] = np.ascontiguousarray(mod.b.T)
                t["a_start"][layer, m], t["b_start"][layer, m] = a_start, b_start
                t["rank"][layer, m], t["scale"][layer, m] = r, mod.scale
                if mod.u is not None:
                    t["u"][layer, m, :r] = mod.u
                if mod.w is not None:
                    t["w"][m][layer] = mod.w
                if mod.m is not None:
                    t["g"][m][layer] = dora_scale(params, cfg, layer, targets[m], mod,
                                                  self.max_rank)
            for feature, keys in (("tied", ("u", "w")), ("dora", ("g",))):
                if feature not in self.features:
                    for k in keys:
                        del t[k]
            tables[group] = t
        return Packed(capacity=R, rows=rows, tables=tables)

    def slot_data(self, adapter: Adapter, params, slot: int,
                  packed: "Packed | None" = None, device=None) -> "SlotData":
        """Device arrays for slot `slot`, copied to `device` (a device or sharding; default:
        JAX's default) as three buffers: the pool rows, and the slot's table column (tables
        stacked over layers) and row offsets as one int32 and one float32 buffer. Three
        transfers, not one per array: a copy call costs tens of microseconds of Python per
        array, on a loader thread that holds the GIL the step thread needs. The step's arrays
        are not touched. `packed` is `pack(adapter, params, capacity of slot)` if already
        made; its rows may be a numpy or a pinned host array."""
        R = self.slot_ranks[slot]
        if packed is None or packed.capacity != R:
            packed = self.pack(adapter, params, R)
        bases, tables = {}, {}
        for group, targets in GROUPS.items():
            bases[group] = np.array(self.slot_rows(len(targets), slot, 0, 0), np.int32)
            t = dict(packed.tables[group])
            on = t["rank"] > 0   # a module the adapter lacks keeps start 0 (and rank 0)
            t["a_start"] = np.where(on, t["a_start"] + bases[group][0], 0).astype(np.int32)
            t["b_start"] = np.where(on, t["b_start"] + bases[group][1], 0).astype(np.int32)
            tables[group] = t
        ints, floats, layout = _join({"bases": bases, "tables": tables})
        rows, ints, floats = jax.device_put((packed.rows, ints, floats), device)
        return SlotData(rows, ints, floats, (_row_shapes(self.cfg, R), layout))


class SlotData(NamedTuple):
    """One slot's contents on the device, as `AdapterBank.slot_data` copies them: `rows`
    (the pools' rows, in `_row_shapes` order), `ints` and `floats` (everything else), and the
    static layout that splits them again."""

    rows: jax.Array
    ints: jax.Array
    floats: jax.Array
    layout: tuple

    @property
    def arrays(self) -> tuple:
        return self.rows, self.ints, self.floats


def _row_shapes(cfg: ModelConfig, R: int) -> tuple[tuple[int, int], ...]:
    """Shapes of a slot of capacity R's pool rows, one buffer's order: per group its A rows
    [L*M*R, D_in], then each module's B rows [L*R, N_m]."""
    shapes, L, out = target_shapes(cfg), cfg.n_layers, []
    for targets in GROUPS.values():
        out.append((L * len(targets) * R, shapes[targets[0]][0]))
        out.extend((L * R, shapes[t][1]) for t in targets)
    return tuple(out)


def _split(flat, shapes) -> list:
    """`flat` cut into consecutive arrays of these shapes (views of a numpy array)."""
    out, i = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(flat[i:i + n].reshape(shape))
        i += n
    return out


def _join(tree) -> tuple[np.ndarray, np.ndarray, tuple]:
    """A tree of int32 and float32 host arrays as one buffer of each, and the static layout
    (tree structure, each leaf's kind and shape) that `_unjoin` undoes it with."""
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [np.asarray(x) for x in leaves]
    kinds = tuple("i" if x.dtype == np.int32 else "f" for x in leaves)
    assert all(x.dtype in (np.int32, np.float32) for x in leaves), [x.dtype for x in leaves]
    joined = {k: np.concatenate([x.ravel() for x, kind in zip(leaves, kinds) if kind == k]
                                or [np.zeros(0, np.int32 if k == "i" else np.float32)])
              for k in "if"}
    return joined["i"], joined["f"], (treedef, kinds, tuple(x.shape for x in leaves))


def _unjoin(ints, floats, layout):
    treedef, kinds, shapes = layout
    parts = {"i": iter(_split(ints, [s for s, k in zip(shapes, kinds) if k == "i"])),
             "f": iter(_split(floats, [s for s, k in zip(shapes, kinds) if k == "f"]))}
    return jax.tree.unflatten(treedef, [next(parts[k]) for k in kinds])


@dataclass(frozen=True)
class Packed:
    """One adapter's slot contents on the host, for slots of rank capacity `capacity`: rows,
    one buffer in the bank's dtype holding per group A rows [L*M*R, D_in] then each module's
    B rows [L*R, N_m] (`_row_shapes`); tables[group] as the bank's column of a slot, [L, ...],
    with starts counted from the slot's own first rows (`AdapterBank.slot_data` adds the
    slot's offsets)."""

    capacity: int
    rows: np.ndarray   # or a jax.Array in pinned host memory
    tables: dict

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + sum(x.nbytes for x in jax.tree.leaves(self.tables))


def _rows_in_slot(M: int, R: int, layer: int, m: int) -> tuple[int, int]:
    """A-pool and B-pool rows of module m (of M) at `layer`, counted from a slot's first."""
    return (layer * M + m) * R, layer * R


@functools.partial(jax.jit, donate_argnums=0, static_argnames="layout")
def _write_slot(arrays: BankArrays, slot: jax.Array, data: tuple, layout: tuple) -> BankArrays:
    """Write one slot's rows and table column in place (one program per slot capacity).
    data = `SlotData.arrays`; the tables in it are stacked over layers like the bank's."""
    rows, ints, floats = data
    row_shapes, leaf_layout = layout
    d = _unjoin(ints, floats, leaf_layout)
    views = iter(_split(rows, row_shapes))
    pools = {}
    for group in GROUPS:   # the rows' order (a traced dict's keys come sorted)
        a, b = arrays.pools[group]
        a_base, b_base = d["bases"][group][0], d["bases"][group][1]
        a = jax.lax.dynamic_update_slice(a, next(views), (a_base, 0))
        b = tuple(jax.lax.dynamic_update_slice(bm, next(views), (b_base, 0)) for bm in b)
        pools[group] = (a, b)
    tables = {}
    for group, t in arrays.tables.items():
        d_t = d["tables"][group]
        n = {k: t[k].at[:, :, slot].set(d_t[k]) for k in ("a_start", "b_start", "rank", "scale")}
        if "u" in t:
            n["u"] = t["u"].at[:, :, slot].set(d_t["u"])
            n["w"] = tuple(x.at[:, slot].set(y) for x, y in zip(t["w"], d_t["w"]))
        if "g" in t:
            n["g"] = tuple(x.at[:, slot].set(y) for x, y in zip(t["g"], d_t["g"]))
        tables[group] = n
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


def dora_scale(params: dict, cfg: ModelConfig, layer: int, target: str, mod,
               max_rank: int | None = None) -> np.ndarray:
    """g = m / ||W + s BA|| per output channel (norm over inputs), in float32.

    A and B are zero-padded to max_rank (default: their rank), so one compiled program
    serves every layer and every rank up to it (serving compiles it once, at start-up)."""
    r, R = mod.rank, max_rank or mod.rank
    a = np.zeros((R, mod.a.shape[1]), np.float32)
    b = np.zeros((mod.b.shape[0], R), np.float32)
    a[:r], b[:, :r] = mod.a, mod.b
    name, _ = fused_index(cfg, target)
    g = _dora_scale(params["layers"][layer][name], a, b, np.float32(mod.scale),
                    np.asarray(mod.m, np.float32), cfg=cfg, target=target)
    return np.asarray(g)


@functools.partial(jax.jit, static_argnames=("cfg", "target"))
def _dora_scale(fused: jax.Array, a, b, scale, m, *, cfg: ModelConfig, target: str):
    _, columns = fused_index(cfg, target)
    w = fused[:, columns].astype(jnp.float32)                                 # [in, out]
    norm = jnp.linalg.norm(w + scale * (b @ a).T, axis=0)
    return m / norm
