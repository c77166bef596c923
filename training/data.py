"""Training data: JSONL examples to token ids with a loss mask, and fixed-shape batches.

A line is `{"prompt": str, "completion": str}` or `{"messages": [{"role", "content"}, ...]}`
(the last message is the assistant's answer to learn). The prompt goes through the model's
chat template (with the generation prompt), the completion is followed by EOS, and only the
completion's tokens (EOS included) count in the loss. Batches are padded to one sequence
length so the train step compiles once. `pack` puts several examples in one row (first fit,
in the order given), each with its own segment id and positions from 0; the training
forward (`training.forward`) keeps packed examples from seeing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jlora.jsonl import read_objects
from jlora.tokenizer import Tokenizer


@dataclass
class Example:
    """One example, or a packed row of several (`pack`)."""

    tokens: np.ndarray     # [n] int32: prompt then completion
    mask: np.ndarray       # [n] bool: the completion's tokens
    segments: np.ndarray | None = None    # [n] int32: which packed example (None: all 0)
    positions: np.ndarray | None = None   # [n] int32: position in its example (None: 0..n-1)


def example(prompt_ids, completion_ids) -> Example:
    ids = np.asarray(list(prompt_ids) + list(completion_ids), np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(prompt_ids):] = True
    return Example(ids, mask)


def encode(tokenizer: Tokenizer, record: dict, eos_id: int | None, chat: bool = True,
           where: str = "example") -> Example:
    """One JSONL record as token ids and mask (see the module docstring). The completion is
    encoded without special tokens: a tokenizer that adds BOS would put it inside the text
    to learn."""
    if "messages" in record:
        messages = record["messages"]
        _check_messages(messages, where)
        prompt = tokenizer.encode_chat(messages[:-1])
        completion = messages[-1]["content"]
    elif "prompt" in record and "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise ValueError(f"{where}: {key!r} must be a string, got {record[key]!r}")
        prompt = tokenizer.encode_chat([{"role": "user", "content": record["prompt"]}]) \
            if chat else tokenizer.encode(record["prompt"])
        completion = record["completion"]
    else:
        raise ValueError(f"{where}: needs 'prompt' and 'completion', or 'messages'; got keys "
                         f"{sorted(record)}")
    if not completion:
        raise ValueError(f"{where}: the completion must be a non-empty string")
    ids = tokenizer.encode(completion, add_special_tokens=False) + (
        [eos_id] if eos_id is not None else [])
    return example(prompt, ids)


def _check_messages(messages, where: str) -> None:
    """'messages': a list of at least two {"role": str, "content": str} objects, the last
    the assistant's."""
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError(f"{where}: 'messages' must be a list of at least two messages, got "
                         f"{messages!r}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: messages[{i}] must be an object with string 'role' and "
                             f"'content', got {m!r}")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's (the answer to "
                         f"learn), got role {messages[-1]['role']!r}")


def load_jsonl(path: str | Path, tokenizer: Tokenizer, eos_id: int | None,
               chat: bool = True) -> list[Example]:
    out = [encode(tokenizer, record, eos_id, chat, where)
           for where, record in read_objects(path, "training data")]
    if not out:
        raise ValueError(f"{path} has no examples")
    return out


def split(examples: list[Example], held_out: float, seed: int = 0):
    """(train, held_out) after a seeded shuffle; held_out is a fraction in [0, 1)."""
    if not 0 <= held_out < 1:
        raise ValueError(f"held-out fraction {held_out!r} must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(len(examples))
    n = int(round(len(examples) * held_out))
    return [examples[i] for i in order[n:]], [examples[i] for i in order[:n]]


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Rows of at most seq_len tokens, each holding whole examples side by side (an example
    longer than seq_len is cut and fills a row alone). First fit in the given order: an
    example goes into the first row with room for it. Segment ids count from 1 in a row.

    Example: lengths 5, 4, 3 at seq_len 8 -> rows [5 + 3 tokens], [4 tokens]; the first row's
    segments are 1 1 1 1 1 2 2 2 and its positions 0 1 2 3 4 0 1 2.
    """
    if not (isinstance(seq_len, int) and seq_len >= 1):
        raise ValueError(f"seq_len={seq_len!r} must be an integer >= 1")
    room = np.zeros(0, np.int64)                    # free tokens per row so far
    members: list[list[int]] = []
    for i, e in enumerate(examples):
        n = min(len(e.tokens), seq_len)
        fits = np.flatnonzero(room >= n)
        if fits.size:
            room[fits[0]] -= n
            members[fits[0]].append(i)
        else:
            room = np.append(room, seq_len - n)
            members.append([i])
    return [_join([examples[i] for i in row], seq_len) for row in members]


def _join(parts: list[Example], seq_len: int) -> Example:
    cut = [slice(0, min(len(e.tokens), seq_len)) for e in parts]
    return Example(
        tokens=np.concatenate([e.tokens[c] for e, c in zip(parts, cut)]),
        mask=np.concatenate([e.mask[c] for e, c in zip(parts, cut)]),
        segments=np.concatenate([np.full(c.stop, j + 1, np.int32) for j, c in enumerate(cut)]),
        positions=np.concatenate([np.arange(c.stop, dtype=np.int32) for c in cut]))


def batches(examples: list[Example], batch_size: int, seq_len: int, pad_id: int = 0,
            drop_last: bool = False):
    """(tokens [B, S] int32, mask [B, S] bool, segments [B, S] int32, positions [B, S] int32)
    batches; examples longer than S are cut, the last batch is filled with empty rows (mask
    all False) unless dropped. Padding has segment id -1 (it sees only padding)."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        if drop_last and len(chunk) < batch_size:
            return
        tokens = np.full((batch_size, seq_len), pad_id, np.int32)
        mask = np.zeros((batch_size, seq_len), bool)
        segments = np.full((batch_size, seq_len), -1, np.int32)
        positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                    (batch_size, seq_len)).copy()
        for i, e in enumerate(chunk):
            n = min(len(e.tokens), seq_len)
            tokens[i, :n], mask[i, :n] = e.tokens[:n], e.mask[:n]
            segments[i, :n] = 0 if e.segments is None else e.segments[:n]
            if e.positions is not None:
                positions[i, :n] = e.positions[:n]
        yield tokens, mask, segments, positions
