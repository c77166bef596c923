"""Tensor parallelism for the engine: one Mesh axis "tp", Megatron-style column/row splits.

Per layer, the fused q/k/v and gate/up weights are split by columns (each device holds
its own heads and FFN columns, laid out by `jlora.model.pack_layer(tp=n)`), the output and
down projections by rows; their partial sums are added with one all-reduce each. KV pages
are split by KV head. The step runs the layers inside `shard_map` on each device's shard
(with the per-device head counts), so the Pallas kernels see ordinary local arrays.

LoRA follows the base weight it adapts. Column-parallel groups (qkv, gate_up): A is whole on
every device (it is rank x D), B is split by output columns like W. Row-parallel groups
(o, down): A is split by input rows like W, B is whole; each device's LoRA term is linear in
its input shard, so it joins the base partial sum and the same all-reduce adds it up: the
adapters need no communication of their own (S-LoRA all-gathers a rank-sized intermediate
instead). Embedding and norms are replicated; the LM head is split by vocabulary and XLA
gathers the logits (a few rows) for sampling.

Multi-host: call `jax.distributed.initialize(coordinator_address="HOST:PORT",
num_processes=N, process_id=I)` on every host before building the engine, then pass
`devices=jax.devices()` (all hosts' devices) to the Mesh; every process must then run the
engine loop on the same requests. Only single-host meshes have been run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jlora.bank import BankArrays
from jlora.config import ModelConfig
from jlora.model import Params, fused_index, layer_shapes, pack_layer
from jlora.paged import PagedKV

AXIS = "tp"
COLUMN_GROUPS, ROW_GROUPS = ("qkv", "gate_up"), ("o", "down")
_LAYER_SPECS = dict(attn_norm=P(), wqkv=P(None, AXIS), bqkv=P(AXIS), wo=P(AXIS, None),
                    mlp_norm=P(), w_gate_up=P(None, AXIS), w_down=P(AXIS, None))


def make_mesh(tp: int, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if not 1 <= tp <= len(devices):
        raise ValueError(f"tp={tp} needs that many devices; {len(devices)} available")
    return Mesh(np.array(devices[:tp]), (AXIS,))


def local_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The config of one shard: its heads and FFN columns, laid out as a single device's."""
    return cfg.replace(n_heads=cfg.n_heads // tp, n_kv_heads=cfg.n_kv_heads // tp,
                       ffn_dim=cfg.ffn_dim // tp, tp=1)


def relayout(params: Params, cfg: ModelConfig, tp: int) -> tuple[Params, ModelConfig]:
    """Params (and config) with the fused columns grouped for `tp` shards."""
    new_cfg = cfg.replace(tp=tp)       # validates that tp divides the heads and FFN
    if tp == cfg.tp:
        return params, cfg
    layers = []
    for layer in params["layers"]:
        t = {k: layer[k] for k in ("attn_norm", "wo", "mlp_norm", "w_down")}
        for name, target in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("w_gate", "gate"),
                             ("w_up", "up")):
            fused, columns = fused_index(cfg, target)
            t[name] = layer[fused][:, columns]
            if "bqkv" in layer and target in ("q", "k", "v"):
                t["b" + target] = layer["bqkv"][columns]
        assert set(layer_shapes(cfg)) <= set(t)
        layers.append(pack_layer(t, concat=jnp.concatenate, tp=tp))
    return {**params, "layers": layers}, new_cfg


def param_specs(params: Params) -> Params:
    specs = {k: P() for k in params if k != "layers"}
    if "lm_head" in params:
        specs["lm_head"] = P(None, AXIS)
    specs["layers"] = [{k: _LAYER_SPECS[k] for k in layer} for layer in params["layers"]]
    return specs


def bank_specs(bank: BankArrays) -> BankArrays:
    """Column groups: A whole, B and the output vectors (w, g) split by columns; row groups:
    A split by input rows, B and the vectors whole."""
    split_cols = P(None, AXIS)
    pools = {}
    for group, (a, bs) in bank.pools.items():
        col = group in COLUMN_GROUPS
        pools[group] = (P() if col else split_cols, tuple(split_cols if col else P() for _ in bs))
    tables = {}
    for group, t in bank.tables.items():   # w, g: [L, S, N] split by N for column groups
        out = P(None, None, AXIS) if group in COLUMN_GROUPS else P()
        tables[group] = {k: tuple(out for _ in v) if k in ("w", "g") else P()
                         for k, v in t.items()}
    return BankArrays(pools=pools, tables=tables, max_rank=bank.max_rank)


def put(tree, specs, mesh: Mesh):
    """device_put every leaf of tree with the NamedSharding of its spec."""
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs,
                        is_leaf=lambda x: x is None)


def kv_specs(kv: PagedKV) -> PagedKV:
    """KV pages [G, P, Z, E] split by KV head."""
    return PagedKV(tuple(P(AXIS) for _ in kv.k), tuple(P(AXIS) for _ in kv.v))


def shard_layers(fn, mesh: Mesh, params: Params, bank, kv: PagedKV, *replicated):
    """fn(params, bank, kv, *replicated) -> (h, kv) run per shard; h comes back whole."""
    in_specs = (param_specs(params), P() if bank is None else bank_specs(bank), kv_specs(kv),
                *(P() for _ in replicated))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=(P(), kv_specs(kv)),
                         check_vma=False)(params, bank, kv, *replicated)
