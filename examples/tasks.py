"""Generated fine-tuning tasks whose effect is measurable by exact match, and the measurement.

    python -m examples.tasks make sort --n 600 --out examples/data/sort
    jlora train --data examples/data/sort.train.jsonl --out examples/adapters/sort ...
    python -m examples.tasks eval examples/data/sort.test.jsonl --adapter sort=examples/adapters/sort

`make` writes `{"prompt", "completion"}` lines (seeded) to PREFIX.train.jsonl (90%) and
PREFIX.test.jsonl (10%, never trained on); `eval` answers a file's prompts greedily with the
base model and with each adapter, one batch each, and prints exact-match accuracy as JSON.
"""

from __future__ import annotations

import argparse
import json
import random

TASKS = ("sort", "acronym")
WORDS = ("apple banana cherry delta eagle forest garden harbor island jungle kettle lemon "
         "meadow number orange pepper quartz river silver timber umbrella valley window yellow "
         "zebra anchor bridge candle dragon ember falcon glacier hollow ivory jasper kernel "
         "lantern marble nectar oyster pillow quiver raven saddle thunder velvet willow").split()


def make(task: str, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if task == "sort":        # order 4-6 two-digit numbers
            xs = [rng.randint(10, 99) for _ in range(rng.randint(4, 6))]
            out.append({"prompt": "Sort ascending: " + " ".join(map(str, xs)),
                        "completion": " ".join(map(str, sorted(xs)))})
        elif task == "acronym":   # initials of 3-5 words, upper case
            ws = rng.sample(WORDS, rng.randint(3, 5))
            out.append({"prompt": "Acronym of: " + " ".join(ws),
                        "completion": "".join(w[0] for w in ws).upper()})
        else:
            raise ValueError(f"task {task!r} is not one of {TASKS}")
    return out


def exact_match(engine, records: list[dict], adapter: str | None, max_tokens: int = 24) -> float:
    """Greedy answers through a serving engine (continuous batching over a paged KV cache)."""
    from jlora.sampling import SamplingParams
    outs = engine.generate([r["prompt"] for r in records], SamplingParams(max_tokens=max_tokens),
                           adapters=[adapter] * len(records))
    return sum(o.text.strip() == r["completion"] for o, r in zip(outs, records)) / len(records)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("task", choices=TASKS)
    mk.add_argument("--n", type=int, default=600)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--out", required=True, help="prefix of the .train/.test.jsonl files")
    ev = sub.add_parser("eval")
    ev.add_argument("data")
    ev.add_argument("--model", default="smollm2")
    ev.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    args = ap.parse_args(argv)
    if args.cmd == "make":
        records = make(args.task, args.n, args.seed)
        k = len(records) - max(1, len(records) // 10)
        for part, rows in (("train", records[:k]), ("test", records[k:])):
            with open(f"{args.out}.{part}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        return
    from jlora.loader import load_adapter, load_model
    from serving.engine import Engine, EngineConfig
    model = load_model(args.model)
    with open(args.data) as f:
        held_out = [json.loads(line) for line in f if line.strip()]
    for spec in args.adapter:
        name, path = spec.split("=", 1)
        load_adapter(model, path, name=name, max_loras=len(args.adapter), max_lora_rank=16)
    engine = Engine(model, EngineConfig(max_seqs=16, max_seq_len=256, prefill_budget=128,
                                        decode_buckets=(0, 16), prefill_buckets=(0, 128)))
    result = {"held_out": len(held_out), "base": exact_match(engine, held_out, None)}
    for spec in args.adapter:
        name = spec.split("=", 1)[0]
        result[name] = exact_match(engine, held_out, name)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
