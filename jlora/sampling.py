"""Per-request sampling: host-side parameters, their device arrays, and the jittable sampler.

`SamplingParams` is what a user sets (validated here, with errors that name the value).
`SamplingArrays` is the per-row device form that travels inside a jitted step, and `sample`
draws one token per row from float32 logits. Each request owns a PRNG key made from its seed;
its n-th generated token is drawn with `fold_in(key, n)`, so a seeded request produces the
same tokens whatever else shares its batch.

This module does not run the model or decide when a request stops.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora.values import is_int, is_real


GREEDY_BELOW = 1e-5   # temperatures under this sample greedily (logits / 1e-38 overflow)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. temperature 0 is greedy (as is any temperature
    below GREEDY_BELOW, which would overflow the scaled logits); top_k 0 disables top-k."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        for name in ("stop", "stop_token_ids"):   # None, one value or a sequence of them
            value = getattr(self, name)
            one = isinstance(value, (str, int, np.integer)) or not hasattr(value, "__iter__")
            object.__setattr__(self, name, () if value is None else (value,) if one
                               else tuple(value))
        _check(is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens,
               "an integer >= 1")
        _check(is_real(self.temperature) and math.isfinite(self.temperature)
               and self.temperature >= 0, "temperature", self.temperature,
               "a finite number >= 0 (0 = greedy)")
        _check(is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p,
               "a number in (0, 1]")
        _check(is_int(self.top_k) and 0 <= self.top_k < 2**31, "top_k", self.top_k,
               "an integer in [0, 2**31) (0 = no top-k)")
        _check(self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**64), "seed",
               self.seed, "an integer in [0, 2**64)")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "non-empty strings")
        _check(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "non-negative integers")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "true or false")
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)


def _check(ok: bool, name: str, value, allowed: str):
    if not ok:
        raise ValueError(f"sampling parameter {name}={value!r} is invalid: must be {allowed}")


class SamplingArrays(NamedTuple):
    """Per-row sampling state for one step, each [B]; keys [B, 2] uint32 (threefry key data)."""

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    keys: jax.Array
    counters: jax.Array      # how many tokens each row has generated so far


def seed_key(seed: int | None) -> np.ndarray:
    """Threefry key data for a seed (a random one when None), as jax.random.PRNGKey makes it."""
    if seed is None:
        seed = secrets.randbits(63)
    return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)


def make_sampling_arrays(params: Sequence[SamplingParams], keys: np.ndarray,
                         counters: Sequence[int], batch: int) -> SamplingArrays:
    """Host arrays for `batch` rows; rows past len(params) are greedy padding."""
    n = len(params)
    pad = batch - n
    f32 = lambda xs, fill: np.array(list(xs) + [fill] * pad, np.float32)  # noqa: E731
    i32 = lambda xs, fill: np.array(list(xs) + [fill] * pad, np.int32)    # noqa: E731
    return SamplingArrays(
        temperature=f32((p.temperature for p in params), 0.0),
        top_p=f32((p.top_p for p in params), 1.0),
        top_k=i32((p.top_k for p in params), 0),
        keys=np.concatenate([keys[:n], np.zeros((pad, 2), np.uint32)]).astype(np.uint32),
        counters=i32(counters, 0),
    )


def _filter_top_k_top_p(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Mask logits [B, V] outside each row's top-k and nucleus (top-p) sets to -inf."""
    V = scaled.shape[-1]
    desc = -jnp.sort(-scaled, axis=-1)                                  # [B, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)          # [B, 1]
    desc = jnp.where(desc >= kth, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs                    # exclusive cumsum
    n_keep = jnp.maximum(jnp.sum(mass_before < top_p[:, None], axis=-1), 1)
    n_keep = jnp.where(top_p >= 1, V, n_keep)   # float32 sums can reach 1 before the tail
    cutoff = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)  # [B, 1]
    return jnp.where(scaled >= jnp.maximum(cutoff, kth), scaled, -jnp.inf)


SAMPLE_MODES = ("auto", "greedy", "sample")


def sample(logits: jax.Array, s: SamplingArrays,
           mode: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Pick one token per row of float32 logits [B, V].

    mode "greedy": argmax for every row (the caller knows all rows are greedy); "sample":
    every row's own settings, with no data-dependent branch (on a GPU, XLA waits on the host
    to pick a branch, which would stall a serving loop); "auto": branch on the rows, so an
    all-greedy batch skips the sort and the random draws.

    Returns token ids [B] int32 and their log-probabilities [B] under the model's
    unmodified distribution (as vLLM reports them).
    """
    if mode not in SAMPLE_MODES:
        raise ValueError(f"sampling mode {mode!r} is not one of {SAMPLE_MODES}")
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    greedy_row = s.temperature <= 0

    def draw(key_data, counter, row):
        key = jax.random.fold_in(jax.random.wrap_key_data(key_data, impl="threefry2x32"),
                                 counter)
        return jax.random.categorical(key, row)

    def stochastic(branch: bool):
        scaled = logits / jnp.where(greedy_row, 1.0, s.temperature)[:, None]
        if branch:
            needs_filter = jnp.any(~greedy_row & ((s.top_k > 0) | (s.top_p < 1)))
            scaled = jax.lax.cond(needs_filter, _filter_top_k_top_p, lambda x, *_: x,
                                  scaled, s.top_k, s.top_p)
        else:  # a row without top-k or top-p passes through the filter unchanged
            scaled = _filter_top_k_top_p(scaled, s.top_k, s.top_p)
        drawn = jax.vmap(draw)(s.keys, s.counters, scaled).astype(jnp.int32)
        return jnp.where(greedy_row, greedy, drawn)

    if mode == "greedy":
        tokens = greedy
    elif mode == "sample":
        tokens = stochastic(branch=False)
    else:
        tokens = jax.lax.cond(jnp.all(greedy_row), lambda: greedy, lambda: stochastic(True))
    return tokens, jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
