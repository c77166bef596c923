"""jlora's own adapter format: adapter.json + adapter.safetensors, for every variant.

Unlike PEFT's format it keeps Tied-LoRA tied: arrays shared by several modules (one A and
one B for all layers) are stored once under `shared.N.*` and referenced by index, so a tied
adapter's file is about 1/L of a LoRA one. Per-module tensors are `layers.L.T.{A,B,u,w,m}`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jlora.adapters import TARGETS, Adapter, ModuleAdapter
from jlora.values import is_int, is_real

META, WEIGHTS, FORMAT = "adapter.json", "adapter.safetensors", "jlora-adapter"


def write_native(adapter: Adapter, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, shared, modules = {}, {}, []
    for (layer, target), m in sorted(adapter.modules.items()):
        entry = {"layer": layer, "target": target, "rank": m.rank, "scale": m.scale}
        for key, arr in (("A", m.a), ("B", m.b)):
            users = sum(1 for o in adapter.modules.values() if (o.a if key == "A" else o.b) is arr)
            if users > 1:   # a tied array: stored once
                idx = shared.setdefault(id(arr), len(shared))
                tensors[f"shared.{idx}.{key}"] = np.ascontiguousarray(arr, np.float32)
                entry[key] = f"shared.{idx}.{key}"
            else:
                tensors[f"layers.{layer}.{target}.{key}"] = np.ascontiguousarray(arr, np.float32)
        for key, arr in (("u", m.u), ("w", m.w), ("m", m.m)):
            if arr is not None:
                tensors[f"layers.{layer}.{target}.{key}"] = np.ascontiguousarray(arr, np.float32)
        modules.append(entry)
    meta = {"format": FORMAT, "version": 1, "name": adapter.name, "variant": adapter.variant,
            "modules": modules, "info": adapter.info}
    (path / META).write_text(json.dumps(meta, indent=1))
    save_file(tensors, str(path / WEIGHTS))
    return path


def read_native(path: str | Path, name: str | None = None) -> Adapter:
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} has no {META}: not a jlora adapter directory") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / META} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path / META} must hold a JSON object, not a "
                         f"{type(meta).__name__}")
    if meta.get("format") != FORMAT or meta.get("version") != 1:
        raise ValueError(f"{path / META}: key 'format'/'version' is {meta.get('format')!r}/"
                         f"{meta.get('version')!r}; expected {FORMAT!r}/1")
    try:
        with safe_open(str(path / WEIGHTS), framework="numpy") as f:
            tensors = {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path / WEIGHTS} is not a readable safetensors file: {e}") from None
    entries = meta.get("modules", [])
    if not isinstance(entries, list):
        raise ValueError(f"{path / META}: key 'modules' must be a list of objects, got "
                         f"{type(entries).__name__}")
    for i, entry in enumerate(entries):
        _check_entry(entry, f"{path / META}: modules[{i}]")
    modules = {}
    for entry in entries:
        layer, target = entry["layer"], entry["target"]
        prefix = f"layers.{layer}.{target}"

        def get(key, required=True):
            name = entry.get(key, f"{prefix}.{key}")
            if name not in tensors:
                if required:
                    raise ValueError(f"{path / WEIGHTS}: key {name!r} is missing")
                return None
            return tensors[name]   # the same object for every user of a shared key

        modules[(layer, target)] = ModuleAdapter(
            a=get("A"), b=get("B"), scale=float(entry["scale"]), u=get("u", False),
            w=get("w", False), m=get("m", False))
    return Adapter(name=name or meta.get("name") or path.name, variant=meta.get("variant"),
                   modules=modules, source=str(path), info=meta.get("info") or {})


def _check_entry(entry, where: str) -> None:
    """One `modules` item: {"layer": int >= 0, "target": one of TARGETS, "scale": number,
    optional "A"/"B"/"u"/"w"/"m": the tensor's key}; ValueError naming the key otherwise."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object, got {entry!r}")
    checks = (("layer", lambda v: is_int(v) and v >= 0, "an integer >= 0"),
              ("target", lambda v: v in TARGETS, f"one of {TARGETS}"),
              ("scale", is_real, "a number"))
    for key, ok, allowed in checks:
        if key not in entry:
            raise ValueError(f"{where}: key {key!r} is missing ({allowed})")
        if not ok(entry[key]):
            raise ValueError(f"{where}: key {key!r} is {entry[key]!r}; must be {allowed}")
    for key in ("A", "B", "u", "w", "m"):
        if key in entry and not isinstance(entry[key], str):
            raise ValueError(f"{where}: key {key!r} is {entry[key]!r}; must be the name of "
                             "a tensor in the weights file")


def read_adapter(path: str | Path, n_layers: int, name: str | None = None) -> Adapter:
    """A PEFT directory or a native one, whichever `path` holds."""
    from jlora.formats.peft import CONFIG, read_peft
    path = Path(path)
    if (path / META).is_file():
        return read_native(path, name)
    if (path / CONFIG).is_file():
        return read_peft(path, n_layers, name)
    if not path.exists():
        raise FileNotFoundError(f"adapter path {path} does not exist")
    raise FileNotFoundError(f"{path} holds neither a PEFT adapter ({CONFIG}) nor a jlora one "
                            f"({META})")
