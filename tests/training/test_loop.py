"""Fine-tuning on CPU: the loss falls and held-out exact match rises on a generated task,
the base weights stay bit-identical, and the result serves as trained."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import preset
from jlora.loader import Model, load_adapter
from jlora.model import full_logits, init_params
from training.data import example, split
from training.forward import train_logits
from training.loop import TrainConfig, finetune
from training.modules import AdapterSpec

CFG = preset("tiny").replace(max_seq_len=64)


def task(n: int, seed: int):
    """Answer with the token that a fixed table maps the prompt's first token to; the other
    prompt tokens are noise. 12 possible first tokens, 1-token answers."""
    rng = np.random.default_rng(seed)
    table = dict(zip(range(10, 22), np.random.default_rng(99).permutation(range(300, 312))))
    out = []
    for _ in range(n):
        first = int(rng.integers(10, 22))
        out.append(example([first, *rng.integers(40, 200, 5).tolist(), 7], [table[first]]))
    return out


def test_loss_falls_accuracy_rises_base_untouched_and_serving_agrees():
    params = init_params(CFG, jax.random.key(0), jnp.float32)
    before = jax.tree.map(np.asarray, params)
    model = Model(CFG, params, None, "tiny")
    train, held_out = split(task(240, 1), 0.25)
    config = TrainConfig(AdapterSpec("lora", rank=8), steps=100, batch_size=16, seq_len=8,
                         lr=1e-2, warmup=10, eval_every=100)
    first = finetune(model, train, held_out, TrainConfig(**{**config.__dict__, "steps": 1}),
                     progress=False)
    result = finetune(model, train, held_out, config, progress=False)
    # a random tiny model's logits are nearly flat: the answer's logprob rises by a nat or
    # so while it becomes the argmax
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:10]) - 0.7
    assert first.evals[-1]["exact_match"] < 0.2 < 0.9 <= result.evals[-1]["exact_match"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), model.params,
                 before)
    slot = load_adapter(model, result.adapter, max_loras=1, max_lora_rank=8)
    tokens = jnp.asarray(np.stack([e.tokens for e in held_out[:4]]))
    served = full_logits(model.params, CFG, tokens, model.bank.arrays,
                         jnp.full(4, slot, jnp.int32))
    np.testing.assert_allclose(served, train_logits(model.params, CFG, result.module, tokens),
                               rtol=1e-4, atol=1e-4)


def test_resuming_from_a_checkpoint_reproduces_the_next_losses(tmp_path):
    params = init_params(CFG, jax.random.key(0), jnp.float32)
    model = Model(CFG, params, None, "tiny")
    train = task(64, 2)
    config = TrainConfig(AdapterSpec("dora", rank=4, dropout=0.1), steps=12, batch_size=8,
                         seq_len=8, lr=1e-2, warmup=2, accumulate=2, checkpoint_every=6)
    with_checkpoints = TrainConfig(**{**config.__dict__, "checkpoint_dir": str(tmp_path)})
    straight = finetune(model, train, [], with_checkpoints, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["12", "6"]
    shutil.rmtree(tmp_path / "12")               # as if the run had died after step 6
    resumed = finetune(model, train, [], with_checkpoints, progress=False)
    assert resumed.first_step == 7 and resumed.losses == straight.losses[6:]
    for key, mod in straight.adapter.modules.items():
        np.testing.assert_array_equal(resumed.adapter.modules[key].b, mod.b)
        np.testing.assert_array_equal(resumed.adapter.modules[key].m, mod.m)


def residual_bytes(f, *args) -> int:
    """Bytes of what reverse-mode differentiation of f keeps for the backward pass (summed from
    `jax.ad_checkpoint.print_saved_residuals`: one line per residual, 'f32[2,31] ...')."""
    import contextlib
    import io
    import re

    from jax.ad_checkpoint import print_saved_residuals
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    itemsize = {"f32": 4, "i32": 4, "u32": 4, "bf16": 2, "f16": 2, "bool": 1}
    total = 0
    for line in out.getvalue().splitlines():
        dtype, dims = re.match(r"([\w<>]+)\[([\d,]*)\]", line).groups()
        size = int(np.prod([int(d) for d in dims.split(",") if d]))
        total += size * itemsize.get(dtype, 8)    # 8: a PRNG key (key<fry>)
    return total


def test_remat_gives_the_same_step_and_keeps_only_layer_inputs():
    """Gradient checkpointing (TrainConfig.remat, `jlora train --remat`) changes what the
    backward pass keeps, not what it computes: the same loss and adapter update (dropout
    on: the recompute draws the same masks), and a fraction of the residuals kept."""
    from flax import nnx

    from training.forward import masked_loss
    from training.loop import optimizer, train_step
    from training.modules import Adapters
    cfg = CFG.replace(n_layers=6)
    params = init_params(cfg, jax.random.key(0), jnp.float32)
    B, S = 4, 64
    tokens = jax.random.randint(jax.random.key(1), (B, S), 3, cfg.vocab_size).astype(jnp.int32)
    mask = jnp.ones((B, S), bool)
    batch = (tokens, mask, jnp.zeros((B, S), jnp.int32),
             jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)))
    spec = AdapterSpec(rank=8, dropout=0.1)
    key = jax.random.key(7)
    losses, updated, kept = [], [], []
    for remat in (False, True):
        adapters = Adapters(cfg, spec, params, nnx.Rngs(0))
        graph, trained, rest = nnx.split(adapters, nnx.LoRAParam, ...)
        kept.append(residual_bytes(lambda t: masked_loss(train_logits(
            params, cfg, nnx.merge(graph, t, rest), tokens, key, remat=remat), tokens, mask),
            trained))
        opt = nnx.Optimizer(adapters, optimizer(TrainConfig(spec)), wrt=nnx.LoRAParam)
        weight = jnp.float32(1 / mask[:, 1:].sum())
        losses.append(float(train_step(adapters, opt, params, batch, key, weight, remat=remat)))
        updated.append(jax.tree.leaves(nnx.state(adapters, nnx.LoRAParam)))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)
    for a, b in zip(*updated, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    assert kept[1] < 0.35 * kept[0], kept


def test_accumulation_is_the_same_update_as_one_big_batch():
    """batch 8 x accumulate 1 and batch 4 x accumulate 2 see the same 8 examples per update
    (`batch_at`); with completions of 1 or 8 tokens the two micro-batches hold different
    token counts, and still the update is the per-token mean over all 8: the same weights,
    and the same reported loss (the update's, not the last micro-batch's)."""
    from training.forward import loss_weight
    from training.loop import batch_at
    model = Model(CFG, init_params(CFG, jax.random.key(0), jnp.float32), None, "tiny")
    rng = np.random.default_rng(0)
    train = [example(rng.integers(10, 200, 4).tolist(),
                     rng.integers(300, 310, 1 if i % 3 else 8).tolist()) for i in range(16)]
    results = []
    for batch_size, accumulate in ((8, 1), (4, 2)):
        config = TrainConfig(AdapterSpec("lora", rank=4), steps=2, batch_size=batch_size,
                             accumulate=accumulate, seq_len=12, lr=1e-2, warmup=1)
        results.append(finetune(model, train, [], config, progress=False))
    counts = [int(loss_weight(*batch_at(train, config, 2, m)[1:3]).sum()) for m in range(2)]
    assert counts[0] != counts[1], counts          # else the old averaging was right too
    one, two = results
    np.testing.assert_allclose(two.losses, one.losses, rtol=1e-5)
    for key, mod in one.adapter.modules.items():
        np.testing.assert_allclose(two.adapter.modules[key].b, mod.b, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(two.adapter.modules[key].a, mod.a, rtol=1e-4, atol=1e-6)


def test_a_seq_len_that_cuts_every_completion_is_refused(capsys):
    """Prompts of 6 and 7 tokens at seq_len 6: no completion token is learned (the loss
    would be 0 and nothing would train), so finetune refuses; at seq_len 7 one example
    keeps its answer, and training runs with the warning for cut examples."""
    import pytest
    model = Model(CFG, init_params(CFG, jax.random.key(0), jnp.float32), None, "tiny")
    train = [example(list(range(10, 16)), [300, 2]), example(list(range(10, 17)), [301, 2])]
    with pytest.raises(ValueError, match=r"seq_len=6 leaves no completion token of any "
                                         r"training example to learn: the prompts \(chat "
                                         r"template included\) have 6 to 7 tokens"):
        finetune(model, train, [], TrainConfig(steps=1, batch_size=2, seq_len=6),
                 progress=False)
    result = finetune(model, train, [], TrainConfig(steps=1, batch_size=2, seq_len=7),
                      progress=False)
    assert result.losses[0] > 0
    assert "2 of 2 examples are longer than seq_len=7" in capsys.readouterr().err


def test_tied_lora_with_b_frozen_still_trains():
    """B frozen at zero would make every gradient 0 and training a no-op: with train_b off,
    B is random (v, u or A starts at 0 instead), the trained factors move and the loss falls."""
    model = Model(CFG, init_params(CFG, jax.random.key(0), jnp.float32), None, "tiny")
    train = task(32, 3)
    for switches in ("uv", "a"):
        spec = AdapterSpec("tied", rank=4, **{f"train_{c}": c in switches for c in "abuv"})
        result = finetune(model, train, [], TrainConfig(spec, steps=6, batch_size=16,
                                                        seq_len=8, lr=5e-2, warmup=1),
                          progress=False)
        mod = result.adapter.modules[(0, "q")]
        moved = mod.w if "v" in switches else mod.a
        assert np.abs(moved).max() > 1e-3, switches
        assert result.losses[-1] < result.losses[0], (switches, result.losses)


def test_bad_train_configs_are_refused():
    import pytest
    for kwargs, message in [
            ({"warmup": -5}, "warmup=-5 must be an integer >= 0"),
            ({"lr": float("inf")}, "lr=inf must be a finite number > 0"),
            ({"lr": 0.0}, "lr=0.0 must be a finite number > 0"),
            ({"grad_clip": -1.0}, "grad_clip=-1.0 must be a finite number > 0"),
            ({"weight_decay": -1.0}, "weight_decay=-1.0 must be a finite number >= 0"),
            ({"steps": True}, "steps=True must be an integer >= 1"),
            ({"batch_size": True}, "batch_size=True must be an integer >= 1"),
            ({"seq_len": 8.0}, "seq_len=8.0 must be an integer >= 1")]:
        with pytest.raises(ValueError) as e:
            TrainConfig(**kwargs)
        assert str(e.value) == message
