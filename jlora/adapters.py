"""Adapter types (LoRA, rsLoRA, DoRA, Tied-LoRA) as host data, independent of file formats.

An `Adapter` maps (layer, target) to a `ModuleAdapter`: A [r, in] and B [out, r] in PEFT's
layout, the scale s (lora_alpha / r, or / sqrt(r) with rsLoRA), and optional vectors:
u [r] and w [out] for Tied-LoRA (its per-layer u and v), m [out] for DoRA (the magnitude
vector). A Tied-LoRA adapter's modules share one A and one B array object across layers,
which is how the bank and the native format know to store them once.

The y of a module is, in every variant,  y = g * (W x + s * w * (B ((A x) * u))) + bias,
with g = m / ||W + s BA|| (per output row) for DoRA and 1 otherwise (REFERENCE.md §2).
This module reads no files and touches no device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jlora.config import ModelConfig

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                "down": "mlp.down_proj"}
# Projection groups, as the model computes them: one fused matmul (and one LoRA launch pair)
# per group.
GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
VARIANTS = ("lora", "dora", "tied")


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each target module."""
    D, F, H, G, E = cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return {"q": (D, H * E), "k": (D, G * E), "v": (D, G * E), "o": (H * E, D),
            "gate": (D, F), "up": (D, F), "down": (F, D)}


@dataclass
class ModuleAdapter:
    a: np.ndarray                    # [r, in]
    b: np.ndarray                    # [out, r]
    scale: float
    u: np.ndarray | None = None      # [r]    Tied-LoRA
    w: np.ndarray | None = None      # [out]  Tied-LoRA
    m: np.ndarray | None = None      # [out]  DoRA magnitude

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class Adapter:
    name: str
    variant: str                                         # lora | dora | tied
    modules: dict[tuple[int, str], ModuleAdapter]
    source: str = ""
    info: dict = field(default_factory=dict)             # e.g. PEFT's base_model_name_or_path

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def targets(self) -> tuple[str, ...]:
        present = {t for _, t in self.modules}
        return tuple(t for t in TARGETS if t in present)

    def nbytes(self) -> int:
        """Bytes held, counting arrays shared across layers (Tied-LoRA) once."""
        seen, total = set(), 0
        for mod in self.modules.values():
            for arr in (mod.a, mod.b, mod.u, mod.w, mod.m):
                if arr is not None and id(arr) not in seen:
                    seen.add(id(arr))
                    total += arr.nbytes
        return total

    def validate(self, cfg: ModelConfig, max_rank: int | None = None) -> None:
        """Refuse an adapter that does not fit the model (errors name the module)."""
        if self.variant not in VARIANTS:
            raise ValueError(f"adapter {self.name!r}: variant {self.variant!r} is not one of "
                             f"{VARIANTS}")
        shapes = target_shapes(cfg)
        for (layer, target), mod in self.modules.items():
            where = f"adapter {self.name!r} ({self.source}), layer {layer} module {target}"
            if not 0 <= layer < cfg.n_layers or target not in shapes:
                raise ValueError(f"{where}: no such module in a model of {cfg.n_layers} layers")
            n_in, n_out = shapes[target]
            r = mod.rank
            if mod.a.ndim == 2 and mod.a.shape[1] != n_in and n_in == cfg.dim:
                raise ValueError(f"{where}: lora_A has {mod.a.shape[1]} input features but the "
                                 f"model's hidden size is {cfg.dim}: the adapter was made for "
                                 "a different base model")
            if mod.a.shape != (r, n_in) or mod.b.shape != (n_out, r):
                raise ValueError(f"{where}: lora_A {mod.a.shape} and lora_B {mod.b.shape} do "
                                 f"not fit the base module ({n_in} -> {n_out}); expected "
                                 f"[{r}, {n_in}] and [{n_out}, {r}]")
            if max_rank is not None and r > max_rank:
                raise ValueError(f"{where}: rank {r} exceeds the configured maximum rank "
                                 f"{max_rank} (raise --max-lora-rank)")
            for name, vec, size in (("u", mod.u, r), ("w", mod.w, n_out), ("m", mod.m, n_out)):
                if vec is not None and vec.shape != (size,):
                    raise ValueError(f"{where}: vector {name} has shape {vec.shape}, expected "
                                     f"({size},)")
