"""Adapters from PEFT files, served through the bank: PEFT itself is the oracle."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.formats.native import read_adapter, read_native, write_native
from jlora.formats.peft import read_peft, write_peft
from jlora.generate import decode_step, generate
from jlora.loader import load_adapter, load_model
from jlora.merge import merge
from jlora.model import full_logits
from jlora.sampling import SamplingParams
from tests.helpers import (hf_logprobs, make_hf_model, make_peft_adapter, random_lora_adapter,
                           random_tied_adapter, save_hf_model)

TOL = 1e-3   # max |d logprob| in float32 (the bound)
TOKENS = np.random.default_rng(1).integers(0, 160, (2, 32)).astype(np.int32)


def logprobs(model, tokens=TOKENS, slots=None):
    bank = model.bank.arrays if slots is not None else None
    rows = None if slots is None else jnp.asarray(slots, jnp.int32)
    out = jax.jit(full_logits, static_argnums=1)(model.params, model.config, tokens, bank, rows)
    return np.asarray(jax.nn.log_softmax(out, axis=-1))


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {v: save_hf_model(make_hf_model(v), root / v) for v in ("llama-gqa-untied",
                                                                    "qwen2-bias")}


PEFT_CASES = {
    "lora": ("llama-gqa-untied", dict()),
    "rslora": ("llama-gqa-untied", dict(use_rslora=True, r=16)),
    "dora": ("llama-gqa-untied", dict(use_dora=True)),
    "patterns": ("llama-gqa-untied", dict(rank_pattern={"q_proj": 4, "down_proj": 16},
                                          alpha_pattern={"v_proj": 3,
                                                         "model.layers.1.mlp.up_proj": 7})),
    "subset": ("llama-gqa-untied", dict(target_modules=["q_proj", "v_proj"],
                                        layers_to_transform=[1])),
    "regex": ("llama-gqa-untied", dict(target_modules=r".*layers\.0\.(self_attn\.o|mlp\.up)_proj")),
    "qwen2-dora": ("qwen2-bias", dict(use_dora=True)),
    "exclude": ("llama-gqa-untied", dict(exclude_modules=["k_proj", "gate_proj"])),
    "exclude-regex": ("llama-gqa-untied", dict(exclude_modules=r".*layers\.1\.mlp\..*")),
    # a full name is taken as it is; layers_to_transform limits only the short names
    "full-name": ("llama-gqa-untied", dict(target_modules=["model.layers.1.self_attn.q_proj",
                                                           "v_proj"],
                                           layers_to_transform=[0])),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_adapter_matches_peft(case, base_dirs, tmp_path):
    variant, kwargs = PEFT_CASES[case]
    peft_model = make_peft_adapter(variant, tmp_path / "ad", **dict(kwargs))
    model = load_model(str(base_dirs[variant]), "float32")
    slot = load_adapter(model, tmp_path / "ad", name="a", max_lora_rank=16)
    ours, theirs = logprobs(model, slots=[slot, slot]), hf_logprobs(peft_model, TOKENS)
    assert np.abs(ours - theirs).max() <= TOL
    # the adapter really changes the model (so the match above is not the base's)
    assert np.abs(logprobs(model, slots=[0, 0]) - theirs).max() > 100 * TOL


def test_rank_above_the_maximum_is_refused(base_dirs, tmp_path):
    make_peft_adapter("llama-gqa-untied", tmp_path / "ad", r=32)
    model = load_model(str(base_dirs["llama-gqa-untied"]), "float32")
    with pytest.raises(ValueError, match=r"ad\), layer 0 module \w+: rank 32 exceeds the "
                                         r"configured maximum rank 16"):
        load_adapter(model, tmp_path / "ad", name="big", max_lora_rank=16)


def _edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, message", [
    (dict(modules_to_save=["lm_head"]), "key 'modules_to_save': ['lm_head'] would replace"),
    (dict(bias="all"), "key 'bias': 'all' trains base-model biases"),
    (dict(peft_type="IA3"), "key 'peft_type': 'IA3' is not supported; supported: 'LORA'"),
    (dict(fan_in_fan_out=True), "key 'fan_in_fan_out'"),
    (dict(rank_pattern={"q_proj": 4}), "module model.layers.0.self_attn.q_proj has rank 8 but "
                                       "adapter_config.json"),
    (dict(target_modules=["q_proj"]), "do not match key 'target_modules'"),
    (dict(use_dora=True), "use_dora=True but the lora_magnitude_vector is missing"),
])
def test_peft_refusals_name_the_file_and_key(change, message, tmp_path):
    make_peft_adapter("llama-gqa-untied", tmp_path / "ad")
    _edit_config(tmp_path / "ad", **change)
    with pytest.raises(ValueError, match="adapter_config.json|adapter_model.safetensors") as e:
        read_peft(tmp_path / "ad", n_layers=2)
    assert message in str(e.value)


def test_pickled_peft_weights_are_refused(tmp_path):
    make_peft_adapter("llama-gqa-untied", tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").rename(tmp_path / "ad" / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match=r"adapter_model.safetensors; found "
                                                r"\['adapter_model.bin'\]: pickled weights"):
        read_peft(tmp_path / "ad", n_layers=2)


def test_unknown_tensor_key_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file
    make_peft_adapter("llama-gqa-untied", tmp_path / "ad")
    f = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(str(f))
    tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((8, 64), np.float32)
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match=r"key 'base_model.model.lm_head.lora_A.weight' is not "
                                         r"a LoRA tensor"):
        read_peft(tmp_path / "ad", n_layers=2)


def test_adapter_for_another_hidden_size_is_refused(base_dirs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig
    other = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=160))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "ad")
    model = load_model(str(base_dirs["llama-gqa-untied"]), "float32")
    with pytest.raises(ValueError, match="lora_A has 32 input features but the model's hidden "
                                         "size is 64: the adapter was made for a different"):
        load_adapter(model, tmp_path / "ad", name="other")


def test_mismatched_shapes_are_refused(base_dirs, tmp_path):
    from safetensors.numpy import load_file, save_file
    make_peft_adapter("llama-gqa-untied", tmp_path / "ad")
    f = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    tensors[key] = np.zeros((48, 8), np.float32)
    save_file(tensors, str(f))
    model = load_model(str(base_dirs["llama-gqa-untied"]), "float32")
    with pytest.raises(ValueError, match=r"layer 1 module k: lora_A \(8, 64\) and lora_B "
                                         r"\(48, 8\) do not fit the base module \(64 -> 32\)"):
        load_adapter(model, tmp_path / "ad", name="bad")


def test_mixed_batch_equals_each_request_alone(base_dirs, tmp_path):
    """Base, LoRA r=8, LoRA r=16, DoRA and Tied-LoRA requests in one batch."""
    base = base_dirs["llama-gqa-untied"]
    make_peft_adapter("llama-gqa-untied", tmp_path / "r8", seed=1)
    make_peft_adapter("llama-gqa-untied", tmp_path / "r16", seed=2, r=16, lora_alpha=8)
    make_peft_adapter("llama-gqa-untied", tmp_path / "dora", seed=3, use_dora=True)
    model = load_model(str(base), "float32")
    write_native(random_tied_adapter(model.config, seed=4), tmp_path / "tied")
    for name in ("r8", "r16", "dora", "tied"):
        load_adapter(model, tmp_path / name, name=name, max_loras=4, max_lora_rank=16)
    names = [None, "r8", "r16", "dora", "tied", "r8"]
    prompts = [[3, 4, 5], [7, 8], [9, 10, 11, 12], [13], [14, 15, 16], [20, 21, 22, 23, 24]]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    together = generate(model, prompts, params, adapters=names)
    for prompt, name, got in zip(prompts, names, together):
        alone = generate(model, [prompt], params, adapters=[name])[0]
        assert got.token_ids == alone.token_ids, name
        np.testing.assert_allclose(got.logprobs, alone.logprobs, rtol=1e-4, atol=1e-5)
    # and the adapters differ: each changes the next-token distribution of the same prompt
    ids = np.array([[5, 6, 7, 8]] * 5, np.int32)
    lp = logprobs(model, ids, slots=[model.bank.slot_of(n) for n in names[:5]])
    assert all(np.abs(lp[i] - lp[0]).max() > 0.01 for i in range(1, 5))


@pytest.mark.parametrize("kind", ["lora", "dora", "tied"])
def test_merged_equals_unmerged_and_unmerge_is_exact(kind, base_dirs, tmp_path):
    model = load_model(str(base_dirs["llama-gqa-untied"]), "float32")
    if kind == "tied":
        adapter = random_tied_adapter(model.config)
    else:
        make_peft_adapter("llama-gqa-untied", tmp_path / "ad", use_dora=kind == "dora")
        adapter = read_peft(tmp_path / "ad", model.config.n_layers, "ad")
    before = jax.tree.map(np.array, model.params)
    slot = load_adapter(model, adapter, max_lora_rank=8)
    unmerged = logprobs(model, slots=[slot, slot])
    merged_params = merge(model.params, model.config, adapter)
    merged = np.asarray(jax.nn.log_softmax(full_logits(merged_params, model.config, TOKENS), -1))
    assert np.abs(merged - unmerged).max() <= TOL
    # unmerging is going back to the kept original: bit for bit
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), model.params,
                 before)


def test_native_format_keeps_tied_lora_tied(base_dirs, tmp_path):
    model = load_model(str(base_dirs["llama-gqa-untied"]), "float32")
    tied = random_tied_adapter(model.config, rank=8)
    write_native(tied, tmp_path / "t")
    back = read_native(tmp_path / "t")
    assert back.variant == "tied"
    assert back.modules[(0, "q")].a is back.modules[(1, "q")].a        # still shared
    untied_bytes = sum(m.a.nbytes + m.b.nbytes for m in tied.modules.values())
    assert back.nbytes() < untied_bytes / 1.5   # A and B once, not once per layer
    for key, mod in tied.modules.items():
        for f in ("a", "b", "u", "w"):
            np.testing.assert_array_equal(getattr(back.modules[key], f), getattr(mod, f))


@pytest.mark.parametrize("case", ["lora", "dora", "scattered"])
def test_peft_export_loads_in_peft_with_the_same_logits(case, base_dirs, tmp_path):
    """Written back as PEFT, an adapter loads in PEFT and in jlora with the same logits, also
    when its modules are no layers x targets grid (q in layer 1, v in layer 0)."""
    from peft import PeftModel
    scattered = dict(target_modules=["model.layers.1.self_attn.q_proj", "v_proj"],
                     layers_to_transform=[0]) if case == "scattered" else {}
    make_peft_adapter("llama-gqa-untied", tmp_path / "ad", use_dora=case == "dora",
                      rank_pattern={"k_proj": 4}, **scattered)
    model = load_model(str(base_dirs["llama-gqa-untied"]), "float32")
    adapter = read_peft(tmp_path / "ad", model.config.n_layers, "ad")
    write_peft(adapter, tmp_path / "exported")
    slot = load_adapter(model, tmp_path / "exported", name="x")
    base = make_hf_model("llama-gqa-untied")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "exported").eval()
    assert np.abs(logprobs(model, slots=[slot, slot]) - hf_logprobs(peft_model, TOKENS)).max() \
        <= TOL


def test_loading_adapters_never_recompiles_the_step(base_dirs, tmp_path):
    make_peft_adapter("llama-gqa-untied", tmp_path / "a", seed=1)
    make_peft_adapter("llama-gqa-untied", tmp_path / "b", seed=2, r=4, lora_alpha=4,
                      target_modules=["q_proj"])
    model = load_model(str(base_dirs["llama-gqa-untied"]), "float32")
    load_adapter(model, tmp_path / "a", name="a", max_loras=2, max_lora_rank=8)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    first = generate(model, [[1, 2, 3], [4, 5]], params, adapters=["a", None])[0]
    compiled = decode_step._cache_size()
    load_adapter(model, tmp_path / "b", name="b")           # a second slot
    shutil.rmtree(tmp_path / "a")
    generate(model, [[1, 2, 3], [4, 5]], params, adapters=["b", "a"])
    model.bank.unload("a")
    load_adapter(model, tmp_path / "b", name="b")           # replaced in place
    again = generate(model, [[1, 2, 3], [4, 5]], params, adapters=["b", "b"])[0]
    assert again.token_ids != first.token_ids
    assert decode_step._cache_size() == compiled


def test_unknown_adapter_name_in_a_request(base_dirs, tmp_path):
    make_peft_adapter("llama-gqa-untied", tmp_path / "a")
    model = load_model(str(base_dirs["llama-gqa-untied"]), "float32")
    load_adapter(model, tmp_path / "a", name="a")
    with pytest.raises(ValueError, match=r"adapter 'b' is not loaded; loaded: \['a'\]"):
        generate(model, [[1, 2]], SamplingParams(max_tokens=2), adapters=["b"])


def test_read_adapter_says_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a PEFT adapter"):
        read_adapter(tmp_path, n_layers=2)


def test_dora_is_not_served_as_plain_lora(base_dirs, tmp_path):
    """Dropping DoRA's magnitude scale must break agreement with PEFT."""
    peft_model = make_peft_adapter("llama-gqa-untied", tmp_path / "ad", use_dora=True)
    model = load_model(str(base_dirs["llama-gqa-untied"]), "float32")
    adapter = read_peft(tmp_path / "ad", model.config.n_layers, "d")
    for mod in adapter.modules.values():
        mod.m = None
    adapter.variant = "lora"
    slot = load_adapter(model, adapter, max_lora_rank=8)
    assert np.abs(logprobs(model, slots=[slot, slot]) - hf_logprobs(peft_model, TOKENS)).max() \
        > 10 * TOL


