"""The server's side of the `jlora` command: `serve`, `adapters list|load|unload|info`, and
the client half of `generate --server` and `train --serve`.

Parses arguments and hands them to serving/server.py (serve) or serving/client.py
(everything else); prints results. Errors the user can cause reach jlora/cli.py's `main` as
ValueError / FileNotFoundError / grpc.RpcError and become one `jlora: error:` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from jlora.loader import DEFAULT_MODEL, DTYPES


def add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", default=os.environ.get("JLORA_API_KEY"),
                   help="API key (default: $JLORA_API_KEY)")
    p.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    p.add_argument("--tls-ca", default=None, help="TLS with this CA certificate (PEM)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS for the server to be ready (default: don't)")


def connect(args, server: str):
    from serving.client import Client
    client = Client(server, api_key=args.api_key, tls=args.tls, tls_ca=args.tls_ca)
    if args.wait:
        client.wait_ready(args.wait)
    return client


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="serve the model and adapters over gRPC")
    p.add_argument("--model", default=DEFAULT_MODEL, help="as for `jlora generate`")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="load an adapter at start (PEFT or jlora directory); repeatable")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; others need --api-keys)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics over HTTP on this port")
    p.add_argument("--api-keys", default=None, metavar="FILE",
                   help='JSON {"KEY": {"tenant": ..., "role": "admin|user"}, ...}')
    p.add_argument("--tls-cert", default=None, help="TLS certificate chain (PEM)")
    p.add_argument("--tls-key", default=None, help="TLS private key (PEM)")
    p.add_argument("--max-loras", type=int, default=8,
                   help="adapter slots on the device (default 8; more may be loaded, and "
                        "wait their turn on the host; 0: the base model only)")
    p.add_argument("--max-lora-rank", type=int, default=64, help="largest rank served")
    p.add_argument("--adapter-dir", default="", metavar="DIR",
                   help="register every adapter directory in DIR under its directory name")
    p.add_argument("--host-lora-gb", type=float, default=8.0,
                   help="host memory for adapters not on the device (LRU by bytes)")
    p.add_argument("--policy", choices=("vtc", "fcfs"), default="vtc",
                   help="admission order: fair per tenant (VTC, default) or first come")
    p.add_argument("--lora-kernel", choices=("split", "fused", "gemm"), default="gemm",
                   help="Pallas LoRA kernels on the GPU: shrink then expand; both in one "
                        "launch (ranks <= 64); or (default) shrink, then the base matmul in "
                        "Pallas computing the expand in the same launch, on q/k/v and down, "
                        "for steps of <= 32 tokens (the others: shrink then expand)")
    p.add_argument("--max-seqs", type=int, default=None,
                   help="sequences decoded at once (default: 64 on a GPU, 8 on the CPU)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context (default: the model's on a GPU, at most 1024 on the CPU)")
    p.add_argument("--prefill-budget", type=int, default=None,
                   help="prefill tokens per step (default: 256 on a GPU, 128 on the CPU)")
    p.add_argument("--kv-memory-gb", type=float, default=0.0,
                   help="KV-cache memory (0: 90%% of the free device memory)")
    p.add_argument("--max-queue", type=int, default=1024, help="waiting requests at most")
    p.add_argument("--max-requests-per-tenant", type=int, default=0,
                   help="running + waiting requests per tenant (0: no limit)")
    p.add_argument("--max-message-bytes", type=int, default=4 << 20)
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM, how long running requests may still take")

    a = sub.add_parser("adapters", help="list, load, unload or describe a server's adapters")
    verbs = a.add_subparsers(dest="verb", required=True)
    for verb, doc in (("list", "adapters you may use"), ("load", "load an adapter (admin)"),
                      ("unload", "unload an adapter (admin)"), ("info", "one adapter")):
        v = verbs.add_parser(verb, help=doc)
        v.add_argument("--server", required=True, metavar="HOST:PORT")
        add_connection_args(v)
        if verb != "list":
            v.add_argument("name")
        if verb == "load":
            v.add_argument("path", help="adapter directory on the server's machine (a "
                           "relative path is made absolute from this shell's directory)")
            v.add_argument("--pin", action="store_true", help="keep it on the device")
            v.add_argument("--replace", action="store_true", help="replace a loaded version")
            v.add_argument("--owner", default="", metavar="TENANT",
                           help="private to this tenant (default: public)")


def cmd_serve(args) -> int:
    import asyncio

    from serving.auth import KeyRing
    from serving.server import ServerOptions, serve
    keys = KeyRing.from_file(args.api_keys) if args.api_keys else KeyRing()
    options = ServerOptions(args.host, args.port, args.metrics_port, args.max_message_bytes,
                            args.max_requests_per_tenant, args.drain_seconds, args.tls_cert,
                            args.tls_key)
    pairs = adapter_pairs(args.adapter)
    served = asyncio.run(serve(options, keys, lambda: build_engine(args, pairs),
                               log=lambda line: print(line, file=sys.stderr, flush=True)))
    if not served:   # stopped during warm-up: the build thread may be inside a compile,
        sys.stdout.flush()   # which no interpreter shutdown can end cleanly; nothing of it
        os._exit(0)          # needs finishing
    return 0


def adapter_pairs(specs: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=PATH")
        pairs.append((name, path))
    return pairs


def build_engine(args, pairs):
    """Load the model, compile the engine, load the adapters: (engine, model name)."""
    import jax

    from jlora.loader import load_model
    from serving.engine import Engine, EngineConfig
    if pairs and args.max_loras == 0:
        raise ValueError("--adapter needs adapter slots: --max-loras must be > 0")
    model = load_model(args.model, args.dtype)
    cpu = jax.default_backend() == "cpu"
    max_seqs = args.max_seqs or (8 if cpu else 64)
    max_len = args.max_seq_len if args.max_seq_len is not None else (
        min(1024, model.config.max_seq_len) if cpu else 0)
    budget = args.prefill_budget or (128 if cpu else 256)
    # On the CPU each compiled step shape costs seconds at start-up: keep to one per phase.
    buckets = dict(decode_buckets=(0, max_seqs), prefill_buckets=(0, budget)) if cpu else {}
    engine = Engine(model, EngineConfig(
        max_seqs=max_seqs, max_seq_len=max_len, prefill_budget=budget,
        kv_memory_gb=args.kv_memory_gb, max_queue=args.max_queue, max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank, adapter_dir=args.adapter_dir,
        host_lora_gb=args.host_lora_gb, policy=args.policy, lora_kernel=args.lora_kernel,
        freeze_gc=True, **buckets))
    for name, path in pairs:
        engine.adapters.load(name, path)
    return engine, args.model


def cmd_adapters(args) -> int:
    from google.protobuf.json_format import MessageToDict
    with connect(args, args.server) as client:
        if args.verb == "list":
            infos = client.list_adapters()
        elif args.verb == "load":
            infos = [client.load_adapter(args.name, os.path.abspath(args.path), pin=args.pin,
                                         replace=args.replace, owner=args.owner)]
        elif args.verb == "unload":
            client.unload_adapter(args.name)
            infos = []
            print(json.dumps({"unloaded": args.name}))
        else:
            infos = [client.get_adapter(args.name)]
    for info in infos:
        print(json.dumps(MessageToDict(info, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True)))
    return 0


def generate_remote(args, prompts: list, params: list, adapters: list) -> int:
    """`jlora generate --server`: one request per prompt, all at once; a single prompt
    streams to the terminal, several print in input order as they would locally."""
    with connect(args, args.server) as client:
        calls = [dict(adapter=a or "", tenant=args.tenant, raw=args.no_chat,
                      **dataclasses.asdict(p)) for p, a in zip(params, adapters)]
        if len(prompts) == 1 and not args.json:
            for part in client.generate_stream(prompts[0], **calls[0]):
                print(part.text, end="", flush=True)
            print()
            return 0
        with ThreadPoolExecutor(max_workers=min(32, len(prompts))) as pool:
            results = list(pool.map(lambda pc: client.generate(pc[0], **pc[1]),
                                    zip(prompts, calls)))
    for i, r in enumerate(results):
        if args.json:
            print(json.dumps({"index": i, "adapter": adapters[i] or None, "text": r.text,
                              "token_ids": r.token_ids, "finish_reason": r.finish_reason,
                              "prompt_tokens": r.prompt_tokens}, ensure_ascii=False))
        else:
            name = adapters[i] or "base"
            print(f"--- request {i} [{name}] ({r.finish_reason}) ---")
            print(r.text)
    return 0


def load_into_server(args, name: str, path) -> None:
    """`jlora train --serve`: load (or replace) the trained adapter in a running server."""
    with connect(args, args.serve) as client:
        info = client.load_adapter(name, os.path.abspath(path), replace=True)
    print(f"jlora: loaded adapter {info.name!r} (version {info.version}) into {args.serve}",
          file=sys.stderr)
