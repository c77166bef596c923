"""GGUF files of the llama architecture -> config, numpy params and tokenizer metadata.

Dequantizes F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors with the `gguf` package, undoes llama.cpp's
row permutation of the Q and K projections (it stores them for its interleaved RoPE; jlora
and PEFT use the rotate-half layout of Hugging Face), and reads Llama 3's `rope_freqs`
tensor when present. This module does not build the tokenizer or touch a device.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from jlora.config import ModelConfig, RopeScaling
from jlora.formats.checks import check_shape
from jlora.model import layer_shapes, pack_layer

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)
SUPPORTED_ARCHITECTURES = ("llama",)
_LAYER_NAMES = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
                "wo": "attn_output", "mlp_norm": "ffn_norm", "w_gate": "ffn_gate",
                "w_up": "ffn_up", "w_down": "ffn_down"}


def read_gguf(path: str | Path) -> tuple[gguf.GGUFReader, dict]:
    """The reader and all metadata fields as plain Python values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
        meta = {key: field.contents() for key, field in reader.fields.items()}
    except Exception as e:  # the reader raises many kinds on truncated or foreign files
        raise ValueError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from None
    return reader, meta


def config_from_gguf(meta: dict, tensor_names: set[str], name: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{name}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{name}: GGUF metadata key {arch}.{key} is missing")
        return value

    n_heads, dim = int(get("attention.head_count")), int(get("embedding_length"))
    head_dim = int(get("attention.key_length", dim // n_heads))
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(f"{name}: partial rotary embeddings ({rope_dims} of {head_dim} dims) "
                         "are not supported")
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    scaling = None
    if scaling_type == "linear":
        scaling = RopeScaling("linear", float(get("rope.scaling.factor")))
    elif scaling_type != "none":
        raise ValueError(f"{name}: rope scaling type {scaling_type!r} is not supported; "
                         "supported: none, linear (llama3 comes as the rope_freqs tensor)")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    return ModelConfig(
        name=name, vocab_size=int(get("vocab_size", len(tokens) or None)), dim=dim,
        n_layers=int(get("block_count")), n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)), head_dim=head_dim,
        ffn_dim=int(get("feed_forward_length")), max_seq_len=int(get("context_length")),
        rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(t for t in (eos, eot) if t is not None)))


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave of a Q or K weight [out, in]."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str | Path) -> tuple[ModelConfig, dict, dict]:
    """Config, float32 numpy params ([in, out] layout) and metadata of a llama GGUF file."""
    path = Path(path)
    reader, meta = read_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_gguf(meta, set(tensors), name=path.stem)
    if "rope_freqs.weight" in tensors:
        cfg = cfg.replace(rope_freq_factors=tuple(float(f) for f in
                                                  _dequantize(tensors["rope_freqs.weight"], path)))

    def take(key: str, shape: tuple, transpose: bool = False, heads: int = 0) -> np.ndarray:
        if key not in tensors:
            raise ValueError(f"{path}: tensor {key!r} is missing")
        w = _dequantize(tensors[key], path)
        if heads:
            w = _unpermute(w, heads)
        w = w.T if transpose else w
        check_shape(w, shape, f"{path}: tensor {key!r}")
        return np.ascontiguousarray(w)

    D, V = cfg.dim, cfg.vocab_size
    heads = {"wq": cfg.n_heads, "wk": cfg.n_kv_heads}
    layers = [pack_layer({k: take(f"blk.{i}.{_LAYER_NAMES[k]}.weight", shape,
                                  transpose=len(shape) == 2, heads=heads.get(k, 0))
                          for k, shape in layer_shapes(cfg).items()})
              for i in range(cfg.n_layers)]
    params = dict(embed=take("token_embd.weight", (V, D)), layers=layers,
                  final_norm=take("output_norm.weight", (D,)))
    if not cfg.tie_embeddings:
        params["lm_head"] = take("output.weight", (D, V), transpose=True)
    return cfg, params, meta


def _dequantize(tensor, path: Path) -> np.ndarray:
    if tensor.tensor_type not in SUPPORTED_TYPES:
        raise ValueError(f"{path}: tensor {tensor.name!r} has quantization type "
                         f"{tensor.tensor_type.name}, which is not supported; supported: "
                         f"{', '.join(t.name for t in SUPPORTED_TYPES)}")
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
