"""Training data: JSONL examples to token ids with a loss mask, and fixed-shape batches.

A line is `{"prompt": str, "completion": str}` or `{"messages": [{"role", "content"}, ...]}`
(the last message is the assistant's answer to learn). The prompt goes through the model's
chat template (with the generation prompt), the completion is followed by EOS, and only the
completion's tokens (EOS included) count in the loss. Batches are padded to one sequence
length so the train step compiles once. No packing yet: one example per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jlora.jsonl import read_objects
from jlora.tokenizer import Tokenizer


@dataclass
class Example:
    tokens: np.ndarray     # [n] int32: prompt then completion
    mask: np.ndarray       # [n] bool: the completion's tokens


def example(prompt_ids, completion_ids) -> Example:
    ids = np.asarray(list(prompt_ids) + list(completion_ids), np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(prompt_ids):] = True
    return Example(ids, mask)


def encode(tokenizer: Tokenizer, record: dict, eos_id: int | None, chat: bool = True,
           where: str = "example") -> Example:
    """One JSONL record as token ids and mask (see the module docstring)."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or len(messages) < 2 or \
                messages[-1].get("role") != "assistant":
            raise ValueError(f"{where}: 'messages' must be a list ending with the assistant's "
                             "message to learn")
        prompt = tokenizer.encode_chat(messages[:-1])
        completion = messages[-1].get("content")
    elif "prompt" in record and "completion" in record:
        prompt = tokenizer.encode_chat([{"role": "user", "content": record["prompt"]}]) \
            if chat else tokenizer.encode(record["prompt"])
        completion = record["completion"]
    else:
        raise ValueError(f"{where}: needs 'prompt' and 'completion', or 'messages'; got keys "
                         f"{sorted(record)}")
    if not isinstance(completion, str) or not completion:
        raise ValueError(f"{where}: the completion must be a non-empty string")
    ids = tokenizer.encode(completion) + ([eos_id] if eos_id is not None else [])
    return example(prompt, ids)


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


def batches(examples: list[Example], batch_size: int, seq_len: int, pad_id: int = 0,
            drop_last: bool = False):
    """(tokens [B, S] int32, mask [B, S] bool) batches; examples longer than S are cut, the
    last batch is filled with empty rows (mask all False) unless dropped."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        if drop_last and len(chunk) < batch_size:
            return
        tokens = np.full((batch_size, seq_len), pad_id, np.int32)
        mask = np.zeros((batch_size, seq_len), bool)
        for i, e in enumerate(chunk):
            n = min(len(e.tokens), seq_len)
            tokens[i, :n], mask[i, :n] = e.tokens[:n], e.mask[:n]
        yield tokens, mask
