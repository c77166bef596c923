"""Batch generation on a tiny random model with SmolLM2's tokenizer: stop rules and batching."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from jlora.config import preset
from jlora.formats.gguf_file import read_gguf
from jlora.generate import bucket, generate
from jlora.loader import Model, embedded_model_path
from jlora.model import init_params
from jlora.sampling import SamplingParams
from jlora.tokenizer import Tokenizer

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    _, meta = read_gguf(embedded_model_path())
    tok = Tokenizer.from_gguf_metadata(meta)
    cfg = preset("tiny").replace(vocab_size=49152, max_seq_len=64, eos_token_ids=(2,))
    params = init_params(cfg, jax.random.key(3), jnp.float32)
    params = jax.tree.map(lambda w: w * 4 if w.ndim == 2 else w, params)  # less uniform
    return Model(cfg, params, tok, "tiny+smollm2-tokenizer")


def test_bucket_sizes():
    assert [bucket(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]
    assert bucket(3, 16) == 16 and bucket(100, 64, cap=80) == 80


def test_max_tokens_gives_length(model):
    out = generate(model, ["Hello there"], GREEDY.replace(max_tokens=5))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    assert len(out.logprobs) == 5 and all(lp <= 0 for lp in out.logprobs)


def test_stop_token_ids_end_the_request_with_that_token(model):
    free = generate(model, ["Tell me a story"], GREEDY)[0]
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    out = generate(model, ["Tell me a story"], GREEDY.replace(stop_token_ids=(stop_at,)))[0]
    assert out.token_ids == free.token_ids[:first + 1] and out.finish_reason == "stop"


def test_eos_stops_unless_ignored(model):
    free = generate(model, ["Tell me a story"], GREEDY)[0]
    eos = free.token_ids[2]
    first = free.token_ids.index(eos)
    with_eos = dataclasses.replace(model, config=model.config.replace(eos_token_ids=(eos,)))
    out = generate(with_eos, ["Tell me a story"], GREEDY.replace(ignore_eos=False))[0]
    assert out.token_ids == free.token_ids[:first + 1] and out.finish_reason == "stop"
    assert generate(with_eos, ["Tell me a story"], GREEDY)[0].token_ids == free.token_ids


def test_stop_string_truncates_the_text(model):
    free = generate(model, ["Once upon a time"], GREEDY.replace(max_tokens=20))[0]
    assert len(free.text) > 10
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    out = generate(model, ["Once upon a time"], GREEDY.replace(max_tokens=20, stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[:free.text.index(stop)]
    assert free.token_ids[:len(out.token_ids)] == out.token_ids


def test_batched_requests_equal_requests_alone(model):
    prompts = ["A", "Tell me about the weather in Paris today, please.", [5, 6, 7, 8, 9],
               [{"role": "user", "content": "hi"}]]
    params = [GREEDY, SamplingParams(max_tokens=7, temperature=0.8, top_p=0.9, seed=11),
              SamplingParams(max_tokens=3, temperature=1.2, top_k=20, seed=5),
              GREEDY.replace(max_tokens=9)]
    together = generate(model, prompts, params)
    for prompt, p, got in zip(prompts, params, together):
        alone = generate(model, [prompt], p)[0]
        assert got.token_ids == alone.token_ids
        assert got.text == alone.text


def test_generation_stops_at_the_context_limit(model):
    prompt = list(range(10, 40))  # 30 tokens, context 64
    out = generate(model, [prompt], GREEDY.replace(max_tokens=100))[0]
    # positions 30..63 are fed back, and the token sampled at position 63 ends it
    assert out.finish_reason == "length" and len(out.token_ids) == 64 - 30 + 1


def test_prompt_longer_than_the_context_is_refused(model):
    with pytest.raises(ValueError, match="prompt 1 has 65 tokens, more than the model's "
                                         "context of 64"):
        generate(model, [[1, 2], list(range(65))], GREEDY)


def test_out_of_vocabulary_prompt_ids_are_refused(model):
    with pytest.raises(ValueError, match=r"\[49152\] are outside the vocabulary \[0, 49152\)"):
        generate(model, [[1, 49152]], GREEDY)
