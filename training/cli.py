"""`jlora train`: fine-tune an adapter from a JSONL file and write it where serving reads it.

The output directory holds the adapter in jlora's native format (adapter.json +
adapter.safetensors, the one that keeps Tied-LoRA tied) and, for LoRA and DoRA, as PEFT files
(adapter_config.json + adapter_model.safetensors) beside them: `jlora generate --adapter
NAME=DIR` and PEFT's `PeftModel.from_pretrained(model, DIR)` both take the directory as it is.
A Tied-LoRA adapter has no PEFT form: PEFT files left in the directory by an earlier run are
removed (nothing else is), so that they cannot be loaded as this adapter.
With `--serve HOST:PORT` the adapter is then loaded into a running jlora server.
"""

from __future__ import annotations

import json
from pathlib import Path

from jlora.adapters import TARGETS


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a LoRA, DoRA or Tied-LoRA adapter")
    p.add_argument("--model", default="smollm2", help="as for `jlora generate`")
    p.add_argument("--dtype", default=None, help="base weights: float32 or bfloat16")
    p.add_argument("--data", type=Path, required=True,
                   help='JSONL: {"prompt", "completion"} or {"messages": [...]} per line')
    p.add_argument("--out", type=Path, required=True, help="directory for the adapter")
    p.add_argument("--name", default=None, help="adapter name (default: the --out name)")
    p.add_argument("--variant", default="lora", choices=["lora", "dora", "tied"])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None,
                   help="default: 2 x rank (LoRA, DoRA), rank (Tied-LoRA)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma-separated modules among {','.join(TARGETS)}")
    p.add_argument("--rslora", action="store_true", help="scale alpha / sqrt(rank)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--tied-train", default="a,b,u,v",
                   help="Tied-LoRA: which of a, b, u, v train (default: all)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--pack", action="store_true",
                   help="pack several examples into each row (--batch-size then counts rows)")
    p.add_argument("--remat", action="store_true",
                   help="gradient checkpointing: recompute each layer in the backward pass "
                        "(less activation memory for one more forward)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--held-out", type=float, default=0.1, help="fraction kept for eval")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--checkpoint-dir", default=None, help="resume from / save to (orbax)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="no chat template on prompts")
    p.add_argument("--serve", default=None, metavar="HOST:PORT",
                   help="then load the adapter into this running jlora server (replacing "
                        "one of the same name)")
    from serving.cli import add_connection_args
    add_connection_args(p)


PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def cmd_train(args) -> int:
    from jlora.loader import load_model
    from training.data import load_jsonl
    from training.loop import TrainConfig, finetune
    from training.modules import AdapterSpec

    switches = {s.strip() for s in args.tied_train.split(",") if s.strip()}
    if not switches <= {"a", "b", "u", "v"}:
        raise ValueError(f"--tied-train {args.tied_train!r}: choose among a, b, u, v")
    if args.variant == "tied" and not switches:
        raise ValueError(f"--tied-train {args.tied_train!r} trains nothing: choose one or more "
                         "of a, b, u, v")
    spec = AdapterSpec(args.variant, args.rank, args.alpha,
                       tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                       args.rslora, args.dropout, *(c in switches for c in "abuv"))
    config = TrainConfig(spec, args.steps, args.batch_size, args.accumulate, args.seq_len,
                         args.lr, args.warmup, eval_every=args.eval_every, seed=args.seed,
                         checkpoint_dir=args.checkpoint_dir, pack=args.pack,
                         remat=args.remat)   # checked before the (slow) model load
    model = load_model(args.model, args.dtype)
    if model.tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer to encode the training text")
    eos = model.config.eos_token_ids[0] if model.config.eos_token_ids else None
    examples = load_jsonl(args.data, model.tokenizer, eos, chat=not args.no_chat)
    train, held_out = split_for_training(examples, args.held_out, args.seed)
    name = args.name or args.out.name
    result = finetune(model, train, held_out, config, name=name)
    write_adapter(result.adapter, args.out, args.model)
    print(json.dumps({"adapter": name, "out": str(args.out), "variant": args.variant,
                      "train_examples": len(train), "held_out": len(held_out),
                      "final_loss": result.losses[-1] if result.losses else None,
                      "evals": result.evals}))
    if args.serve:
        from serving.cli import load_into_server
        load_into_server(args, name, args.out)
    return 0


def split_for_training(examples: list, held_out: float, seed: int):
    """`training.data.split`, refusing a --held-out that leaves nothing to train on."""
    from training.data import split
    train, kept = split(examples, held_out, seed)
    if not train:
        raise ValueError(f"--held-out {held_out} holds out {len(kept)} of the {len(examples)} "
                         "examples and leaves no training example: lower it (0 keeps none)")
    return train, kept


def write_adapter(adapter, out: Path, base_model: str) -> None:
    """The native files, and the PEFT files for LoRA and DoRA; for Tied-LoRA, PEFT files of an
    earlier run in `out` are removed."""
    from jlora.formats.native import write_native
    from jlora.formats.peft import write_peft
    write_native(adapter, out)
    if adapter.variant != "tied":
        write_peft(adapter, out, base_model=base_model)
        return
    for name in PEFT_FILES:
        (Path(out) / name).unlink(missing_ok=True)
