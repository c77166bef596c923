"""The fine-tuning loop: AdamW with warm-up and cosine decay, clipping, accumulation, eval.

`finetune(model, train, held_out, config)` trains an `Adapters` module on tokenized examples
(`training.data.Example`) over the frozen base params of a loaded `jlora.loader.Model` and
returns the trained adapter (host data, ready for `load_adapter` or the file formats) with
its metrics. Only the adapter's `nnx.LoRAParam`s get gradients and optimizer state.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jlora.adapters import Adapter
from jlora.loader import Model
from training.data import Example, batches
from training.forward import masked_loss, train_logits
from training.modules import AdapterSpec, Adapters, to_adapter


@dataclass(frozen=True)
class TrainConfig:
    spec: AdapterSpec = AdapterSpec()
    steps: int = 200                 # optimizer updates
    batch_size: int = 8              # examples per micro-batch
    accumulate: int = 1              # micro-batches per update
    seq_len: int = 128               # examples are padded (or cut) to this many tokens
    lr: float = 1e-3
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 50
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "accumulate", "seq_len", "eval_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be > 0")


@dataclass
class Result:
    adapter: Adapter
    module: Adapters
    losses: list[float] = field(default_factory=list)         # per update
    evals: list[dict] = field(default_factory=list)           # step, loss, exact_match


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
    warmup = min(config.warmup, config.steps)
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup,
                                                  max(config.steps, warmup + 1),
                                                  end_value=config.lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip),
                     optax.adamw(schedule, weight_decay=config.weight_decay))
    return optax.MultiSteps(tx, config.accumulate) if config.accumulate > 1 else tx


@nnx.jit
def train_step(adapters: Adapters, opt: nnx.Optimizer, base_params, tokens, mask, key):
    def loss_fn(ad):
        return masked_loss(train_logits(base_params, ad.cfg, ad, tokens, key), tokens, mask)

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(adapters)
    opt.update(adapters, grads)
    return loss


@nnx.jit
def eval_step(adapters: Adapters, base_params, tokens, mask):
    """(loss, exact matches): an example matches when every completion token is the argmax
    (so greedy decoding would reproduce the completion exactly)."""
    logits = train_logits(base_params, adapters.cfg, adapters, tokens)
    hit = (jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]) | ~mask[:, 1:].astype(bool)
    real = mask.any(axis=1)
    return masked_loss(logits, tokens, mask), jnp.sum(hit.all(axis=1) & real)


def evaluate(adapters: Adapters, base_params, examples: list[Example], config: TrainConfig,
             pad_id: int) -> dict:
    losses, hits = [], 0
    for tokens, mask in batches(examples, config.batch_size, config.seq_len, pad_id):
        loss, n = eval_step(adapters, base_params, tokens, mask)
        losses.append(float(loss) * mask[:, 1:].sum())
        hits += int(n)
    total = sum(int(np.asarray(e.mask[1:config.seq_len]).sum()) for e in examples)
    return {"loss": sum(losses) / max(total, 1), "exact_match": hits / max(len(examples), 1)}


def finetune(model: Model, train: list[Example], held_out: list[Example],
             config: TrainConfig = TrainConfig(), name: str = "adapter",
             progress: bool = True) -> Result:
    """Train an adapter of `config.spec` on `train`; evaluate on `held_out` every eval_every
    updates and at the end. The base params are read, never written."""
    if not train:
        raise ValueError("no training examples")
    if model.config.tp != 1:
        raise ValueError("train on a model loaded for one device (its config has tp="
                         f"{model.config.tp})")
    adapters = Adapters(model.config, config.spec, model.params, nnx.Rngs(config.seed))
    opt = nnx.Optimizer(adapters, optimizer(config), wrt=nnx.LoRAParam)
    pad_id = 0
    result = Result(adapter=None, module=adapters)
    rng = np.random.default_rng(config.seed)
    key = jax.random.key(config.seed)
    stream = _endless(train, config, pad_id, rng)
    start, tokens_seen = time.perf_counter(), 0
    for step in range(1, config.steps + 1):
        for _ in range(config.accumulate):
            tokens, mask = next(stream)
            key, sub = jax.random.split(key)
            loss = train_step(adapters, opt, model.params, tokens, mask, sub)
            tokens_seen += int(mask.sum())
        result.losses.append(float(loss))
        if held_out and (step % config.eval_every == 0 or step == config.steps):
            result.evals.append({"step": step, **evaluate(adapters, model.params, held_out,
                                                          config, pad_id)})
        if progress:
            _progress(step, config.steps, result, tokens_seen, time.perf_counter() - start)
    if progress:
        print(file=sys.stderr)
    result.adapter = to_adapter(adapters, name)
    return result


def _endless(examples, config, pad_id, rng):
    while True:
        order = rng.permutation(len(examples))
        yield from batches([examples[i] for i in order], config.batch_size, config.seq_len,
                           pad_id, drop_last=len(examples) >= config.batch_size)


def _progress(step, steps, result, tokens, elapsed):
    eta = elapsed / step * (steps - step)
    last = result.evals[-1] if result.evals else None
    ev = f"  eval loss {last['loss']:.3f} match {last['exact_match']:.2f}" if last else ""
    bar = "#" * int(30 * step / steps)
    print(f"\r[{bar:<30}] {step}/{steps} loss {result.losses[-1]:.3f}{ev}  "
          f"{tokens / elapsed:.0f} tok/s  ETA {eta:.0f} s", end="", file=sys.stderr,
          flush=True)
