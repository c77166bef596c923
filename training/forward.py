"""The training forward and loss: the jlora model with a trainable `Adapters` module.

The base params go in as a pytree (bfloat16 or float32) and are only read; the adapter math
runs in float32 (`training.modules.TrainLora`). Rows may be packed: several examples side by
side in one row, told apart by segment ids, each attending only to its own earlier tokens
and with positions restarting at 0, so a packed example computes exactly what it computes
alone. There is no KV cache: the layers attend to the row's own keys and values. The loss is
the mean next-token cross entropy over the tokens a mask selects (a completion's, not its
prompt's), never across two examples' boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.config import ModelConfig
from jlora.model import logits, masked_attention, run_layers
from training.modules import Adapters, TrainLora


def train_logits(base_params: dict, cfg: ModelConfig, adapters: Adapters, tokens: jax.Array,
                 dropout_key: jax.Array | None = None, *, segments: jax.Array | None = None,
                 positions: jax.Array | None = None, remat: bool = False) -> jax.Array:
    """Float32 logits [B, T, V] of tokens [B, T], with the adapter applied (dropout on its
    branch when a key is given). segments [B, T] (default: one example per row) and
    positions [B, T] (default: 0, 1, ...) describe packed rows (`training.data.pack`). remat:
    gradient checkpointing per layer (`jlora.model.run_layers`)."""
    B, T = tokens.shape
    if segments is None:
        segments = jnp.zeros((B, T), jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    order = jnp.arange(T)
    visible = ((order[None, :, None] >= order[None, None, :])                  # [1, T, T]
               & (segments[:, :, None] == segments[:, None, :]))               # [B, T, T]

    def attend(q, new, kv):  # k, v [B, T, G, E] -> [B, G, T, E]
        k, v = new.split()
        return masked_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                visible), kv

    nothing = (None,) * cfg.n_layers
    h, _ = run_layers(base_params, cfg, tokens, positions, attend, (nothing, nothing), "xla",
                      TrainLora(adapters, base_params, dropout_key), remat=remat)
    return logits(base_params, cfg, h)


def masked_loss(logits_: jax.Array, tokens: jax.Array, mask: jax.Array,
                segments: jax.Array | None = None) -> jax.Array:
    """Mean cross entropy of predicting tokens[:, 1:] where mask[:, 1:] is set (and, in
    packed rows, the token before is of the same example)."""
    total, count = summed_loss(logits_, tokens, mask, segments)
    return total / jnp.maximum(count, 1.0)


def summed_loss(logits_: jax.Array, tokens: jax.Array, mask: jax.Array,
                segments: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum of the cross entropies `masked_loss` averages, how many tokens it sums)."""
    logprobs = jax.nn.log_softmax(logits_[:, :-1], axis=-1)
    target = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]
    weight = loss_weight(mask, segments).astype(jnp.float32)
    return -(target * weight).sum(), weight.sum()


def loss_weight(mask, segments=None):
    """[B, T - 1] bool: which next-token predictions count in the loss (numpy or jax)."""
    weight = mask[:, 1:].astype(bool)
    if segments is not None:
        weight = weight & (segments[:, 1:] == segments[:, :-1])
    return weight
