"""Trainable adapters (LoRA, rsLoRA, DoRA, Tied-LoRA) as a Flax NNX module over the jlora model.

`Adapters` holds only the adapter's own weights, stacked over layers per target module:
LoRA and DoRA a_t [L, r, in] and b_t [L, out, r] (PEFT's layout), DoRA's magnitude m_t
[L, out]; Tied-LoRA one a_t [r, in] and b_t [out, r] shared by every layer and per-layer
vectors u_t [L, r] and v_t [L, out]. What trains is an `nnx.LoRAParam`; what is frozen (a
Tied-LoRA switch turned off) is a plain `nnx.Variable`. The base model's params stay a
separate pytree that is read, never copied or changed.

`TrainLora` plugs the module into `jlora.model.forward` as its LoRA context: for each module
of a projection group,  y = g * (W x + s * v * (B ((A drop(x)) * u))),  with
g = m / ||W + s B A|| (the norm held constant for gradients, as DoRA prescribes) for DoRA and
1 otherwise: the formula the serving kernels compute (REFERENCE.md §2), here in float32
with plain matmuls so that it differentiates. `to_adapter` turns the trained module into the
host `jlora.adapters.Adapter` that serving and the file formats take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora.adapters import GROUPS, TARGETS, Adapter, ModuleAdapter, target_shapes
from jlora.bank import base_weight
from jlora.config import ModelConfig
from jlora.values import is_int, is_real

VARIANTS = ("lora", "dora", "tied")


@dataclass(frozen=True)
class AdapterSpec:
    """What to train. Tied-LoRA's switches pick which of A, B, u, v train (the paper's
    configurations; at least one must); alpha defaults to the rank (scale 1), as the
    Tied-LoRA paper sets it."""

    variant: str = "lora"
    rank: int = 8
    alpha: float | None = None       # None: 2 * rank for LoRA/DoRA (PEFT users' habit), rank
    targets: tuple[str, ...] = TARGETS  # for Tied-LoRA
    rslora: bool = False
    dropout: float = 0.0
    train_a: bool = True
    train_b: bool = True
    train_u: bool = True
    train_v: bool = True

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is not one of {VARIANTS}")
        if not (is_int(self.rank) and 1 <= self.rank <= 256):
            raise ValueError(f"rank={self.rank!r} must be an integer in [1, 256]")
        if self.alpha is not None and not (is_real(self.alpha) and 0 < self.alpha < math.inf):
            raise ValueError(f"alpha={self.alpha!r} must be a finite number > 0 (or None for "
                             "the default)")
        if not isinstance(self.targets, (tuple, list)):
            raise ValueError(f"targets={self.targets!r} must be a tuple of module names "
                             f"among {list(TARGETS)}, e.g. ('q', 'v'), not a "
                             f"{type(self.targets).__name__}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"targets {list(self.targets)} must be a non-empty subset of "
                             f"{list(TARGETS)}")
        if not (is_real(self.dropout) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        for name in ("rslora", "train_a", "train_b", "train_u", "train_v"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.variant == "tied" and not (self.train_a or self.train_b or self.train_u
                                           or self.train_v):
            raise ValueError("Tied-LoRA with train_a, train_b, train_u and train_v all False "
                             "trains nothing: turn on at least one")

    @property
    def scale(self) -> float:
        alpha = self.alpha if self.alpha is not None else (
            self.rank if self.variant == "tied" else 2 * self.rank)
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class Adapters(nnx.Module):
    """Initial values: as PEFT, A kaiming-uniform and B zero, so a fresh adapter changes
    nothing. A Tied-LoRA whose B is frozen would then never train (its output and every
    gradient stay 0), so there B is random too (kaiming-uniform over its rank inputs), as in
    Tied-LoRA's frozen-matrix configurations, and the first trainable of v, u, A starts at
    zero instead, which keeps the fresh adapter a no-op (as VeRA zeroes its output vector)."""

    def __init__(self, cfg: ModelConfig, spec: AdapterSpec, base_params: dict, rngs: nnx.Rngs):
        self.cfg, self.spec = cfg, spec
        L, r, shapes = cfg.n_layers, spec.rank, target_shapes(cfg)
        tied = spec.variant == "tied"
        random_b = tied and not spec.train_b
        zero = None if not random_b else next(
            name for name, on in (("v", spec.train_v), ("u", spec.train_u), ("a", spec.train_a))
            if on)
        for t in spec.targets:
            n_in, n_out = shapes[t]
            lead = () if tied else (L,)
            a = _kaiming_uniform(rngs.params(), (*lead, r, n_in))
            b = _kaiming_uniform(rngs.params(), (*lead, n_out, r)) if random_b else \
                jnp.zeros((*lead, n_out, r), jnp.float32)
            if zero == "a":
                a = jnp.zeros_like(a)
            setattr(self, f"a_{t}", _var(a, not tied or spec.train_a))
            setattr(self, f"b_{t}", _var(b, not tied or spec.train_b))
            if tied:
                u = jnp.full((L, r), float(zero != "u"), jnp.float32)
                v = jnp.full((L, n_out), float(zero != "v"), jnp.float32)
                setattr(self, f"u_{t}", _var(u, spec.train_u))
                setattr(self, f"v_{t}", _var(v, spec.train_v))
            if spec.variant == "dora":  # m starts at ||W|| (B = 0): the scale starts at 1
                m = jnp.stack([_column_norms(base_weight(base_params, cfg, i, t))
                               for i in range(L)])
                setattr(self, f"m_{t}", nnx.LoRAParam(m))

    def module(self, layer: int, target: str) -> dict | None:
        """The arrays of one (layer, target) module: a, b, and optional u, v, m."""
        if target not in self.spec.targets:
            return None
        tied = self.spec.variant == "tied"
        get = lambda name: getattr(self, f"{name}_{target}")[...]  # noqa: E731
        mod = {"a": get("a") if tied else get("a")[layer],
               "b": get("b") if tied else get("b")[layer]}
        if tied:
            mod["u"], mod["v"] = get("u")[layer], get("v")[layer]
        if self.spec.variant == "dora":
            mod["m"] = get("m")[layer]
        return mod


def _kaiming_uniform(key, shape: tuple[int, ...]) -> jax.Array:
    """Uniform in +-1/sqrt(fan in), fan in the last dimension (PEFT's init of A)."""
    bound = 1 / math.sqrt(shape[-1])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _var(x, trainable: bool):
    return nnx.LoRAParam(x) if trainable else nnx.Variable(x)


def _column_norms(w: jax.Array) -> jax.Array:
    """||W||, one norm per output over the input dimension, of w [in, out]."""
    return jnp.linalg.norm(w.astype(jnp.float32), axis=0)


class TrainLora:
    """The LoRA context `jlora.model.forward` calls per projection group (see `project`)."""

    def __init__(self, adapters: Adapters, base_params: dict, dropout_key=None):
        self.adapters, self.params, self.key = adapters, base_params, dropout_key

    def project(self, x: jax.Array, w: jax.Array, layer: int, group: str, impl: str):
        y = x @ w
        ad, cfg, spec = self.adapters, self.adapters.cfg, self.adapters.spec
        if cfg.tp != 1:
            raise ValueError("training runs on params laid out for one device (tp=1)")
        xf = x.astype(jnp.float32)
        if spec.dropout and self.key is not None:
            key = jax.random.fold_in(jax.random.fold_in(self.key, layer), len(group))
            keep = jax.random.bernoulli(key, 1 - spec.dropout, xf.shape)
            xf = jnp.where(keep, xf / (1 - spec.dropout), 0.0)
        widths = [target_shapes(cfg)[t][1] for t in GROUPS[group]]
        parts = jnp.split(y, np.cumsum(widths)[:-1], axis=-1)
        out = []
        for target, part in zip(GROUPS[group], parts):
            mod = ad.module(layer, target)
            if mod is None:
                out.append(part)
                continue
            v = xf @ mod["a"].T                                          # [T, r]
            if "u" in mod:
                v = v * mod["u"]
            delta = spec.scale * (v @ mod["b"].T)                        # [T, out]
            if "v" in mod:
                delta = delta * mod["v"]
            new = part.astype(jnp.float32) + delta
            if "m" in mod:   # DoRA: g = m / ||W + s B A||, the norm a constant for gradients
                base = base_weight(self.params, cfg, layer, target).astype(jnp.float32)
                merged = base + spec.scale * (mod["b"] @ mod["a"]).T
                new = new * (mod["m"] / jax.lax.stop_gradient(_column_norms(merged)))
            out.append(new.astype(y.dtype))
        return jnp.concatenate(out, axis=-1)


def to_adapter(adapters: Adapters, name: str) -> Adapter:
    """The trained adapter as host data (Tied-LoRA's A and B shared across layers)."""
    spec, L = adapters.spec, adapters.cfg.n_layers
    host = lambda x: np.asarray(x, np.float32)  # noqa: E731
    modules = {}
    for t in spec.targets:
        shared = {}
        if spec.variant == "tied":
            shared = {"a": host(getattr(adapters, f"a_{t}")[...]),
                      "b": host(getattr(adapters, f"b_{t}")[...])}
        for layer in range(L):
            mod = adapters.module(layer, t)
            a, b = (shared["a"], shared["b"]) if shared else (host(mod["a"]), host(mod["b"]))
            modules[(layer, t)] = ModuleAdapter(
                a=a, b=b, scale=spec.scale,
                u=host(mod["u"]) if "u" in mod else None,
                w=host(mod["v"]) if "v" in mod else None,
                m=host(mod["m"]) if "m" in mod else None)
    return Adapter(name=name, variant=spec.variant, modules=modules,
                   info={"rank": spec.rank, "rslora": spec.rslora})
