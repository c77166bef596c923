"""The jlora forward pass against Hugging Face transformers (torch, float32, CPU) as the oracle."""

import dataclasses

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jlora.formats.hf_dir import load_hf_dir
from jlora.loader import load_model
from jlora.model import full_logits, rope_frequencies
from tests.helpers import (VARIANTS, hf_logprobs, make_hf_model, quantize_roundtrip,
                           save_hf_model, write_gguf)

TOL = 1e-3  # max abs difference of log-probabilities in float32 (the bound)


def jlora_logprobs(model, tokens) -> np.ndarray:
    logits = full_logits(model.params, model.config, jnp.asarray(tokens))
    return np.asarray(jnp.asarray(logits) - jax_logsumexp(logits))


def jax_logsumexp(x):
    import jax
    return jax.nn.logsumexp(x, axis=-1, keepdims=True)


def prompt_tokens(vocab: int, batch: int = 2, length: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int32)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_directory_matches_transformers(variant, tmp_path):
    hf = make_hf_model(variant)
    model = load_model(str(save_hf_model(hf, tmp_path / variant, shard=variant == "mistral")),
                       "float32")
    tokens = prompt_tokens(hf.config.vocab_size)
    diff = np.abs(jlora_logprobs(model, tokens) - hf_logprobs(hf, tokens)).max()
    assert diff <= TOL, f"{variant}: max |dlogprob| = {diff:.2e}"


def test_sharded_checkpoint_is_read(tmp_path):
    hf = make_hf_model("mistral")
    path = save_hf_model(hf, tmp_path / "m", shard=True)
    assert len(list(path.glob("*.safetensors"))) > 1  # the test really reads several shards
    cfg, params = load_hf_dir(path)
    wq = params["layers"][1]["wqkv"][:, :cfg.n_heads * cfg.head_dim]
    np.testing.assert_array_equal(wq, hf.model.layers[1].self_attn.q_proj.weight.detach().numpy().T)


@pytest.mark.parametrize("variant", ["llama-llama3-rope", "llama-linear-rope"])
def test_rope_scaling_is_what_makes_the_match(variant, tmp_path):
    """Dropping the scaling must break agreement, so the match above is not by accident."""
    hf = make_hf_model(variant)
    model = load_model(str(save_hf_model(hf, tmp_path / variant)), "float32")
    unscaled = dataclasses.replace(model, config=model.config.replace(rope_scaling=None))
    tokens = prompt_tokens(hf.config.vocab_size)
    assert np.abs(jlora_logprobs(unscaled, tokens) - hf_logprobs(hf, tokens)).max() > 10 * TOL


def test_sliding_window_caps_the_context(tmp_path):
    hf = make_hf_model("mistral")
    model = load_model(str(save_hf_model(hf, tmp_path / "m")), "float32")
    assert model.config.max_seq_len == 128  # = sliding_window, where full attention is exact


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_matches_transformers_on_dequantized_weights(qtype, tmp_path):
    """Each supported type, with llama.cpp's Q/K permutation undone on load."""
    qt = gguf.GGMLQuantizationType[qtype]
    hf = make_hf_model("llama-gqa-untied")
    path = write_gguf(hf, tmp_path / "m.gguf", qtype=qt)
    with torch.no_grad():  # the oracle holds the weights the file really stores
        for p in hf.parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(quantize_roundtrip(p.numpy(), qt)))
    model = load_model(str(path), "float32")
    tokens = prompt_tokens(hf.config.vocab_size)
    diff = np.abs(jlora_logprobs(model, tokens) - hf_logprobs(hf, tokens)).max()
    assert diff <= TOL, f"{qtype}: max |dlogprob| = {diff:.2e}"


def test_gguf_rope_freqs_tensor_is_llama3_scaling(tmp_path):
    """Llama 3.1 GGUF files carry their rope scaling as per-frequency divisors."""
    hf = make_hf_model("llama-llama3-rope")
    hf_model = load_model(str(save_hf_model(hf, tmp_path / "hf")), "float32")
    base = hf_model.config.replace(rope_scaling=None)
    divisors = rope_frequencies(base) / rope_frequencies(hf_model.config)
    model = load_model(str(write_gguf(hf, tmp_path / "m.gguf", rope_freqs=divisors)), "float32")
    assert model.config.rope_freq_factors is not None
    tokens = prompt_tokens(hf.config.vocab_size)
    diff = np.abs(jlora_logprobs(model, tokens) - hf_logprobs(hf, tokens)).max()
    assert diff <= TOL, f"max |dlogprob| = {diff:.2e}"


def test_bfloat16_stays_close_to_float32(tmp_path):
    hf = make_hf_model("qwen2-bias")
    model = load_model(str(save_hf_model(hf, tmp_path / "m")), "bfloat16")
    assert model.dtype == jnp.bfloat16
    tokens = prompt_tokens(hf.config.vocab_size)
    diff = np.abs(jlora_logprobs(model, tokens) - hf_logprobs(hf, tokens)).max()
    assert diff <= 0.15, f"bfloat16: max |dlogprob| = {diff:.2e}"
