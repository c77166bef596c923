"""The fine-tuning loop: AdamW with warm-up and cosine decay, clipping, accumulation, eval.

`finetune(model, train, held_out, config)` trains an `Adapters` module on tokenized examples
(`training.data.Example`) over the frozen base params of a loaded `jlora.loader.Model` and
returns the trained adapter (host data, ready for `load_adapter` or the file formats) with
its metrics. Only the adapter's `nnx.LoRAParam`s get gradients and optimizer state.
"""

from __future__ import annotations

import functools
import math
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
from jlora.values import is_int, is_real
from training import checkpoint
from training.data import Example, batches, pack
from training.forward import loss_weight, masked_loss, summed_loss, train_logits
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
    checkpoint_dir: str | None = None   # resume from its newest checkpoint, save into it
    checkpoint_every: int = 100
    pack: bool = False               # several examples per row (batch_size counts rows)
    remat: bool = False              # gradient checkpointing: recompute each layer backward

    def __post_init__(self):
        for name in ("steps", "batch_size", "accumulate", "seq_len", "eval_every",
                     "checkpoint_every"):
            if not (is_int(getattr(self, name)) and getattr(self, name) >= 1):
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        if not (is_int(self.warmup) and self.warmup >= 0):
            raise ValueError(f"warmup={self.warmup!r} must be an integer >= 0")
        if not is_int(self.seed):
            raise ValueError(f"seed={self.seed!r} must be an integer")
        for name in ("pack", "remat"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        for name, low in (("lr", "> 0"), ("grad_clip", "> 0"), ("weight_decay", ">= 0")):
            value = getattr(self, name)
            if not (is_real(value) and math.isfinite(value)
                    and (value > 0 if low == "> 0" else value >= 0)):
                raise ValueError(f"{name}={value!r} must be a finite number {low}")


@dataclass
class Result:
    adapter: Adapter
    module: Adapters
    losses: list[float] = field(default_factory=list)         # per update run by this call
    evals: list[dict] = field(default_factory=list)           # step, loss, exact_match
    first_step: int = 1                                       # > 1 after resuming


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
    warmup = min(config.warmup, config.steps)
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup,
                                                  max(config.steps, warmup + 1),
                                                  end_value=config.lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip),
                     optax.adamw(schedule, weight_decay=config.weight_decay))
    return optax.MultiSteps(tx, config.accumulate) if config.accumulate > 1 else tx


@functools.partial(nnx.jit, static_argnames="remat")
def train_step(adapters: Adapters, opt: nnx.Optimizer, base_params, batch, key,
               weight: jax.Array, remat: bool = False) -> jax.Array:
    """One micro-batch: the sum of its token losses (float32 scalar), whose gradient times
    `weight` goes to the optimizer. With k micro-batches per update, weight = k / (loss
    tokens of the whole update): optax.MultiSteps averages the k gradients, so an update's
    gradient is that of its per-token mean loss, the same as one batch of all k micro-batches
    (and not a mean of per-micro-batch means, which would weigh short micro-batches' tokens
    more)."""
    tokens, mask, segments, positions = batch

    def loss_fn(ad):
        logits = train_logits(base_params, ad.cfg, ad, tokens, key, segments=segments,
                              positions=positions, remat=remat)
        total, _ = summed_loss(logits, tokens, mask, segments)
        return total * weight, total

    grads, total = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam),
                            has_aux=True)(adapters)
    opt.update(adapters, grads)
    return total


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
    for tokens, mask, _, _ in batches(examples, config.batch_size, config.seq_len, pad_id):
        loss, n = eval_step(adapters, base_params, tokens, mask)
        losses.append(float(loss) * mask[:, 1:].sum())
        hits += int(n)
    total = sum(int(np.asarray(e.mask[1:config.seq_len]).sum()) for e in examples)
    return {"loss": sum(losses) / max(total, 1), "exact_match": hits / max(len(examples), 1)}


