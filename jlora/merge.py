"""Merged serving: fold one adapter into the base weights (dLoRA's merged mode).

    W' = g * (W + s * diag(w) B diag(u) A)     (in PEFT's [out, in] terms; g = 1 unless DoRA)

`merge` returns new params and leaves the given ones untouched, so "unmerging" is returning
to the original params object: the base weights come back bit for bit, never recomputed by
a subtraction in bf16. Works on the fused qkv / gate_up layout of `jlora.model`.
"""

from __future__ import annotations

import jax.numpy as jnp

from jlora.adapters import Adapter
from jlora.bank import base_weight
from jlora.config import ModelConfig
from jlora.model import fused_index

def merge(params: dict, cfg: ModelConfig, adapter: Adapter) -> dict:
    """Params with `adapter` folded in; `params` itself is not modified."""
    adapter.validate(cfg)
    layers = [dict(layer) for layer in params["layers"]]
    for (layer, target), mod in sorted(adapter.modules.items()):
        w = base_weight(params, cfg, layer, target).astype(jnp.float32)          # [in, out]
        a = jnp.asarray(mod.a) * (1.0 if mod.u is None else jnp.asarray(mod.u)[:, None])
        delta = mod.scale * (jnp.asarray(mod.b) @ a).T                           # [in, out]
        if mod.w is not None:
            delta = delta * jnp.asarray(mod.w)[None, :]
        merged = w + delta
        if mod.m is not None:  # DoRA: rescale each output column to its magnitude
            merged = merged * (jnp.asarray(mod.m) / jnp.linalg.norm(merged, axis=0))[None, :]
        name, columns = fused_index(cfg, target)
        fused = layers[layer][name]
        layers[layer][name] = fused.at[:, columns].set(merged.astype(fused.dtype))
    return {**params, "layers": layers}
