"""Hugging Face PEFT adapter directories: adapter_config.json + adapter_model.safetensors.

Reads LoRA, rsLoRA and DoRA adapters of Llama-family models, honouring r, lora_alpha,
use_rslora, use_dora, target_modules (list, regex or "all-linear"), exclude_modules,
layers_to_transform, rank_pattern and alpha_pattern; refuses, naming the file and key, what it cannot serve
exactly (modules_to_save, biases, other PEFT types, pickled weights, fan_in_fan_out). Writes
LoRA and DoRA adapters back in the same format. Tied-LoRA has no PEFT form (see native.py).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jlora.adapters import PEFT_MODULES, TARGETS, Adapter, ModuleAdapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
                  r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")
_MODULE_TARGET = {v.split(".")[1]: t for t, v in PEFT_MODULES.items()}   # q_proj -> q


def module_name(layer: int, target: str) -> str:
    """The module's name inside the base model, as PEFT's patterns see it."""
    return f"model.layers.{layer}.{PEFT_MODULES[target]}"


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _targeted(config: dict, n_layers: int, path: Path) -> set[tuple[int, str]]:
    """The (layer, target) pairs the config says the adapter covers, as PEFT decides it
    (its check_target_module_exists): exclude_modules first; a regex must match the whole
    name; a list entry matches a full name exactly, or a name's last parts, and only the
    latter are limited to layers_to_transform."""
    targets, exclude = config.get("target_modules"), config.get("exclude_modules")
    layers = config.get("layers_to_transform")
    names = lambda v: isinstance(v, str) or (   # noqa: E731
        isinstance(v, list) and all(isinstance(m, str) for m in v))
    for key, value, ok in (
            ("target_modules", targets, names(targets)),
            ("exclude_modules", exclude, exclude is None or names(exclude)),
            ("layers_to_transform", layers, layers is None or isinstance(layers, int) or (
                isinstance(layers, list) and all(isinstance(i, int) for i in layers)))):
        if not ok:
            what = "an integer or a list of integers" if key == "layers_to_transform" else \
                "a list of module names, a regex" + (" or 'all-linear'" if key[0] == "t" else "")
            raise ValueError(f"{path / CONFIG}: key {key!r} is {value!r}; expected {what}")

    def suffix_of(name, entries):
        return any(name.endswith("." + m) for m in entries)

    def hit(layer: int, name: str) -> bool:
        if exclude and (re.fullmatch(exclude, name) if isinstance(exclude, str)
                        else name in exclude or suffix_of(name, exclude)):
            return False
        if targets == "all-linear":
            return True
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        if name in targets:
            return True
        if not suffix_of(name, targets):
            return False
        if layers is None or layers == []:
            return True
        return layer == layers if isinstance(layers, int) else layer in layers

    return {(layer, t) for layer in range(n_layers) for t in TARGETS
            if hit(layer, module_name(layer, t))}


def _check_config(config: dict, path: Path) -> None:
    where = path / CONFIG

    def refuse(key, why):
        raise ValueError(f"{where}: key {key!r}: {why}")

    if config.get("peft_type") != "LORA":
        refuse("peft_type", f"{config.get('peft_type')!r} is not supported; supported: 'LORA'")
    if config.get("modules_to_save"):
        refuse("modules_to_save", f"{config['modules_to_save']} would replace whole base "
               "modules per adapter, which a shared base model cannot serve")
    if config.get("bias", "none") != "none":
        refuse("bias", f"{config['bias']!r} trains base-model biases; only 'none' is served")
    if config.get("lora_bias"):
        refuse("lora_bias", "LoRA biases are not supported")
    if config.get("fan_in_fan_out"):
        refuse("fan_in_fan_out", "true is for Conv1D (GPT-2) layers; Llama models use false")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            refuse(key, f"{config.get(key)!r} must be a positive number")


def read_peft(path: str | Path, n_layers: int, name: str | None = None) -> Adapter:
    """Read a PEFT LoRA/DoRA adapter directory for a base model of n_layers layers (shapes are
    checked later, against the model)."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG}: not a PEFT adapter directory")
    try:
        config = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / CONFIG} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG} must hold a JSON object, not a "
                         f"{type(config).__name__}")
    _check_config(config, path)
    if not (path / WEIGHTS).is_file():
        pickled = [p.name for p in path.glob("*.bin")]
        hint = f"; found {pickled}: pickled weights are not loaded (they can run code), " \
               "save with safe_serialization=True" if pickled else ""
        raise FileNotFoundError(f"{path} has no {WEIGHTS}{hint}")
    try:
        with safe_open(str(path / WEIGHTS), framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path / WEIGHTS} is not a readable safetensors file: {e}") from None

    parts: dict[tuple[int, str], dict] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None or match.group(3) not in _MODULE_TARGET:
            raise ValueError(f"{path / WEIGHTS}: key {key!r} is not a LoRA tensor of one of "
                             f"the modules {sorted(_MODULE_TARGET)} of a Llama-family model")
        layer, target = int(match.group(1)), _MODULE_TARGET[match.group(3)]
        kind = match.group(4).split(".")[0]
        parts.setdefault((layer, target), {})[kind] = value.astype(np.float32)

    use_dora, rslora = bool(config.get("use_dora")), bool(config.get("use_rslora"))
    expected = _targeted(config, n_layers, path)
    if set(parts) != expected:
        extra, missing = sorted(set(parts) - expected), sorted(expected - set(parts))
        raise ValueError(f"{path}: the weights do not match key 'target_modules' / "
                         f"'layers_to_transform' of {CONFIG}: unexpected modules "
                         f"{extra[:4]}, missing modules {missing[:4]}")
    modules = {}
    for (layer, target), p in sorted(parts.items()):
        mname = module_name(layer, target)
        if "lora_A" not in p or "lora_B" not in p:
            raise ValueError(f"{path / WEIGHTS}: module {mname} lacks lora_A or lora_B")
        if use_dora != ("lora_magnitude_vector" in p):
            raise ValueError(f"{path / WEIGHTS}: module {mname}: key use_dora={use_dora} but "
                             "the lora_magnitude_vector is " + ("missing" if use_dora else
                                                               "present"))
        r = p["lora_A"].shape[0]
        want_r = _pattern_value(config.get("rank_pattern") or {}, mname, config["r"])
        if r != want_r:
            raise ValueError(f"{path / WEIGHTS}: module {mname} has rank {r} but "
                             f"{CONFIG} (r / rank_pattern) says {want_r}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, mname, config["lora_alpha"])
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        modules[(layer, target)] = ModuleAdapter(a=p["lora_A"], b=p["lora_B"], scale=scale,
                                                 m=p.get("lora_magnitude_vector"))
    if not modules:
        raise ValueError(f"{path / WEIGHTS} holds no LoRA tensors")
    return Adapter(name=name or path.name, variant="dora" if use_dora else "lora",
                   modules=modules, source=str(path),
                   info={"base_model_name_or_path": config.get("base_model_name_or_path")})


def write_peft(adapter: Adapter, path: str | Path, base_model: str | None = None) -> Path:
    """Write a LoRA or DoRA adapter as a PEFT directory (per-module ranks via rank_pattern)."""
    if adapter.variant == "tied":
        raise ValueError(f"adapter {adapter.name!r} is Tied-LoRA, which PEFT cannot represent; "
                         "save it in the native format")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ranks = {module_name(l, t): m.rank for (l, t), m in adapter.modules.items()}
    alphas = {module_name(l, t): m.scale * m.rank for (l, t), m in adapter.modules.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    tensors = {}
    for (layer, target), m in adapter.modules.items():
        prefix = f"base_model.model.{module_name(layer, target)}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(m.a, np.float32)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(m.b, np.float32)
        if adapter.variant == "dora":
            tensors[f"{prefix}.lora_magnitude_vector"] = np.ascontiguousarray(m.m, np.float32)
    targets = sorted({PEFT_MODULES[t].split(".")[1] for _, t in adapter.modules})
    layers = sorted({l for l, _ in adapter.modules})
    if len(adapter.modules) != len(targets) * len(layers):   # not every target in every layer:
        targets, layers = sorted(ranks), None                  # name each module in full
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": targets, "use_dora": adapter.variant == "dora",
        "use_rslora": False, "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False,
        "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": layers, "layers_pattern": "layers" if layers else None,
        "rank_pattern": {f"^{re.escape(n)}": v for n, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{re.escape(n)}": v for n, v in alphas.items() if v != alpha},
        "base_model_name_or_path": base_model or adapter.info.get("base_model_name_or_path"),
    }
    (path / CONFIG).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(path / WEIGHTS))
    return path
