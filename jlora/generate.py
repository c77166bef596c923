"""Batch text generation: the jitted prefill and decode steps and the loop around them.

`generate(model, prompts, params)` runs a batch of prompts (text, chat or token ids) to
completion: one jitted prefill of the padded batch, then one jitted decode step per token,
each a single compiled program (all layers and sampling). Shapes are bucketed to powers of
two so that batches of similar size reuse compiled programs. Stop conditions (EOS, stop
token ids, stop strings, max_tokens, the context limit) are checked on the host.

This is the offline path; the serving engine (continuous batching, paged KV) is `serving/`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import ModelConfig
from jlora.loader import Model
from jlora.model import (KVCache, LoraContext, Params, forward, init_cache, logits,
                         rows_as_segments)
from pallas_kernels.lora import LoraBatch
from jlora.sampling import SamplingArrays, SamplingParams, make_sampling_arrays, sample, seed_key
from jlora.tokenizer import IncrementalDecoder
from pallas_kernels import default_impl

Prompt = str | Sequence[int] | Sequence[dict]   # text, token ids, or chat messages


@dataclass
class Completion:
    text: str
    token_ids: list[int]            # generated tokens only (a final EOS included)
    finish_reason: str              # "stop" (EOS, stop token or string) or "length"
    prompt_token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames="cache")
def prefill_step(params: Params, cache: KVCache, tokens: jax.Array, lengths: jax.Array,
                 sampling: SamplingArrays, bank=None, row_slots: jax.Array | None = None, *,
                 cfg: ModelConfig, impl: str = "xla"):
    """Prefill right-padded prompts tokens [B, T] of lengths [B]; sample each row's next token.

    With a bank (`BankArrays`), row b runs with adapter slot row_slots[b] (0: none).
    """
    B, T = tokens.shape
    steps = jnp.arange(T)[None, :]
    positions = jnp.where(steps < lengths[:, None], steps, cache.length)  # padding: dropped
    lora = None if bank is None else LoraContext(bank, rows_as_segments(row_slots, T))
    h, cache = forward(params, cfg, tokens, positions, cache, impl, lora)
    last = h[jnp.arange(B), jnp.maximum(lengths - 1, 0)]               # [B, D]
    next_tokens, logprobs = sample(logits(params, cfg, last), sampling)
    return next_tokens, logprobs, cache


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames="cache")
def decode_step(params: Params, cache: KVCache, tokens: jax.Array, positions: jax.Array,
                sampling: SamplingArrays, bank=None, row_slots: jax.Array | None = None, *,
                cfg: ModelConfig, impl: str = "xla"):
    """One token per row: tokens [B] at positions [B] (cache length = inactive row)."""
    lora = None if bank is None else LoraContext(bank, LoraBatch(token_slots=row_slots))
    h, cache = forward(params, cfg, tokens[:, None], positions[:, None], cache, impl, lora)
    next_tokens, logprobs = sample(logits(params, cfg, h[:, 0]), sampling)
    return next_tokens, logprobs, cache


def bucket(n: int, minimum: int = 1, cap: int | None = None) -> int:
    """The smallest power of two >= max(n, minimum), at most cap."""
    size = max(minimum, 1 << max(n - 1, 0).bit_length())
    return min(size, cap) if cap else size


def encode_prompt(model: Model, prompt: Prompt, chat: bool) -> list[int]:
    tok = model.tokenizer
    if isinstance(prompt, str):
        if tok is None:
            raise ValueError(f"model {model.source!r} has no tokenizer (random-weight preset); "
                             "give prompts as token ids")
        return tok.encode_chat([{"role": "user", "content": prompt}]) if chat \
            else tok.encode(prompt)
    items = list(prompt)
    if items and all(isinstance(m, dict) for m in items):
        if tok is None:
            raise ValueError(f"model {model.source!r} has no tokenizer for chat messages")
        return tok.encode_chat(items)
    V = model.config.vocab_size
    bad = [t for t in items if not isinstance(t, (int, np.integer)) or isinstance(t, bool)
           or not 0 <= t < V]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {V}) "
                         "(token ids are integers)")
    return [int(t) for t in items]


def generate(model: Model, prompts: Sequence[Prompt],
             params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
             chat: bool = True, impl: str | None = None,
             adapters: Sequence[str | None] | None = None) -> list[Completion]:
    """Generate a completion for each prompt, all in one batch.

    `adapters[i]` names the loaded adapter prompt i runs with (None or "": the base model).
    `impl` picks the kernels: "pallas" (GPU) or "xla"; by default Pallas on a GPU.
    """
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
    if not prompts:
        return []
    adapters = list(adapters) if adapters is not None else [None] * len(prompts)
    if len(adapters) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapter names")
    if any(adapters) and model.bank is None:
        raise ValueError(f"requests name adapters {sorted(set(filter(None, adapters)))} but "
                         "none is loaded")
    slots = [model.bank.slot_of(a) if model.bank is not None else 0 for a in adapters]
    prompt_ids = [encode_prompt(model, p, chat) for p in prompts]
    cfg = model.config
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        if len(ids) > cfg.max_seq_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, more than the model's context "
                             f"of {cfg.max_seq_len} tokens")
        if params[i].stop and model.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
    return _run(model, prompt_ids, list(params), slots, impl or default_impl())


def _run(model: Model, prompt_ids: list[list[int]], params: list[SamplingParams],
         slots: list[int], impl: str) -> list[Completion]:
    cfg, n = model.config, len(prompt_ids)
    lengths = np.array([len(p) for p in prompt_ids], np.int32)
    B = bucket(n)
    S = bucket(max(int(lengths[i]) + params[i].max_tokens for i in range(n)), 64,
               cap=cfg.max_seq_len)
    T = bucket(int(lengths.max()), 16, cap=S)
    tokens = np.zeros((B, T), np.int32)
    for i, ids in enumerate(prompt_ids):
        tokens[i, :len(ids)] = ids
    keys = np.stack([seed_key(p.seed) for p in params])
    padded_lengths = np.concatenate([lengths, np.zeros(B - n, np.int32)])

    cache = init_cache(cfg, B, S, model.dtype)
    bank = model.bank.arrays if model.bank is not None else None
    row_slots = np.array(slots + [0] * (B - n), np.int32)
    sampling = make_sampling_arrays(params, keys, [0] * n, B)
    next_tokens, logprobs, cache = prefill_step(model.params, cache, tokens, padded_lengths,
                                                sampling, bank, row_slots, cfg=cfg, impl=impl)
    rows = [_Row(model, prompt_ids[i], params[i]) for i in range(n)]
    while True:
        toks, lps = np.asarray(next_tokens), np.asarray(logprobs)
        for i, row in enumerate(rows):
            if row.finish_reason is None:
                row.add(int(toks[i]), float(lps[i]), context_full=lengths[i] + len(row.ids) >= S)
        active = [row.finish_reason is None for row in rows]
        if not any(active):
            break
        positions = np.full(B, S, np.int32)
        feed = np.zeros(B, np.int32)
        for i, row in enumerate(rows):
            if active[i]:
                positions[i] = lengths[i] + len(row.ids) - 1
                feed[i] = row.ids[-1]
        sampling = make_sampling_arrays(params, keys, [len(r.ids) for r in rows], B)
        next_tokens, logprobs, cache = decode_step(model.params, cache, feed, positions,
                                                   sampling, bank, row_slots, cfg=cfg,
                                                   impl=impl)
    return [row.completion() for row in rows]


class _Row:
    """One request's generated tokens and stop-condition bookkeeping (host side)."""

    def __init__(self, model: Model, prompt_ids: list[int], params: SamplingParams):
        self.prompt_ids, self.params = prompt_ids, params
        self.tokenizer = model.tokenizer
        self.stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_ids |= set(model.config.eos_token_ids)
        self.decoder = IncrementalDecoder(model.tokenizer) if params.stop else None
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.text: str | None = None   # set when a stop string cut the text

    def add(self, token: int, logprob: float, context_full: bool) -> None:
        self.ids.append(token)
        self.logprobs.append(logprob)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return
        if self.decoder is not None:
            self.decoder.push(token)
            hits = [self.decoder.text.find(s) for s in self.params.stop]
            hits = [h for h in hits if h >= 0]
            if hits:
                self.text, self.finish_reason = self.decoder.text[:min(hits)], "stop"
                return
        if len(self.ids) >= self.params.max_tokens or context_full:
            self.finish_reason = "length"

    def completion(self) -> Completion:
        text = self.text
        if text is None:
            text = self.tokenizer.decode(self.ids) if self.tokenizer else ""
        return Completion(text, self.ids, self.finish_reason, self.prompt_ids, self.logprobs)
