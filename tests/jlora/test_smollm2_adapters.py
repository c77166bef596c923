"""PEFT adapters on the real default model (SmolLM2-135M-Instruct): PEFT is the oracle."""

import copy
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from jlora.loader import embedded_model_path, load_adapter, load_model
from jlora.model import full_logits
from tests.helpers import perturb_dora_magnitudes

pytestmark = pytest.mark.slow
PROMPT = "Write a haiku about autumn leaves."


@pytest.fixture(scope="module")
def hf_base():
    from transformers import AutoModelForCausalLM
    path = embedded_model_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["lora", "dora"])
def adapter(request, hf_base, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(7)
    config = LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                        use_dora=request.param == "dora", rank_pattern={"q_proj": 4})
    peft_model = get_peft_model(copy.deepcopy(hf_base), config).eval()
    with torch.no_grad():  # an adapter that changes answers but keeps the model sane
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)
    perturb_dora_magnitudes(peft_model, spread=0.2)
    path = tmp_path_factory.mktemp(request.param) / "adapter"
    peft_model.save_pretrained(path)
    return request.param, path, peft_model


@pytest.fixture(scope="module")
def jl():
    return load_model("smollm2", "float32")


def test_logprobs_match_peft(jl, adapter):
    kind, path, peft_model = adapter
    if jl.bank is None or kind not in jl.bank.slots:
        load_adapter(jl, path, name=kind, max_loras=2, max_lora_rank=8)
    tokens = np.array([jl.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])[:32]],
                      np.int32)
    slot = np.array([jl.bank.slot_of(kind)], np.int32)
    ours = np.asarray(jax.nn.log_softmax(full_logits(jl.params, jl.config, tokens,
                                                     jl.bank.arrays, slot), axis=-1))
    with torch.no_grad():
        theirs = torch.log_softmax(peft_model(torch.as_tensor(tokens, dtype=torch.long)).logits,
                                   -1).numpy()
    assert np.abs(ours - theirs).max() <= 1e-3


def test_cli_greedy_ids_match_peft(jl, adapter, tmp_path):
    kind, path, peft_model = adapter
    requests = tmp_path / "reqs.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": PROMPT, "adapter": kind, "max_tokens": 20, "ignore_eos": True},
        {"prompt": PROMPT, "max_tokens": 20, "ignore_eos": True}]))
    run = subprocess.run([sys.executable, "-m", "jlora.cli", "generate", "--json", "--requests",
                          str(requests), "--adapter", f"{kind}={path}", "--temperature", "0"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    with_adapter, base = [json.loads(line) for line in run.stdout.splitlines()]
    ids = torch.tensor([jl.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])])
    n = ids.shape[1]
    with torch.no_grad():
        for _ in range(20):
            ids = torch.cat([ids, peft_model(ids).logits[0, -1].argmax().view(1, 1)], dim=1)
    assert with_adapter["token_ids"] == ids[0, n:].tolist()
    assert with_adapter["token_ids"] != base["token_ids"]   # the adapter changed the answer
