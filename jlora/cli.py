"""The `jlora` command line: `generate` (a batch of prompts, here or on a server), `chat`
(an interactive session), `train` (fine-tune an adapter: training/cli.py), and `serve` and
`adapters` (the gRPC server and its adapters: serving/cli.py).

Parses arguments and request files, calls `jlora.generate`, prints. Errors a user can cause
are printed as one line naming the bad value, with exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jlora.jsonl import read_objects
from jlora.loader import DEFAULT_MODEL, DTYPES

REQUEST_KEYS = ("prompt", "prompt_token_ids", "messages", "max_tokens", "temperature", "top_p",
                "top_k", "seed", "stop", "stop_token_ids", "ignore_eos", "adapter")
_SAMPLING_KEYS = REQUEST_KEYS[3:-1]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="smollm2 (default, embedded), a Hugging Face model directory, a .gguf "
                        "file, or a preset name (llama2-7b, llama3-8b, smollm2-135m, tiny)")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="weights and activations (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 (default) disables top-k")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="register an adapter (PEFT or jlora directory); repeatable. With "
                        "--server: NAME, an adapter loaded in the server")
    p.add_argument("--use-adapter", metavar="NAME", default=None,
                   help="the adapter the PROMPT arguments run with (default: the base model)")
    p.add_argument("--max-loras", type=int, default=None,
                   help="adapter slots on the device (default: one per --adapter)")
    p.add_argument("--max-lora-rank", type=int, default=None,
                   help="largest adapter rank a slot holds (default: the largest given)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jlora", description="Multi-LoRA serving in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate completions for a batch of prompts")
    _add_model_args(gen)
    gen.add_argument("--no-chat", action="store_true",
                     help="send prompts as raw text instead of through the chat template")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON line per request, in input order")
    gen.add_argument("--requests", type=Path,
                     help="JSONL file, one request per line: prompt or prompt_token_ids, and "
                          f"any of {', '.join(_SAMPLING_KEYS)}")
    gen.add_argument("prompts", nargs="*", metavar="PROMPT")
    gen.add_argument("--server", metavar="HOST:PORT", default=None,
                     help="generate on a jlora server instead of loading the model here")
    gen.add_argument("--tenant", default="", help="with --server: the tenant to run as")
    from serving.cli import add_connection_args, add_parsers as add_server_parsers
    add_connection_args(gen)
    chat = sub.add_parser("chat", help="talk with the model in the terminal")
    _add_model_args(chat)
    from training.cli import add_parser as add_train_parser
    add_train_parser(sub)
    add_server_parsers(sub)
    return parser


def _sampling(args, overrides: dict | None = None):
    from jlora.sampling import SamplingParams
    values = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, stop=tuple(args.stop),
                  ignore_eos=args.ignore_eos)
    values.update(overrides or {})
    if isinstance(values["stop"], str):
        values["stop"] = (values["stop"],)
    return SamplingParams(**values)


def read_requests(path: Path, args) -> tuple[list, list, list]:
    """Prompts, sampling params and adapter names from a JSONL file; errors name the line."""
    prompts, params, adapters = [], [], []
    for where, req in read_objects(path, "requests file"):
        unknown = sorted(set(req) - set(REQUEST_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; allowed: {', '.join(REQUEST_KEYS)}")
        given = [k for k in ("prompt", "prompt_token_ids", "messages") if k in req]
        if len(given) != 1:
            raise ValueError(f"{where}: give exactly one of prompt, prompt_token_ids, messages "
                             f"(got {given or 'none'})")
        prompt = req[given[0]]
        ok = {"prompt": lambda p: isinstance(p, str),
              "prompt_token_ids": lambda p: isinstance(p, list) and all(
                  isinstance(t, int) and not isinstance(t, bool) for t in p),
              "messages": lambda p: isinstance(p, list) and all(isinstance(m, dict) for m in p)}
        if not ok[given[0]](prompt):
            raise ValueError(f"{where}: {given[0]} has the wrong type: {prompt!r}")
        try:
            params.append(_sampling(args, {k: req[k] for k in _SAMPLING_KEYS if k in req}))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None
        adapter = req.get("adapter")
        if adapter is not None and not isinstance(adapter, str):
            raise ValueError(f"{where}: adapter must be a name (string), got {adapter!r}")
        prompts.append(prompt)
        adapters.append(adapter)
    if not prompts:
        raise ValueError(f"requests file {path} has no requests")
    return prompts, params, adapters


def load_adapters(model, args) -> None:
    """Register every --adapter NAME=PATH in the model's bank."""
    from jlora.formats.native import read_adapter
    from jlora.loader import load_adapter
    pairs = []
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=PATH")
        if name in (n for n, _ in pairs):
            raise ValueError(f"--adapter {spec!r}: the name {name!r} is given twice")
        pairs.append((name, path))
    if not pairs:
        return
    for flag, value in (("--max-loras", args.max_loras), ("--max-lora-rank", args.max_lora_rank)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be >= 1 (or left out: sized to the "
                             "adapters given)")
    if args.max_loras is not None and args.max_loras < len(pairs):
        raise ValueError(f"--max-loras {args.max_loras} is fewer than the {len(pairs)} "
                         "adapters given: raise it, or leave it out")
    adapters = [read_adapter(p, model.config.n_layers, n) for n, p in pairs]
    max_rank = args.max_lora_rank or max(a.max_rank for a in adapters)
    for adapter in adapters:
        load_adapter(model, adapter, max_loras=args.max_loras or len(adapters),
                     max_lora_rank=max_rank)


def cmd_generate(args) -> int:
    from jlora.generate import generate
    from jlora.loader import load_model
    if args.requests and args.prompts:
        raise ValueError("give prompts either as arguments or with --requests, not both")
    if args.requests:
        prompts, params, adapters = read_requests(args.requests, args)
    elif args.prompts:
        prompts, params = args.prompts, [_sampling(args)] * len(args.prompts)
        adapters = [args.use_adapter] * len(prompts)
    else:
        raise ValueError("nothing to generate: give a PROMPT or --requests FILE.jsonl")
    if args.server:
        return _generate_on_server(args, prompts, params, adapters)
    model = load_model(args.model, args.dtype)
    load_adapters(model, args)
    completions = generate(model, prompts, params, chat=not args.no_chat, adapters=adapters)
    for i, c in enumerate(completions):
        if args.json:
            print(json.dumps({"index": i, "adapter": adapters[i] or None, "text": c.text,
                              "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                              "prompt_tokens": len(c.prompt_token_ids)}, ensure_ascii=False))
        else:
            if len(completions) > 1:
                print(f"--- request {i} ({c.finish_reason}) ---")
            print(c.text)
    return 0


def _generate_on_server(args, prompts, params, adapters) -> int:
    from serving.cli import generate_remote
    named = [a for a in args.adapter if "=" in a]
    if named:
        raise ValueError(f"--adapter {named[0]!r}: with --server, give the NAME of an adapter "
                         "loaded in the server (jlora adapters load NAME PATH --server ...)")
    if len(args.adapter) > 1:
        raise ValueError(f"--adapter is given {len(args.adapter)} times; with --server give "
                         "one, or an \"adapter\" per line of --requests")
    chosen = args.use_adapter or (args.adapter[0] if args.adapter else None)
    if not args.requests:
        adapters = [chosen] * len(prompts)
    return generate_remote(args, prompts, params, adapters)


def cmd_chat(args) -> int:
    from jlora.generate import generate
    from jlora.loader import load_model
    model = load_model(args.model, args.dtype)
    load_adapters(model, args)
    if model.tokenizer is None or model.tokenizer.chat_template is None:
        raise ValueError(f"model {args.model!r} has no chat template")
    params = _sampling(args)
    messages: list[dict] = []
    print(f"Chatting with {model.source}. Empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        reply = generate(model, [messages], params, adapters=[args.use_adapter])[0].text
        messages.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from serving import cli as server_cli
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            from training.cli import cmd_train
            return cmd_train(args)
        return {"generate": cmd_generate, "chat": cmd_chat, "serve": server_cli.cmd_serve,
                "adapters": server_cli.cmd_adapters}[args.command](args)
    except (ValueError, OSError, TimeoutError) as e:   # OSError: files, ports
        print(f"jlora: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:   # a server's refusal; grpc is imported only by server commands
        grpc = sys.modules.get("grpc")
        if grpc is None or not isinstance(e, grpc.RpcError):
            raise
        print(f"jlora: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
