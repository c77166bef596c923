"""Packing: several examples in one row compute exactly what each computes alone (logits and
loss), and training on packed rows still learns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jlora.config import preset
from jlora.loader import Model
from jlora.model import init_params
from tests.training.test_loop import task
from tests.training.test_modules import randomized
from training.data import batches, example, pack
from training.forward import masked_loss, train_logits
from training.loop import TrainConfig, finetune
from training.modules import AdapterSpec, Adapters

CFG = preset("tiny").replace(max_seq_len=64)


def test_pack_puts_whole_examples_first_fit_with_their_own_segments_and_positions():
    lengths = [5, 4, 3, 9, 1]
    examples = [example(list(range(100 * i, 100 * i + n - 1)), [7]) for i, n in
                enumerate(lengths)]
    rows = pack(examples, 8)
    # 5 -> row 0; 4 -> row 1; 3 -> row 0 (room 3); 9 is cut to 8, alone; 1 -> row 1
    assert [r.tokens.tolist() for r in rows] == [
        [*examples[0].tokens, *examples[2].tokens], [*examples[1].tokens, *examples[4].tokens],
        examples[3].tokens[:8].tolist()]
    assert rows[0].segments.tolist() == [1] * 5 + [2] * 3
    assert rows[0].positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert rows[1].mask.tolist() == [False, False, False, True, True]
    with pytest.raises(ValueError, match="seq_len=0"):
        pack(examples, 0)


@pytest.mark.parametrize("variant", ["lora", "dora", "tied"])
def test_packed_rows_give_each_example_its_unpacked_logits_and_loss(variant):
    base = init_params(CFG, jax.random.key(0), jnp.float32)
    ad = randomized(Adapters(CFG, AdapterSpec(variant, rank=4), base, nnx.Rngs(0)), 3)
    rng = np.random.default_rng(0)
    examples = [example(rng.integers(3, CFG.vocab_size, int(rng.integers(2, 9))).tolist(),
                        rng.integers(3, CFG.vocab_size, int(rng.integers(1, 5))).tolist())
                for _ in range(7)]
    rows = pack(examples, 16)
    assert len(rows) < len(examples)                     # something was packed
    tokens, mask, segments, positions = next(batches(rows, len(rows), 16))
    packed = train_logits(base, CFG, ad, jnp.asarray(tokens), segments=jnp.asarray(segments),
                          positions=jnp.asarray(positions))
    u_tokens, u_mask, _, _ = next(batches(examples, len(examples), 16))
    alone = train_logits(base, CFG, ad, jnp.asarray(u_tokens))
    seen = 0
    for r, row in enumerate(rows):
        for seg in range(1, row.segments.max() + 1):
            cols = np.flatnonzero(segments[r] == seg)
            i = next(i for i, e in enumerate(examples)
                     if len(e.tokens) == len(cols) and (e.tokens == tokens[r, cols]).all())
            np.testing.assert_allclose(packed[r, cols], alone[i, :len(cols)], rtol=1e-5,
                                       atol=1e-5)
            seen += 1
    assert seen == len(examples)
    np.testing.assert_allclose(masked_loss(packed, tokens, mask, jnp.asarray(segments)),
                               masked_loss(alone, u_tokens, u_mask), rtol=1e-5)


def test_training_on_packed_rows_learns():
    model = Model(CFG, init_params(CFG, jax.random.key(0), jnp.float32), None, "tiny")
    train, held_out = task(240, 1), task(40, 2)
    config = TrainConfig(AdapterSpec("lora", rank=8), steps=60, batch_size=6, seq_len=24,
                         lr=1e-2, warmup=5, eval_every=60, pack=True)
    assert len(pack(train, 24)) == 80                    # three 8-token examples a row
    result = finetune(model, train, held_out, config, progress=False)
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:10]) - 0.7
    assert result.evals[-1]["exact_match"] >= 0.9
    with pytest.raises(ValueError, match="pack='yes'"):
        TrainConfig(pack="yes")
