"""Tokenizer and chat template: Hugging Face `tokenizers` underneath, jinja2 for templates.

Built from a model directory's tokenizer.json (+ tokenizer_config.json) or from a GGUF file's
vocabulary and merges (`from_gguf_metadata`). Raw prompts are encoded with the model's own
special tokens (BOS where the model wants one); chat prompts are rendered by the model's
template, which writes its own BOS, and encoded without adding any.

This module does not know about models, batches or sampling.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Sequence

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

# The pre-tokenizer split rules llama.cpp names in `tokenizer.ggml.pre` (GGUF metadata).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
_LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                 r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
GGUF_PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2")
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


class Tokenizer:
    """Text <-> token ids, special tokens, and the chat template of one model."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, chat_template: str | None = None,
                 extra_eos_ids: Sequence[int] = ()):
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template
        eos_ids = [backend.token_to_id(eos_token)] if eos_token else []
        self.eos_token_ids = tuple(dict.fromkeys(i for i in [*eos_ids, *extra_eos_ids]
                                                 if i is not None))
        self._template = _compile_template(chat_template) if chat_template else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; send a raw prompt instead "
                             "(--no-chat on the command line)")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"chat message {i} is {m!r}; each message must be an object "
                                 'with string "role" and "content"')
        return self._template.render(messages=list(messages),
                                     add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "",
                                     eos_token=self.eos_token or "")

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        return self.encode(self.render_chat(messages), add_special_tokens=False)

    @classmethod
    def from_dir(cls, path: str | Path, extra_eos_ids: Sequence[int] = ()) -> Tokenizer:
        """Load tokenizer.json, with tokenizer_config.json (and chat_template.jinja) if present."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json (only the fast-tokenizer "
                                    "format is supported, not tokenizer.model alone)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:
            raise ValueError(f"{tok_file} is not a valid tokenizer.json: {e}") from None
        config = _read_json(path / "tokenizer_config.json") or {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        return cls(backend, bos_token=_token_text(config.get("bos_token")),
                   eos_token=_token_text(config.get("eos_token")), chat_template=template,
                   extra_eos_ids=extra_eos_ids)

    @classmethod
    def from_gguf_metadata(cls, meta: dict, source: str = "GGUF file") -> Tokenizer:
        """Build a byte-level BPE tokenizer from GGUF `tokenizer.ggml.*` metadata."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"{source}: tokenizer.ggml.model={kind!r} is not supported; "
                             "supported: 'gpt2' (byte-level BPE with merges)")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported; "
                             f"supported: {', '.join(GGUF_PRE_TOKENIZERS)}")
        tokens = meta["tokenizer.ggml.tokens"]
        types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges,
                                                  ignore_merges=pre in ("llama-bpe", "llama3")))
        backend.pre_tokenizer = _gguf_pre_tokenizer(pre)
        if pre == "qwen2":
            backend.normalizer = normalizers.NFC()
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, types) if ty == _GGUF_CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _GGUF_USER_DEFINED])
        bos_id = meta.get("tokenizer.ggml.bos_token_id")
        eos_id = meta.get("tokenizer.ggml.eos_token_id")
        bos = tokens[bos_id] if bos_id is not None else None
        if bos is not None and meta.get("tokenizer.ggml.add_bos_token", False):
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
        eot = meta.get("tokenizer.ggml.eot_token_id")
        return cls(backend, bos_token=bos,
                   eos_token=tokens[eos_id] if eos_id is not None else None,
                   chat_template=meta.get("tokenizer.chat_template"),
                   extra_eos_ids=[eot] if eot is not None else [])


def _gguf_pre_tokenizer(pre: str):
    byte_level = lambda regex: pre_tokenizers.ByteLevel(  # noqa: E731
        add_prefix_space=False, trim_offsets=True, use_regex=regex)
    if pre in ("default", "gpt2"):
        return byte_level(True)
    if pre == "smollm":  # llama.cpp: digits split one by one, then the GPT-2 rule
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        byte_level(True)])
    split = _LLAMA3_SPLIT if pre in ("llama-bpe", "llama3") else _QWEN2_SPLIT
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"), byte_level(False)])


def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox, with the helpers HF templates expect."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise ValueError(f"chat template error: {message}")

    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False,
                                                                   indent=indent)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the model's chat template does not parse: {e}") from None


def _token_text(token) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


class IncrementalDecoder:
    """Turns a growing list of generated token ids into text deltas.

    Decodes a short window that starts a little before the new tokens, so tokenizers that
    drop a leading space still join words right; holds back text that ends in an incomplete
    UTF-8 sequence until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # start of the window decoded for context
        self._read = 0    # tokens before this are already in self.text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        window = self.tokenizer.decode(self.ids[self._prefix:])
        if len(window) <= len(before) or window.endswith("\ufffd"):
            return ""
        delta = window[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The text held back at the end of a finished sequence (an incomplete UTF-8
        sequence, decoded as U+FFFD), added to `text`."""
        if self._read == len(self.ids):
            return ""
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        delta = self.tokenizer.decode(self.ids[self._prefix:])[len(before):]
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta
