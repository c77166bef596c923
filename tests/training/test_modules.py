"""Training's forward equals serving's forward for every variant, and a fresh adapter is a
no-op; the exported adapter loads into the serving bank as it is."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jlora.config import preset
from jlora.loader import Model, load_adapter
from jlora.model import full_logits, init_params
from training.forward import train_logits
from training.modules import AdapterSpec, Adapters, to_adapter

CFG = preset("tiny").replace(max_seq_len=64)


@pytest.fixture(scope="module")
def base():
    params = init_params(CFG, jax.random.key(0), jnp.float32)
    return jax.tree.map(lambda w: w * 4 if w.ndim == 2 else w, params)


def randomized(adapters: Adapters, seed: int) -> Adapters:
    """Move every weight off its init (B = 0 would make any variant a no-op)."""
    state = nnx.state(adapters)
    keys = iter(jax.random.split(jax.random.key(seed), 256))
    state = jax.tree.map(lambda x: x * jax.random.uniform(next(keys), x.shape, x.dtype, 0.5, 1.5)
                         + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), state)
    nnx.update(adapters, state)
    return adapters


def test_a_fresh_adapter_changes_nothing(base):
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, CFG.vocab_size)
    for variant in ("lora", "dora", "tied"):
        ad = Adapters(CFG, AdapterSpec(variant=variant, rank=4), base, nnx.Rngs(0))
        np.testing.assert_allclose(train_logits(base, CFG, ad, tokens),
                                   full_logits(base, CFG, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [
    AdapterSpec("lora", rank=8), AdapterSpec("lora", rank=4, rslora=True, targets=("q", "v")),
    AdapterSpec("dora", rank=8), AdapterSpec("tied", rank=8),
    AdapterSpec("tied", rank=4, train_u=False, train_v=False, targets=("q", "down"))],
    ids=["lora", "rslora-qv", "dora", "tied", "tied-AB-only"])
def test_training_forward_equals_serving_forward(base, spec):
    ad = randomized(Adapters(CFG, spec, base, nnx.Rngs(0)), seed=spec.rank)
    tokens = jax.random.randint(jax.random.key(2), (3, 12), 0, CFG.vocab_size)
    model = Model(CFG, base, None, "tiny")
    slot = load_adapter(model, to_adapter(ad, "trained"), max_loras=2, max_lora_rank=8)
    served = full_logits(base, CFG, tokens, model.bank.arrays, jnp.full(3, slot, jnp.int32))
    trained = train_logits(base, CFG, ad, tokens)
    assert np.abs(np.asarray(served) - np.asarray(full_logits(base, CFG, tokens))).max() > 1e-2
    np.testing.assert_allclose(trained, served, rtol=1e-4, atol=1e-4)


def test_frozen_switches_are_not_trainable(base):
    ad = Adapters(CFG, AdapterSpec("tied", rank=4, train_a=False, train_u=False), base,
                  nnx.Rngs(0))
    names = {str(k) for k in nnx.state(ad, nnx.LoRAParam).keys()}
    assert any(n.startswith("b_") for n in names) and any(n.startswith("v_") for n in names)
    assert not any(n.startswith(("a_", "u_")) for n in names)


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="variant 'vera'"):
        AdapterSpec("vera")
    with pytest.raises(ValueError, match="rank=0"):
        AdapterSpec(rank=0)
    with pytest.raises(ValueError, match=r"targets \['qq'\]"):
        AdapterSpec(targets=("qq",))
    for kwargs, message in [
            ({"alpha": 0.0}, "alpha=0.0 must be a finite number > 0 (or None for the default)"),
            ({"alpha": -16}, "alpha=-16 must be a finite number > 0"),
            ({"alpha": float("nan")}, "alpha=nan must be a finite number > 0"),
            ({"rank": True}, "rank=True must be an integer in [1, 256]"),
            ({"targets": "q"}, "targets='q' must be a tuple of module names among"),
            ({"rslora": 1}, "rslora=1 must be True or False"),
            ({"variant": "tied", "train_a": False, "train_b": False, "train_u": False,
              "train_v": False}, "Tied-LoRA with train_a, train_b, train_u and train_v all "
                                 "False trains nothing")]:
        with pytest.raises(ValueError) as e:
            AdapterSpec(**kwargs)
        assert message in str(e.value)


@pytest.mark.parametrize("switches", ["auv", "uv", "au", "u", "a"])
def test_tied_lora_with_b_frozen_starts_as_a_no_op_with_gradients(base, switches):
    """B frozen at zero would never train; frozen B is random instead and a trainable
    factor starts at zero: the fresh adapter changes nothing, and it gets a gradient."""
    from training.forward import masked_loss
    spec = AdapterSpec("tied", rank=4, **{f"train_{c}": c in switches for c in "abuv"})
    ad = Adapters(CFG, spec, base, nnx.Rngs(0))
    assert np.abs(np.asarray(ad.b_q[...])).min() > 0
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, CFG.vocab_size)
    np.testing.assert_allclose(train_logits(base, CFG, ad, tokens),
                               full_logits(base, CFG, tokens), rtol=1e-5, atol=1e-5)
    graph, trained, rest = nnx.split(ad, nnx.LoRAParam, ...)
    grads = jax.grad(lambda t: masked_loss(train_logits(base, CFG, nnx.merge(graph, t, rest),
                                                        tokens), tokens,
                                           jnp.ones_like(tokens, bool)))(trained)
    # the factor that starts at zero gets a gradient (the others may wait for it, as LoRA's
    # A waits for B)
    assert max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(grads)) > 1e-6
