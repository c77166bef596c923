"""Frozen configuration dataclasses and the named shape presets.

A `ModelConfig` describes one Llama-family architecture (Llama 2/3, Mistral, Qwen2, SmolLM2).
It is hashable, so jitted functions take it as a static argument. Reading configs out of
files lives in `jlora/formats/`; this module knows no file format.

Dimension glossary (used across jlora): T tokens, B sequences, D model dim, F ffn dim,
H query heads, G kv heads, E head dim, V vocabulary, L layers, S cache length.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ROPE_SCALING_KINDS = ("llama3", "linear")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `llama3` (Llama 3.1's piecewise rule) or `linear`."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.kind not in ROPE_SCALING_KINDS:
            raise ValueError(f"rope scaling kind {self.kind!r} is not supported; "
                             f"supported: {', '.join(ROPE_SCALING_KINDS)}")
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                             f"{self.high_freq_factor} and {self.low_freq_factor}")


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family architecture: pre-norm GQA attention with RoPE and a SwiGLU MLP."""

    name: str
    vocab_size: int           # V
    dim: int                  # D
    n_layers: int             # L
    n_heads: int              # H
    n_kv_heads: int           # G
    head_dim: int             # E
    ffn_dim: int              # F
    max_seq_len: int          # the longest context served (prompt + generated tokens)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None  # GGUF's rope_freqs: inv_freq / factor
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False    # Qwen2 adds a bias to the q, k and v projections
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    tp: int = 1               # shards the fused weights' columns are grouped for (model.py)

    def __post_init__(self):
        for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                      "ffn_dim", "max_seq_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model config {self.name!r}: {field} must be a positive "
                                 f"integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model config {self.name!r}: n_heads={self.n_heads} must be a "
                             f"multiple of n_kv_heads={self.n_kv_heads}")
        if not isinstance(self.tp, int) or self.tp < 1 or any(
                n % self.tp for n in (self.n_heads, self.n_kv_heads, self.ffn_dim)):
            raise ValueError(f"model config {self.name!r}: tp={self.tp!r} must be a positive "
                             f"integer dividing n_heads={self.n_heads}, n_kv_heads="
                             f"{self.n_kv_heads} and ffn_dim={self.ffn_dim}")
        if self.head_dim % 2:
            raise ValueError(f"model config {self.name!r}: head_dim={self.head_dim} must be "
                             "even for rotary embeddings")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError(f"model config {self.name!r}: {len(self.rope_freq_factors)} rope "
                             f"frequency factors given, head_dim/2={self.head_dim // 2} needed")
        for tok in (*self.eos_token_ids, *(() if self.bos_token_id is None else
                                           (self.bos_token_id,))):
            if not 0 <= tok < self.vocab_size:
                raise ValueError(f"model config {self.name!r}: special token id {tok} is "
                                 f"outside the vocabulary [0, {self.vocab_size})")

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def n_params(self) -> int:
        """Parameter count (the embedding once when tied)."""
        D, E, H, G, F = self.dim, self.head_dim, self.n_heads, self.n_kv_heads, self.ffn_dim
        attn = D * (H + 2 * G) * E + H * E * D + (H + 2 * G) * E * self.qkv_bias
        layer = attn + 3 * D * F + 2 * D
        head = 0 if self.tie_embeddings else self.vocab_size * D
        return self.vocab_size * D + self.n_layers * layer + D + head


PRESETS: dict[str, ModelConfig] = {
    cfg.name: cfg for cfg in [
        ModelConfig(name="llama2-7b", vocab_size=32000, dim=4096, n_layers=32, n_heads=32,
                    n_kv_heads=32, head_dim=128, ffn_dim=11008, max_seq_len=4096,
                    norm_eps=1e-5, bos_token_id=1, eos_token_ids=(2,)),
        ModelConfig(name="llama3-8b", vocab_size=128256, dim=4096, n_layers=32, n_heads=32,
                    n_kv_heads=8, head_dim=128, ffn_dim=14336, max_seq_len=8192,
                    rope_theta=500000.0, norm_eps=1e-5, bos_token_id=128000,
                    eos_token_ids=(128001, 128009)),
        ModelConfig(name="smollm2-135m", vocab_size=49152, dim=576, n_layers=30, n_heads=9,
                    n_kv_heads=3, head_dim=64, ffn_dim=1536, max_seq_len=8192,
                    rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True, bos_token_id=1,
                    eos_token_ids=(2,)),
        # A model small enough for engine tests on a CPU.
        ModelConfig(name="tiny", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=16, ffn_dim=128, max_seq_len=256, bos_token_id=1,
                    eos_token_ids=(2,)),
    ]
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}") from None
