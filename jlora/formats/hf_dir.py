"""Hugging Face model directories: config.json + safetensors (one file or sharded) -> params.

Reads Llama, Mistral and Qwen2 configs (both the classic `rope_theta`/`rope_scaling` keys and
transformers 5's `rope_parameters`), checks every tensor's shape against the config, and
returns numpy weights in jlora's [in, out] layout. Pickled `.bin` checkpoints are refused.
This module does not put anything on a device.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from jlora.config import ModelConfig, RopeScaling
from jlora.formats.checks import check_shape
from jlora.model import layer_shapes, pack_layer
from jlora.values import is_int, is_real

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_HF_LAYER_NAMES = {  # jlora name -> (HF suffix under model.layers.N, transposed)
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True), "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True), "wo": ("self_attn.o_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False), "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True), "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}


def read_json(path: Path) -> dict:
    """A JSON file that must hold an object."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def config_from_hf(hf: dict, name: str = "hf") -> ModelConfig:
    """A ModelConfig from the contents of a transformers config.json."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{name}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{name}: hidden_act {act!r} is not supported; supported: 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if model_type == "llama" and hf.get(flag):
            raise ValueError(f"{name}: {flag}=true is not supported for llama models")

    def need(table: dict, key: str, where: str, kind=int):
        """table[key] as `kind`, or a ValueError naming the key."""
        what = "a number" if kind is float else "an integer"
        if key not in table:
            raise ValueError(f"{name}: config.json{where} has no key {key!r} ({what})")
        value = table[key]
        if not (is_real(value) if kind is float else is_int(value)):
            raise ValueError(f"{name}: config.json{where} key {key!r} is {value!r}; it must "
                             f"be {what}")
        return kind(value)

    for key in ("rope_parameters", "rope_scaling"):
        if not isinstance(hf.get(key) or {}, dict):
            raise ValueError(f"{name}: config.json key {key!r} must be an object, got "
                             f"{hf[key]!r}")
    rope = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})   # transformers 4's key: its type wins
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = legacy.get("rope_type", legacy.get("type")) or \
        rope.get("rope_type", rope.get("type", "default"))
    rope.update(legacy)
    where = "'s rope scaling"
    scaling = None
    if kind == "llama3":
        scaling = RopeScaling("llama3", need(rope, "factor", where, float),
                              need(rope, "low_freq_factor", where, float),
                              need(rope, "high_freq_factor", where, float),
                              need(rope, "original_max_position_embeddings", where))
    elif kind == "linear":
        scaling = RopeScaling("linear", need(rope, "factor", where, float))
    elif kind != "default":
        raise ValueError(f"{name}: rope scaling type {kind!r} is not supported; supported: "
                         "default, linear, llama3")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size"):
        need(hf, key, "")
    n_heads = hf["num_attention_heads"]
    max_len = hf.get("max_position_embeddings", 4096)
    window = hf.get("sliding_window")
    if window and (model_type == "mistral" or hf.get("use_sliding_window")):
        # Within the window, sliding-window attention is plain causal attention: serve that.
        max_len = min(max_len, window)
    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    return ModelConfig(
        name=name, vocab_size=hf["vocab_size"], dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        ffn_dim=hf["intermediate_size"], max_seq_len=max_len, rope_theta=float(rope_theta),
        rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2", bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: key 'weight_map' must map tensor names to shard "
                             f"files, got {weight_map!r}")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.glob("*.bin"))
        hint = (f"; found {pickled}: pickled PyTorch checkpoints are not loaded (they can run "
                "code); convert them to safetensors") if pickled else ""
        raise FileNotFoundError(f"{path} has no *.safetensors weights{hint}")
    return files


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="numpy") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{file} is not a readable safetensors file: {e}") from None
    return tensors


def load_hf_dir(path: str | Path) -> tuple[ModelConfig, dict]:
    """Config and numpy params ([in, out] layout, the checkpoint's dtype) of a model directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    cfg = config_from_hf(read_json(path / "config.json"), name=path.name)
    tensors = read_tensors(path)

    def take(key: str, shape: tuple, transpose: bool = False) -> np.ndarray:
        if key not in tensors:
            raise ValueError(f"{path}: tensor {key!r} is missing from the weights")
        w = tensors[key]
        w = w.T if transpose else w
        check_shape(w, shape, f"{path}: tensor {key!r}")
        return np.ascontiguousarray(w)

    D, V = cfg.dim, cfg.vocab_size
    layers = [pack_layer({name: take(f"model.layers.{i}.{_HF_LAYER_NAMES[name][0]}", shape,
                                     _HF_LAYER_NAMES[name][1])
                          for name, shape in layer_shapes(cfg).items()})
              for i in range(cfg.n_layers)]
    params = dict(embed=take("model.embed_tokens.weight", (V, D)), layers=layers,
                  final_norm=take("model.norm.weight", (D,)))
    if not cfg.tie_embeddings:
        params["lm_head"] = take("lm_head.weight", (D, V), transpose=True)
    return cfg, params