def finetune(model: Model, train: list[Example], held_out: list[Example],
             config: TrainConfig = TrainConfig(), name: str = "adapter",
             progress: bool = True) -> Result:
    """Train an adapter of `config.spec` on `train`; evaluate on `held_out` every eval_every
    updates and at the end, one example per row (packing, `config.pack`, applies to the
    training batches only). The base params are read, never written."""
    if not train:
        raise ValueError("no training examples (`train` is empty)")
    if model.config.tp != 1:
        raise ValueError("train on a model loaded for one device (its config has tp="
                         f"{model.config.tp})")
    cut = sum(len(e.tokens) > config.seq_len for e in (*train, *held_out))
    if cut:   # their completions' ends (EOS included) would never be learned or checked
        print(f"warning: {cut} of {len(train) + len(held_out)} examples are longer than "
              f"seq_len={config.seq_len} and are cut; the longest has "
              f"{max(len(e.tokens) for e in (*train, *held_out))} tokens", file=sys.stderr)
    _check_completions_fit(train, config.seq_len)
    rows = pack(train, config.seq_len) if config.pack else train
    adapters = Adapters(model.config, config.spec, model.params, nnx.Rngs(config.seed))
    opt = nnx.Optimizer(adapters, optimizer(config), wrt=nnx.LoRAParam)
    pad_id = 0
    mngr = checkpoint.manager(config.checkpoint_dir) if config.checkpoint_dir else None
    done = checkpoint.restore_latest(mngr, adapters, opt) if mngr else 0
    result = Result(adapter=None, module=adapters, first_step=done + 1)
    start, tokens_seen = time.perf_counter(), 0
    for step in range(done + 1, config.steps + 1):
        micro_batches = [batch_at(rows, config, step, micro, pad_id)
                         for micro in range(config.accumulate)]
        n_tokens = sum(int(loss_weight(b[1], b[2]).sum()) for b in micro_batches)
        weight = jnp.float32(config.accumulate / max(n_tokens, 1))
        total = 0.0
        for micro, batch in enumerate(micro_batches):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), step),
                                     micro)
            total += train_step(adapters, opt, model.params, batch, key, weight,
                                remat=config.remat)
        tokens_seen += n_tokens
        result.losses.append(float(total) / max(n_tokens, 1))   # the update's per-token loss
        if held_out and (step % config.eval_every == 0 or step == config.steps):
            result.evals.append({"step": step, **evaluate(adapters, model.params, held_out,
                                                          config, pad_id)})
        if mngr and (step % config.checkpoint_every == 0 or step == config.steps):
            checkpoint.save(mngr, step, adapters, opt)
        if progress:
            _progress(step - done, config.steps - done, result, tokens_seen,
                      time.perf_counter() - start)
    if mngr:
        mngr.wait_until_finished()
    if progress:
        print(file=sys.stderr)
    result.adapter = to_adapter(adapters, name)
    return result


def _check_completions_fit(train: list[Example], seq_len: int) -> None:
    """Refuse training data of which seq_len keeps no completion token: the loss would be 0
    and nothing would train. (A token at index j is learned when 1 <= j < seq_len.)"""
    if any(e.mask[1:seq_len].any() for e in train):
        return
    prompts = [int(np.argmax(e.mask)) if e.mask.any() else len(e.tokens) for e in train]
    raise ValueError(f"seq_len={seq_len} leaves no completion token of any training example to "
                     f"learn: the prompts (chat template included) have {min(prompts)} to "
                     f"{max(prompts)} tokens; raise seq_len above the prompt lengths")


def batch_at(examples: list[Example], config: TrainConfig, step: int, micro: int,
             pad_id: int = 0):
    """The micro-batch (tokens, mask, segments, positions) of update `step` (from 1) over
    examples or packed rows: a function of (seed, step), so a resumed run sees exactly the
    batches an uninterrupted one would. Each epoch is a fresh shuffle."""
    B, n = config.batch_size, len(examples)
    i = (step - 1) * config.accumulate + micro
    per_epoch = max(1, n // B)
    order = np.random.default_rng([config.seed, i // per_epoch]).permutation(n)
    chunk = [examples[j] for j in order[(i % per_epoch) * B:(i % per_epoch + 1) * B]]
    return next(batches(chunk, B, config.seq_len, pad_id))


def _progress(step, steps, result, tokens, elapsed):
    eta = elapsed / step * (steps - step)
    last = result.evals[-1] if result.evals else None
    ev = f"  eval loss {last['loss']:.3f} match {last['exact_match']:.2f}" if last else ""
    bar = "#" * int(30 * step / steps)
    print(f"\r[{bar:<30}] {step}/{steps} loss {result.losses[-1]:.3f}{ev}  "
          f"{tokens / elapsed:.0f} target tok/s  ETA {eta:.0f} s", end="", file=sys.stderr,
          flush=True)
