"""Where does the two-GPU engine crash? Stages from a bare collective up to the sharded engine.

The sharded `llama2-7b` engine segfaulted on an `nvidia-h200-x2` machine with no Python
frame on the stack (benchmarks/RESULTS.md, issue 5). Each stage here runs in its own
process (a crash ends that stage only) and prints one line: ok, the error, or the signal.

  1 psum        jnp.sum of a sharded array, and a psum inside shard_map
  2 megatron    a column- then row-parallel MLP under jit with NamedShardings
  3 engine-xla  the tiny preset's engine, tp=N, XLA kernels, float32: tokens vs one device
  4 engine-pl   the same with the Pallas kernels (bfloat16)
  5 7b-xla      llama2-7b, tp=N, XLA kernels, float32 (the case that crashed)

    python -m benchmarks.diagnose_tp --tp 2 [--stages psum megatron ...]
The last line of stdout is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

STAGES = ("psum", "megatron", "engine-xla", "engine-pl", "7b-xla")


def stage(name: str, tp: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from serving.sharding import make_mesh
    mesh = make_mesh(tp)
    if name == "psum":
        x = jax.device_put(jnp.arange(1024.0 * tp), NamedSharding(mesh, P("tp")))
        assert float(jnp.sum(x)) == float(np.arange(1024.0 * tp).sum())
        f = jax.shard_map(lambda v: jax.lax.psum(v.sum(), "tp"), mesh=mesh, in_specs=P("tp"),
                          out_specs=P(), check_vma=False)
        assert float(jax.jit(f)(x)) == float(np.arange(1024.0 * tp).sum())
    elif name == "megatron":
        k = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(k[0], (8, 1024))
        w1, w2 = jax.random.normal(k[1], (1024, 4096)), jax.random.normal(k[2], (4096, 1024))
        ref = jnp.maximum(x @ w1, 0) @ w2
        w1s = jax.device_put(w1, NamedSharding(mesh, P(None, "tp")))
        w2s = jax.device_put(w2, NamedSharding(mesh, P("tp", None)))
        out = jax.jit(lambda x, a, b: jnp.maximum(x @ a, 0) @ b)(x, w1s, w2s)
        assert float(jnp.max(jnp.abs(out - ref))) < 1e-2 * float(jnp.max(jnp.abs(ref)))
    else:
        engine_stage(name, tp)


def engine_stage(name: str, tp: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.bench_decode import random_bank
    from jlora.config import preset
    from jlora.loader import Model
    from jlora.model import init_params
    from jlora.sampling import SamplingParams
    from serving.engine import Engine, EngineConfig

    cfg = preset("llama2-7b" if name == "7b-xla" else "tiny")
    dtype = jnp.bfloat16 if name == "engine-pl" else jnp.float32
    impl = "pallas" if name == "engine-pl" else "xla"
    prompts = [np.random.default_rng(i).integers(3, cfg.vocab_size, 20 + 7 * i).tolist()
               for i in range(4)]
    outs = []
    for n in (1, tp):
        bank = random_bank(cfg, 4, 16, dtype, jax.random.key(3))
        model = Model(cfg, init_params(cfg, jax.random.key(0), dtype), None, cfg.name, bank)
        config = EngineConfig(max_seqs=4, page_size=16, num_pages=64, prefill_budget=128,
                              decode_buckets=(0, 4), prefill_buckets=(0, 128), impl=impl, tp=n)
        print(f"  {name}: engine on {n} device(s)", flush=True)
        engine = Engine(model, config)
        outs.append([o.token_ids for o in engine.generate(
            prompts, SamplingParams(max_tokens=8, ignore_eos=True),
            adapters=[None, "random-1", "random-2", "random-3"])])
        engine.close()
    assert outs[0] == outs[1] or dtype == jnp.bfloat16, outs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--run-stage", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_stage:
        import faulthandler
        faulthandler.enable(all_threads=True)
        stage(args.run_stage, args.tp)
        return
    report = {}
    for name in args.stages:
        p = subprocess.run([sys.executable, "-m", "benchmarks.diagnose_tp", "--tp",
                            str(args.tp), "--run-stage", name], capture_output=True, text=True,
                           env=os.environ, timeout=900)
        if p.returncode == 0:
            result = "ok"
        elif p.returncode < 0:
            result = f"killed by {signal.Signals(-p.returncode).name}"
        else:
            result = "error: " + (p.stderr.strip().splitlines() or ["?"])[-1]
        report[name] = result
        print(f"{name:11s} {result}", flush=True)
        if p.returncode:
            print("  " + "\n  ".join((p.stdout + p.stderr).strip().splitlines()[-25:]),
                  flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