def test_pallas_kernels_in_the_model_equal_xla(base_dirs, tmp_path):
    """The model's LoRA path through the Pallas kernels (interpret mode on the CPU): prefill
    (segments) and decode (per-token slots) of a mixed batch."""
    make_peft_adapter("llama-gqa-untied", tmp_path / "a", seed=5, use_dora=True)
    model = load_model(str(base_dirs["llama-gqa-untied"]), "float32")
    load_adapter(model, tmp_path / "a", name="a", max_loras=2, max_lora_rank=8)
    write_native(random_tied_adapter(model.config, seed=6), tmp_path / "t")
    load_adapter(model, tmp_path / "t", name="t")
    prompts, names = [[5, 6, 7], [8, 9], [10, 11, 12, 13]], ["a", None, "t"]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    xla = generate(model, prompts, params, adapters=names, impl="xla")
    pallas = generate(model, prompts, params, adapters=names, impl="pallas")
    for x, p in zip(xla, pallas):
        assert x.token_ids == p.token_ids
        np.testing.assert_allclose(x.logprobs, p.logprobs, rtol=1e-4, atol=1e-4)


def test_bank_is_a_few_arrays_whatever_the_depth():
    """Every jitted call that takes the bank flattens its leaves on the host (a slot write,
    each decode step): tables are stacked over layers, so deeper models add no leaves."""
    from jlora.bank import AdapterBank
    from jlora.config import preset
    leaves = [len(jax.tree.leaves(AdapterBank(preset("tiny").replace(n_layers=n), 3, 8,
                                              jnp.float32).arrays)) for n in (2, 6)]
    assert leaves[0] == leaves[1] <= 50


