"""The embedded default model, SmolLM2-135M-Instruct (GGUF, Q4_1), against transformers.

transformers dequantizes the same GGUF file, so both sides hold identical weights.
"""

import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from jlora.generate import generate
from jlora.loader import embedded_model_path, load_model
from jlora.model import full_logits
from jlora.sampling import SamplingParams

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def jl():
    return load_model("smollm2", "float32")


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = embedded_model_path()
    kw = dict(gguf_file=path.name)
    tok = AutoTokenizer.from_pretrained(path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw).eval()
    return tok, model


def test_logprobs_match_transformers(jl, hf):
    text = ("The quick brown fox jumps over the lazy dog. Paris is the capital and most "
            "populous city of France, with an estimated population of just over two million "
            "residents, and the centre of the Île-de-France region.")
    tokens = np.array([jl.tokenizer.encode(text)[:32]], np.int32)
    assert tokens.shape == (1, 32)
    ours = np.asarray(jax.nn.log_softmax(full_logits(jl.params, jl.config, tokens), axis=-1))
    with torch.no_grad():
        theirs = torch.log_softmax(hf[1](torch.as_tensor(tokens, dtype=torch.long)).logits,
                                   -1).numpy()
    diff = np.abs(ours - theirs).max()
    assert diff <= 1e-3, f"max |dlogprob| = {diff:.2e}"


def test_chat_prompt_tokens_match_transformers(jl, hf):
    messages = [{"role": "user", "content": QUESTION}]
    expected = hf[0].apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert jl.tokenizer.render_chat(messages) == expected
    assert jl.tokenizer.encode_chat(messages) == hf[0](expected, add_special_tokens=False)[
        "input_ids"]


@pytest.mark.parametrize("text", ["Hello world!", "  leading spaces and\ttabs\n\nnewlines",
                                  "Ünïcödé — «quotes» and emoji 🤖", "<|im_start|>user\nhi"])
def test_tokenizer_matches_transformers(jl, hf, text):
    assert jl.tokenizer.encode(text) == hf[0](text, add_special_tokens=False)["input_ids"]
    assert jl.tokenizer.decode(jl.tokenizer.encode(text), skip_special_tokens=False) == text


def test_digits_are_split_one_by_one(jl):
    """SmolLM2's pre-tokenizer (llama.cpp 'smollm'): each digit is its own token."""
    ids = jl.tokenizer.encode("2024")
    assert [jl.tokenizer.decode([i]) for i in ids] == ["2", "0", "2", "4"]


def test_greedy_ids_match_transformers_for_30_tokens(jl, hf):
    prompt = jl.tokenizer.encode_chat([{"role": "user", "content": QUESTION}])
    out = generate(jl, [prompt], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():  # plain greedy loop: no EOS handling, like ignore_eos
        for _ in range(30):
            nxt = hf[1](ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert out.token_ids == ids[0, len(prompt):].tolist()
    assert "Paris" in out.text


def test_cli_answers_paris():
    run = subprocess.run([sys.executable, "-m", "jlora.cli", "generate", "--temperature", "0",
                          QUESTION], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout
