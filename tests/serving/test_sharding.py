"""Tensor parallelism on 4 host CPU devices: sharded outputs equal single-device outputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.config import preset
from jlora.loader import Model, load_adapter
from jlora.model import full_logits, init_params
from jlora.sampling import SamplingParams
from serving.engine import Engine, EngineConfig
from serving.sharding import relayout
from tests.helpers import random_lora_adapter, random_tied_adapter

# 8 query heads and 4 KV heads so that 4 devices each get some; Qwen2-style q/k/v bias.
CFG = preset("tiny").replace(n_heads=8, n_kv_heads=4, max_seq_len=64, vocab_size=512,
                             eos_token_ids=(2,), qkv_bias=True)
CONFIG = EngineConfig(max_seqs=8, page_size=8, num_pages=40, prefill_budget=32, piece=8,
                      decode_buckets=(0, 8), prefill_buckets=(0, 32), impl="xla")


def make_model(with_adapters=True):
    params = init_params(CFG, jax.random.key(5), jnp.float32)
    params = jax.tree.map(lambda w: w * 4 if w.ndim == 2 else w, params)
    params["layers"] = [dict(layer, bqkv=0.1 * jax.random.normal(jax.random.key(i), layer[
        "bqkv"].shape if "bqkv" in layer else ((CFG.n_heads + 2 * CFG.n_kv_heads)
                                                * CFG.head_dim,)))
                        for i, layer in enumerate(params["layers"])]
    m = Model(CFG, params, None, "tiny-gqa")
    if with_adapters:
        load_adapter(m, random_lora_adapter(CFG, "lora", 8, seed=1), max_loras=3,
                     max_lora_rank=16)
        load_adapter(m, random_lora_adapter(CFG, "dora", 16, seed=2, variant="dora"))
        load_adapter(m, random_tied_adapter(CFG, "tied", 8, seed=3))
    return m


@pytest.mark.parametrize("tp", [2, 4])
def test_relaid_out_params_compute_the_same_logits(tp):
    m = make_model(with_adapters=False)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, CFG.vocab_size)
    params, cfg = relayout(m.params, CFG, tp)
    assert cfg.tp == tp and not np.array_equal(params["layers"][0]["wqkv"],
                                               m.params["layers"][0]["wqkv"])
    np.testing.assert_allclose(full_logits(params, cfg, tokens), full_logits(m.params, CFG, tokens),
                               rtol=1e-5, atol=1e-5)
    back, _ = relayout(params, cfg, 1)
    assert all(np.array_equal(back["layers"][0][k], m.params["layers"][0][k])
               for k in m.params["layers"][0])


@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_engine_matches_one_device(tp):
    rng = np.random.default_rng(tp)
    prompts = [rng.integers(3, 512, rng.integers(1, 30)).tolist() for _ in range(12)]
    params = [SamplingParams(max_tokens=int(rng.integers(1, 20)), ignore_eos=True,
                             temperature=float(rng.choice([0, 0.9])), seed=i)
              for i in range(12)]
    adapters = [[None, "lora", "dora", "tied"][i % 4] for i in range(12)]
    one = Engine(make_model(), CONFIG).generate(prompts, params, adapters)
    sharded_engine = Engine(make_model(), CONFIG.__class__(**{**CONFIG.__dict__, "tp": tp}))
    leaf = sharded_engine.model.params["layers"][0]["wqkv"]
    assert len(leaf.sharding.device_set) == tp
    assert sharded_engine.kv.k[0].sharding.shard_shape(sharded_engine.kv.k[0].shape)[0] == \
        CFG.n_kv_heads // tp
    many = sharded_engine.generate(prompts, params, adapters)
    for a, b in zip(one, many):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_sharded_engine_on_the_pallas_kernels_matches_one_device():
    """tp=2 on the Pallas kernels (interpret mode here), with the default LoRA kernel choice
    (the gemm path on q/k/v and down, the split pair on o and gate_up and in prefill), inside
    the shard_map: each shard's adapters' term rides on its partial sums. The tokens of one
    device on XLA."""
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 512, rng.integers(1, 12)).tolist() for _ in range(4)]
    params = [SamplingParams(max_tokens=3, ignore_eos=True, temperature=float(t), seed=i)
              for i, t in enumerate([0, 0.9, 0, 0.9])]
    adapters = [None, "lora", "dora", "tied"]
    one = Engine(make_model(), CONFIG).generate(prompts, params, adapters)
    config = dataclasses.replace(CONFIG, tp=2, impl="pallas")
    assert config.lora_kernel == "gemm"
    for a, b in zip(one, Engine(make_model(), config).generate(prompts, params, adapters)):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_tp_must_divide_the_heads():
    with pytest.raises(ValueError, match="tp=3 must be a positive integer dividing n_heads=8"):
        relayout(make_model(False).params, CFG, 3)


def test_adapters_loaded_while_serving_on_a_mesh_match_one_device():
    """Three adapters through two GPU slots: loads (from pinned host memory) and evictions
    happen between steps, and each load's rows reach every device of the mesh."""
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 512, rng.integers(1, 20)).tolist() for _ in range(9)]
    params = [SamplingParams(max_tokens=int(rng.integers(2, 12)), ignore_eos=True)
              for _ in range(9)]
    names = [["a", "b", "c"][i % 3] for i in range(9)]
    config = EngineConfig(**{**CONFIG.__dict__, "max_loras": 2, "max_lora_rank": 16})
    outputs = []
    for tp in (1, 2):
        engine = Engine(make_model(with_adapters=False),
                        EngineConfig(**{**config.__dict__, "tp": tp}))
        for seed, name in enumerate("abc"):
            engine.adapters.load(name, random_lora_adapter(CFG, name, 8, seed=seed))
        outputs.append(engine.generate(prompts, params, names))
        assert sum(len(e.load_seconds) for e in engine.adapters.cache.entries.values()) >= 3
        assert engine.adapters.cache.evictions >= 1   # a load into a slot used before
    for a, b in zip(*outputs):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
