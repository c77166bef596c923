"""bench_train on the CPU at a tiny size: it runs, its last line is one JSON document, and its
model-FLOPs count is the stated formula over an independently counted parameter total."""

import json

import pytest

from benchmarks.bench_train import main, matmul_params, train_flops_per_token
from jlora.adapters import target_shapes
from jlora.config import preset
from training.modules import AdapterSpec


def test_flops_formula_counts_frozen_base_matmuls_attention_and_adapter():
    cfg = preset("tiny")                       # untied: embed and lm_head both [V, D]
    norms = cfg.n_layers * 2 * cfg.dim + cfg.dim
    assert matmul_params(cfg) == cfg.n_params - cfg.vocab_size * cfg.dim - norms
    spec = AdapterSpec("lora", rank=4, targets=("q", "v"))
    d_in_out = sum(sum(target_shapes(cfg)[t]) for t in ("q", "v"))  # (64+64) + (64+32)
    assert d_in_out == 224
    expected = (4 * matmul_params(cfg) + 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 32
                + 6 * 4 * d_in_out * cfg.n_layers)
    assert train_flops_per_token(cfg, spec, 32) == expected


def test_runs_on_the_cpu_and_ends_with_one_json_line(capsys):
    main(["--model", "tiny", "--steps", "2", "--warmup", "1", "--batch", "2",
          "--seq-len", "16", "--rank", "4", "--variant", "dora"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (r,) = out["results"]
    assert r["model"] == "tiny" and r["variant"] == "dora" and r["timed_steps"] == 2
    assert r["tokens_per_s"] == pytest.approx(2 * 16 / (r["step_ms"] / 1e3))
    assert r["mfu"] is None and out["peak_tflops"] is None       # no known peak on a CPU
    mem = r["compiled_step_bytes"]
    assert mem["total"] > mem["arguments"] > 0 and r["trainable_params"] > 0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="--seq-len=0 must be >= 1"):
        main(["--model", "tiny", "--seq-len", "0"])
    with pytest.raises(ValueError, match="--dtype 'int8' must be float32 or bfloat16"):
        main(["--model", "tiny", "--dtype", "int8"])
