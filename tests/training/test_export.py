"""An adapter trained by jlora, exported as PEFT files, gives PEFT (the oracle) the logits
jlora computes for it, within 1e-3 (LoRA and DoRA); the native format keeps Tied-LoRA."""

import jax
import numpy as np
import pytest
from flax import nnx

from jlora.formats.native import read_adapter, write_native
from jlora.formats.peft import write_peft
from jlora.loader import load_model
from tests.helpers import hf_logprobs, make_hf_model, save_hf_model
from tests.training.test_modules import randomized
from training.forward import train_logits
from training.modules import AdapterSpec, Adapters, to_adapter

TOKENS = np.random.default_rng(3).integers(0, 160, (2, 24)).astype(np.int32)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_hf_model(make_hf_model("llama-gqa-untied"), tmp_path_factory.mktemp("base"))


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_exported_adapter_gives_peft_the_training_logits(variant, base_dir, tmp_path):
    from peft import PeftModel
    model = load_model(str(base_dir), "float32")
    spec = AdapterSpec(variant, rank=4, rslora=variant == "dora")
    trained = randomized(Adapters(model.config, spec, model.params, nnx.Rngs(1)), seed=5)
    ours = np.asarray(jax.nn.log_softmax(train_logits(model.params, model.config, trained,
                                                      TOKENS), axis=-1))
    write_peft(to_adapter(trained, "t"), tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(make_hf_model("llama-gqa-untied"),
                                           tmp_path / "peft").eval()
    assert np.abs(ours - hf_logprobs(peft_model, TOKENS)).max() <= 1e-3


def test_native_export_keeps_tied_lora_tied(base_dir, tmp_path):
    model = load_model(str(base_dir), "float32")
    trained = randomized(Adapters(model.config, AdapterSpec("tied", rank=4), model.params,
                                  nnx.Rngs(1)), seed=6)
    adapter = to_adapter(trained, "tied")
    write_native(adapter, tmp_path / "native")
    back = read_adapter(tmp_path / "native", model.config.n_layers)
    assert back.variant == "tied"
    assert back.modules[(0, "q")].a is back.modules[(1, "q")].a        # stored once
    for key, mod in adapter.modules.items():
        np.testing.assert_array_equal(back.modules[key].b, mod.b)
        np.testing.assert_array_equal(back.modules[key].w, mod.w)
