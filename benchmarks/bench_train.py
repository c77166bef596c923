"""Training-step benchmark: tokens/s, peak memory and model FLOPs utilisation of fine-tuning.

Times `training.loop.train_step` (the step `finetune` runs: forward, backward into the
adapter only, clipping, AdamW) on random tokens of a shape preset with random base weights,
every token counted in the loss; the median over timed steps after warm-up steps.

Model FLOPs per token, with the base weights frozen (no gradients for them), are counted as

    4 * N_mm                          base matmuls: 2 N_mm forward + 2 N_mm for the activation
                                      gradients of the backward pass (no weight gradients)
  + 6 * L * H * E * S                 attention scores and values, causal (S/2 keys on
                                      average): 2 * 2 * L*H*E*S/2 forward, twice that backward
  + 6 * r * sum(in + out) * L         adapter A and B: forward, activation and weight grads

where N_mm counts the weights that multiply (every projection and the output head, the
embedding lookup excluded), S is the sequence length and the sum runs over the targeted
modules. The usual 6 * N would count weight gradients the frozen base never computes. DoRA's
per-step column norms are left out (they do not grow with tokens). MFU divides the achieved
model FLOP/s by the device's dense bfloat16 peak (`--peak-tflops`, known for H100/H200).

Peak memory: the device's `peak_bytes_in_use` where the runtime reports it (GPU); on the
CPU, which reports nothing, the compiled step's own memory analysis (arguments + outputs +
scratch), labelled as such. The last line of stdout is one JSON document.

    python -m benchmarks.bench_train --model smollm2-135m --rank 16 --batch 8 --seq-len 512
    python -m benchmarks.bench_train --model llama3-8b --rank 16 --batch 4 --seq-len 512
    python -m benchmarks.bench_train --model tiny --steps 3 --warmup 1     # CPU smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora.adapters import target_shapes
from jlora.config import ModelConfig, preset
from jlora.model import init_params
from training.loop import TrainConfig, optimizer, train_step
from training.modules import VARIANTS, AdapterSpec, Adapters

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}   # dense, per GPU (NVIDIA data sheets)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that multiply activations: every projection and the output head."""
    D, E, H, G, F = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim
    per_layer = D * (H + 2 * G) * E + H * E * D + 3 * D * F
    return cfg.n_layers * per_layer + cfg.vocab_size * D


def train_flops_per_token(cfg: ModelConfig, spec: AdapterSpec, seq_len: int) -> float:
    """Model FLOPs of one trained token (the formula in the module docstring)."""
    shapes = target_shapes(cfg)
    adapter = 6 * spec.rank * sum(sum(shapes[t]) for t in spec.targets) * cfg.n_layers
    attention = 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return 4 * matmul_params(cfg) + attention + adapter


def setup(cfg: ModelConfig, spec: AdapterSpec, batch: int, seq_len: int, dtype, seed: int = 0):
    """Base params, adapter, optimizer and one random batch (every token in the loss)."""
    params = init_params(cfg, jax.random.key(seed), dtype)
    adapters = Adapters(cfg, spec, params, nnx.Rngs(seed))
    opt = nnx.Optimizer(adapters, optimizer(TrainConfig(spec, steps=1000)), wrt=nnx.LoRAParam)
    tokens = jax.random.randint(jax.random.key(seed + 1), (batch, seq_len), 3, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    data = (tokens.astype(jnp.int32), jnp.ones((batch, seq_len), bool),
            jnp.zeros((batch, seq_len), jnp.int32), positions)
    return params, adapters, opt, data


def per_token(data) -> jax.Array:
    """train_step's gradient weight for one micro-batch an update: 1 / its loss tokens."""
    return jnp.float32(1 / (data[0].shape[0] * (data[0].shape[1] - 1)))


def compiled_bytes(adapters, opt, params, data, key, remat: bool = False) -> dict:
    """The compiled train step's memory analysis (what XLA plans to hold at once)."""
    m = train_step.lower(adapters, opt, params, data, key, per_token(data),
                         remat=remat).compile().memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "scratch": m.temp_size_in_bytes, "total": total}


def run(cfg: ModelConfig, spec: AdapterSpec, batch: int, seq_len: int, dtype, steps: int,
        warmup: int, peak_tflops: float | None, remat: bool = False) -> dict:
    params, adapters, opt, data = setup(cfg, spec, batch, seq_len, dtype)
    key = jax.random.key(7)
    planned = compiled_bytes(adapters, opt, params, data, key, remat)
    step = functools.partial(train_step, weight=per_token(data), remat=remat)
    t = time.perf_counter()
    step(adapters, opt, params, data, key).block_until_ready()
    first_s = time.perf_counter() - t       # compile included unless lower() cached it
    for _ in range(warmup):
        step(adapters, opt, params, data, key).block_until_ready()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step(adapters, opt, params, data, key)
        loss.block_until_ready()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tokens = batch * seq_len
    flops = train_flops_per_token(cfg, spec, seq_len) * tokens / step_s
    stats = jax.devices()[0].memory_stats() or {}
    return {"model": cfg.name, "variant": spec.variant, "rank": spec.rank, "remat": remat,
            "batch": batch, "seq_len": seq_len, "dtype": jnp.dtype(dtype).name,
            "step_ms": 1e3 * step_s, "step_ms_min": 1e3 * min(times), "timed_steps": steps,
            "tokens_per_s": tokens / step_s, "first_step_s": first_s,
            "model_tflops_per_s": flops / 1e12,
            "mfu": flops / (peak_tflops * 1e12) if peak_tflops else None,
            "peak_device_bytes": stats.get("peak_bytes_in_use"),
            "compiled_step_bytes": planned, "loss": float(loss),
            "trainable_params": sum(int(np.prod(x.shape)) for x in
                                    jax.tree.leaves(nnx.state(adapters, nnx.LoRAParam)))}


def peak_of_device(given: float | None) -> float | None:
    if given is not None:
        return given
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", default=["smollm2-135m"], help="shape presets")
    p.add_argument("--variant", default="lora", choices=VARIANTS)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default=None, help="base weights (default: bfloat16 on GPU, "
                                                 "float32 on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--remat", action="store_true",
                   help="gradient checkpointing (TrainConfig.remat); the recompute is not "
                        "counted in model FLOPs, so MFU falls by its cost. Device peak memory "
                        "is a process-wide maximum: compare with and without in two runs")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak for MFU (default: known for H100/H200, else none)")
    args = p.parse_args(argv)
    for name in ("batch", "seq_len", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype {args.dtype!r} must be float32 or bfloat16")
    dtype = jnp.dtype(dtype)
    peak = peak_of_device(args.peak_tflops)
    results = []
    for name in args.model:
        cfg = preset(name).replace(max_seq_len=max(preset(name).max_seq_len, args.seq_len))
        r = run(cfg, AdapterSpec(args.variant, args.rank), args.batch, args.seq_len, dtype,
                args.steps, args.warmup, peak, args.remat)
        mem = r["peak_device_bytes"] or r["compiled_step_bytes"]["total"]
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        where = "device peak" if r["peak_device_bytes"] else "compiled step"
        print(f"{name:14s} {args.variant} r={args.rank} B={args.batch} S={args.seq_len}"
              f"{' remat' if args.remat else ''}: "
              f"{r['step_ms']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, "
              f"{r['model_tflops_per_s']:.3f} TFLOP/s, MFU {mfu}, "
              f"memory {mem / 2**30:.3f} GiB ({where})")
        results.append(r)
    print(json.dumps({"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                      "jax": jax.__version__, "peak_tflops": peak, "results": results}))


if __name__ == "__main__":
    main()
