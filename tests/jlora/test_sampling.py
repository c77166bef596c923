"""The jitted sampler: greedy, top-k, top-p, temperature, and per-request seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.sampling import SamplingParams, make_sampling_arrays, sample, seed_key

V = 50


def run(logits, params, counters=None, keys=None):
    n = len(params)
    keys = keys if keys is not None else np.stack([seed_key(p.seed) for p in params])
    arrays = make_sampling_arrays(params, keys, counters or [0] * n, n)
    return [np.asarray(x) for x in jax.jit(sample)(jnp.asarray(logits, jnp.float32), arrays)]


def random_logits(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, V)).astype(np.float32) * 3


def test_greedy_is_argmax_and_logprob_is_the_models():
    logits = random_logits(4)
    tokens, logprobs = run(logits, [SamplingParams()] * 4)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    ref = jax.nn.log_softmax(logits, -1)[np.arange(4), tokens]
    np.testing.assert_allclose(logprobs, ref, rtol=1e-6)


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = random_logits(6, seed=1)
    params = [SamplingParams(temperature=1.5, top_k=1, seed=i) for i in range(3)] + \
             [SamplingParams(temperature=1.5, top_p=1e-6, seed=i) for i in range(3)]
    np.testing.assert_array_equal(run(logits, params)[0], logits.argmax(-1))


def test_draws_stay_inside_top_k_and_top_p_sets():
    logits = random_logits(1, seed=2)[0]
    order = np.argsort(-logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    nucleus = order[:np.searchsorted(np.cumsum(probs[order]), 0.5) + 1]
    k_seen, p_seen = set(), set()
    for seed in range(200):
        (k_tok, p_tok), _ = run(np.stack([logits, logits]),
                                [SamplingParams(temperature=1.0, top_k=3, seed=seed),
                                 SamplingParams(temperature=1.0, top_p=0.5, seed=seed)])
        k_seen.add(int(k_tok))
        p_seen.add(int(p_tok))
    assert k_seen == set(order[:3].tolist())
    assert p_seen == set(nucleus.tolist())


def test_temperature_sampling_follows_the_softmax():
    logits = np.array([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (V - 4)], np.float32)
    n = 4000
    keys = np.stack([seed_key(s) for s in range(n)])
    arrays = make_sampling_arrays([SamplingParams(temperature=2.0)] * n, keys, [0] * n, n)
    tokens = np.asarray(jax.jit(sample)(jnp.asarray(np.repeat(logits, n, 0)), arrays)[0])
    freq = np.bincount(tokens, minlength=4)[:4] / n
    expected = np.exp(logits[0, :4] / 2) / np.exp(logits[0, :4] / 2).sum()
    np.testing.assert_allclose(freq, expected, atol=0.03)


def test_a_seeded_row_draws_the_same_whatever_shares_the_batch():
    logits = random_logits(5, seed=3)
    target = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone = run(logits[:1], [target], counters=[7])[0][0]
    others = [SamplingParams(temperature=0.7, top_k=5, seed=s) for s in range(4)]
    mixed = run(logits, [target] + others, counters=[7, 1, 2, 3, 4])[0][0]
    assert alone == mixed
    # and a different step of the same request draws with a different key
    flat = logits[:1] / 10
    draws = {int(run(flat, [target], counters=[c])[0][0]) for c in range(30)}
    assert len(draws) > 1


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=float("nan")),
                                 dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(top_k=2**31),
                                 dict(max_tokens=0), dict(seed=-1), dict(stop=[""]),
                                 dict(max_tokens=2.5), dict(ignore_eos="yes"),
                                 dict(stop=5), dict(stop_token_ids="x")])
def test_invalid_parameters_are_refused_by_name(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"sampling parameter {name}="):
        SamplingParams(**bad)


def test_a_temperature_too_small_to_divide_by_is_greedy():
    """logits / 1e-38 overflow to inf (and the sampler then drew token 0); such
    temperatures are greedy, as in vLLM."""
    assert SamplingParams(temperature=1e-38).temperature == 0.0
    assert SamplingParams(temperature=1e-5).temperature == 1e-5


def test_top_p_1_keeps_the_whole_tail():
    """With one dominant token, float32's running sum reaches 1.0 before the tail; top_p=1
    must still keep every token (the engine's "sample" programs filter every row)."""
    from jlora.sampling import _filter_top_k_top_p
    logits = jnp.zeros((1, 100_000)).at[0, 0].set(30.0)
    kept = _filter_top_k_top_p(logits, jnp.array([0]), jnp.array([1.0], jnp.float32))
    assert bool(jnp.isfinite(kept).all())
    nucleus = _filter_top_k_top_p(logits, jnp.array([0]), jnp.array([0.5], jnp.float32))
    assert int(jnp.isfinite(nucleus).sum()) == 1


def test_stops_take_none_one_value_or_several():
    assert SamplingParams(stop=None, stop_token_ids=None).stop == ()
    assert SamplingParams(stop="ab", stop_token_ids=5).stop_token_ids == (5,)
    assert SamplingParams(stop=["a", "b"], stop_token_ids=[1, 2]).stop == ("a", "b")
