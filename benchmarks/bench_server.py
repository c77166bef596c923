"""What the gRPC shell costs: end-to-end tokens/s through gRPC vs the in-process engine.

Workload (Punica's batch-32 Distinct): `--batch` concurrent requests, each with its own
rank-`--rank` LoRA adapter on all seven projections, prompts of `--prompt-len` random
tokens, `--max-tokens` generated each (ignore_eos), all submitted at once. A run's
throughput is the tokens generated over the wall time from the first submit to the last
final output. Both paths serve the same requests on the same engine:

- in-process: `Engine.submit` for each, then each stream's final `result()` (the engine's
  own loop runs on its background thread; nothing reads per token);
- gRPC: the engine behind `JloraServer` in this process; the client (`AsyncClient`, one
  stream per request) runs in a child process, as a real client would, so it does not
  share this process's interpreter with the engine.

Each path: one warm-up run, then the median of its timed runs (`--repeats` through gRPC;
`--repeats` in-process before the gRPC runs and as many after). Target: gRPC >= 95% of
in-process on the GPU machine.

    python -m benchmarks.bench_server --model llama2-7b                  # GPU machine
    python -m benchmarks.bench_server --model tiny --max-tokens 32 --repeats 3   # CPU check
The last line of stdout is one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def requests(batch: int, prompt_len: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab, prompt_len).tolist() for _ in range(batch)]


def run_in_process(engine, prompts, max_tokens: int) -> tuple[int, float]:
    """Submit all, wait for each final result: the engine's throughput with no per-token
    reader at all (the strictest baseline for the gRPC path)."""
    from jlora.sampling import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    t = time.perf_counter()
    streams = [engine.submit(p, params, adapter=f"a{i}") for i, p in enumerate(prompts)]
    tokens = sum(len(s.result(timeout=3600).token_ids) for s in streams)
    return tokens, time.perf_counter() - t


def client_main(args) -> None:
    """The child process: run the gRPC workload `--repeats + 1` times, print one JSON."""
    from serving.client import AsyncClient
    prompts = requests(args.batch, args.prompt_len, args.vocab)

    async def one(client, i):
        call = client.generate_stream(prompts[i], adapter=f"a{i}", max_tokens=args.max_tokens,
                                      ignore_eos=True)
        return sum([len(part.token_ids) async for part in call])

    async def main():
        runs = []
        async with AsyncClient(args.client) as client:
            for _ in range(args.repeats + 1):
                t = time.perf_counter()
                tokens = await asyncio.gather(*(one(client, i) for i in range(len(prompts))))
                runs.append((sum(tokens), time.perf_counter() - t))
        return runs
    print(json.dumps(asyncio.run(main())))


def build_engine(args):
    import jax
    import jax.numpy as jnp

    from jlora.adapters import Adapter, ModuleAdapter, TARGETS, target_shapes
    from jlora.config import preset
    from jlora.loader import Model
    from jlora.model import init_params
    from serving.engine import Engine, EngineConfig
    cfg = preset(args.model)
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    model = Model(cfg, init_params(cfg, jax.random.key(0), dtype), None, cfg.name)
    length = args.prompt_len + args.max_tokens
    # Every request runs at once, so one step shape per phase serves the whole workload and
    # start-up compiles 4 programs per sampler mode, not the default buckets' dozens.
    buckets = dict(decode_buckets=(0, args.batch), prefill_buckets=(0, args.prefill_budget))
    engine = Engine(model, EngineConfig(
        max_seqs=args.batch, max_seq_len=length, prefill_budget=args.prefill_budget,
        num_pages=args.batch * -(-length // 16) + 1, max_queue=4 * args.batch,
        max_loras=args.batch, max_lora_rank=args.rank, host_lora_gb=1e3, freeze_gc=True, **buckets))
    rng = np.random.default_rng(1)
    modules = {}   # one set of random weights, shared: each adapter still has its own slot
    for layer in range(cfg.n_layers):
        for t in TARGETS:
            n_in, n_out = target_shapes(cfg)[t]
            a = (rng.normal(size=(args.rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
            b = (rng.normal(size=(n_out, args.rank)) * 0.01).astype(np.float32)
            modules[(layer, t)] = ModuleAdapter(a, b, 2.0)
    for i in range(args.batch):
        engine.adapters.load(f"a{i}", Adapter(f"a{i}", "lora", modules))   # all fit: no swaps
    return engine, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama2-7b", help="a shape preset (random weights)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--prefill-budget", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--client", default=None, help=argparse.SUPPRESS)   # child process
    ap.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        return client_main(args)

    import jax

    from serving.server import ServerOptions, ServerThread
    t = time.perf_counter()
    engine, cfg = build_engine(args)
    setup_s = time.perf_counter() - t
    print(f"engine ready in {setup_s:.1f} s", flush=True)
    engine.start()
    prompts = requests(args.batch, args.prompt_len, cfg.vocab_size)
    local = [run_in_process(engine, prompts, args.max_tokens) for _ in range(args.repeats + 1)]
    print(f"in-process runs done ({len(local)})", flush=True)
    server = ServerThread(engine, ServerOptions(port=0), model_name=cfg.name)
    port = server.start()
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_server", "--client", f"127.0.0.1:{port}",
         "--batch", str(args.batch), "--prompt-len", str(args.prompt_len), "--max-tokens",
         str(args.max_tokens), "--repeats", str(args.repeats), "--vocab", str(cfg.vocab_size)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True)
    remote = json.loads(child.stdout.strip().splitlines()[-1])
    server.stop()
    # in-process again after gRPC, so drift over time (clocks, other load) hits both paths
    local += [run_in_process(engine, prompts, args.max_tokens) for _ in range(args.repeats)]
    engine.close()

    expected = args.batch * args.max_tokens
    for tokens, _ in local + remote:
        assert tokens == expected, f"{tokens} tokens generated, expected {expected}"
    rate = lambda runs: statistics.median(n / s for n, s in runs[1:])  # noqa: E731
    local_tps, grpc_tps = rate(local), rate([tuple(r) for r in remote])
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"model {cfg.name}, batch {args.batch} Distinct rank {args.rank}, prompt "
          f"{args.prompt_len}, {args.max_tokens} tokens each (setup {setup_s:.1f} s)")
    print(f"in-process: {local_tps:9.1f} tokens/s")
    print(f"gRPC:       {grpc_tps:9.1f} tokens/s  ({100 * grpc_tps / local_tps:.1f}% of "
          f"in-process; target >= 95%)")
    print(json.dumps(dict(bench="server", device=device.device_kind, jax=jax.__version__,
                          model=cfg.name, batch=args.batch, rank=args.rank,
                          prompt_len=args.prompt_len, max_tokens=args.max_tokens,
                          repeats=args.repeats, in_process_tokens_per_s=local_tps,
                          grpc_tokens_per_s=grpc_tps, grpc_vs_in_process=grpc_tps / local_tps,
                          runs=dict(in_process=local, grpc=remote))))


if __name__ == "__main__":
    main()