@pytest.mark.parametrize("variant", ["lora", "dora", "tied"])
def test_slot_data_from_packed_rows_equals_building_it(variant):
    """A load copies rows packed at registration: they give the slot contents a load
    builds from the adapter itself, in any slot of that capacity (offsets added per slot),
    and a slot of another capacity repacks."""
    from jlora.bank import AdapterBank, _unjoin
    from jlora.config import preset
    from jlora.model import init_params
    cfg = preset("tiny")
    params = init_params(cfg, jax.random.key(0), jnp.float32)
    bank = AdapterBank(cfg, 5, 8, jnp.float32, slot_ranks=(4, 8, 8, 4))
    adapter = (random_tied_adapter(cfg, "t", 4, seed=1) if variant == "tied" else
               random_lora_adapter(cfg, "a", 4, seed=1, variant=variant, targets=("q", "o", "up")))
    packed = bank.pack(adapter, params, 8)
    for slot in (2, 3, 4):   # capacities 8, 8 and 4 (4: packed for 8, so packed again)
        direct = bank.slot_data(adapter, params, slot)
        via = bank.slot_data(adapter, params, slot, packed)
        assert direct.layout == via.layout
        for x, y in zip(direct.arrays, via.arrays, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    data = bank.slot_data(adapter, params, 3, packed)
    starts = _unjoin(np.asarray(data.ints), np.asarray(data.floats),
                     data.layout[1])["tables"]["qkv"]["a_start"]
    assert int(np.asarray(starts)[0, 0]) == bank.slot_rows(3, 3, 0, 0, variant == "tied")[0]
