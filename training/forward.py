"""The training forward and loss: the jlora model with a trainable `Adapters` module.

The base params go in as a pytree (bfloat16 or float32) and are only read; the adapter math
runs in float32 (`training.modules.TrainLora`). The loss is the mean next-token cross
entropy over the tokens a mask selects (a completion's, not its prompt's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.config import ModelConfig
from jlora.model import forward, init_cache, logits
from training.modules import Adapters, TrainLora


def train_logits(base_params: dict, cfg: ModelConfig, adapters: Adapters, tokens: jax.Array,
                 dropout_key: jax.Array | None = None) -> jax.Array:
    """Float32 logits [B, T, V] of tokens [B, T] from position 0, with the adapter applied
    (dropout on its branch when a key is given)."""
    B, T = tokens.shape
    cache = init_cache(cfg, B, T, base_params["embed"].dtype)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    h, _ = forward(base_params, cfg, tokens, positions, cache, "xla",
                   TrainLora(adapters, base_params, dropout_key))
    return logits(base_params, cfg, h)


def masked_loss(logits_: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross entropy of predicting tokens[:, 1:] where mask[:, 1:] is set."""
    logprobs = jax.nn.log_softmax(logits_[:, :-1], axis=-1)
    target = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]
    weight = mask[:, 1:].astype(jnp.float32)
    return -(target * weight).sum() / jnp.maximum(weight.sum(), 1.0)
