"""The engine with the Pallas kernels (paged attention, LoRA) on the GPU, against the offline
XLA generator run alone (run on the GPU machine: JAX_PLATFORMS=cuda pytest -m gpu tests)."""

import numpy as np
import pytest

from jlora.generate import generate
from jlora.sampling import SamplingParams
from serving.engine import Engine, EngineConfig
from tests.serving.test_sharding import make_model


@pytest.mark.gpu
@pytest.mark.parametrize("lora_kernel", ["split", "fused", "gemm"])
def test_pallas_engine_matches_xla_generation_alone(lora_kernel):
    model = make_model()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, rng.integers(1, 40)).tolist() for _ in range(16)]
    params = [SamplingParams(max_tokens=int(rng.integers(1, 20)), ignore_eos=True,
                             temperature=float(rng.choice([0, 0.8])), seed=i)
              for i in range(16)]
    adapters = [[None, "lora", "dora", "tied"][i % 4] for i in range(16)]
    engine = Engine(model, EngineConfig(max_seqs=8, page_size=16, num_pages=14,
                                        prefill_budget=64, impl="pallas",
                                        lora_kernel=lora_kernel))
    outs = engine.generate(prompts, params, adapters)
    for p, sp, a, got in zip(prompts, params, adapters, outs):
        ref = generate(model, [p], sp, chat=False, impl="xla", adapters=[a])[0]
        assert got.token_ids == ref.token_ids
        # the Pallas LoRA products run in TF32 on the GPU: logprobs agree to a few 1e-3
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=5e-3)
    assert engine.metrics.snapshot()["preemptions"] > 0   # 13 pages of 16 for 16 requests
