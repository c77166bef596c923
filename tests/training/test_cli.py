"""`jlora train` on the embedded SmolLM2 (slow: a few real training steps on the CPU), then
`jlora generate --adapter` serves the directory it wrote; bad input is one error line."""

import json

import pytest

from jlora.cli import main


def write_task(path, n=24):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Add {i} and {2 * i}.", "completion": str(3 * i)}))
            f.write("\n")
    return path


@pytest.mark.slow
def test_train_writes_an_adapter_that_generate_serves(tmp_path, capsys):
    data = write_task(tmp_path / "add.jsonl")
    out = tmp_path / "add"
    assert main(["train", "--data", str(data), "--out", str(out), "--variant", "dora",
                 "--rank", "4", "--steps", "2", "--batch-size", "2", "--seq-len", "96",
                 "--eval-every", "2", "--pack"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["train_examples"] + report["held_out"] == 24 and report["evals"]
    assert {p.name for p in out.iterdir()} >= {"adapter.json", "adapter.safetensors",
                                               "adapter_config.json",
                                               "adapter_model.safetensors"}
    assert main(["generate", "--adapter", f"add={out}", "--use-adapter", "add", "--json",
                 "--max-tokens", "4", "Add 2 and 4."]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["adapter"] == "add" and len(line["token_ids"]) >= 1


@pytest.mark.parametrize("extra, message", [
    (["--variant", "vera"], "invalid choice: 'vera'"),
    (["--rank", "0"], "rank=0 must be an integer in [1, 256]"),
    (["--targets", "q,qq"], "targets ['q', 'qq'] must be a non-empty subset"),
    (["--tied-train", "a,x"], "--tied-train 'a,x': choose among a, b, u, v"),
    (["--variant", "tied", "--tied-train", ","],
     "--tied-train ',' trains nothing: choose one or more of a, b, u, v"),
    (["--alpha", "0"], "alpha=0.0 must be a finite number > 0"),
    (["--warmup", "-1"], "warmup=-1 must be an integer >= 0"),
])
def test_bad_arguments_are_one_error_line(tmp_path, capsys, extra, message):
    data = write_task(tmp_path / "add.jsonl", 4)
    try:
        code = main(["train", "--model", "tiny", "--data", str(data), "--out",
                     str(tmp_path / "o"), *extra])
    except SystemExit as e:      # argparse's own refusals
        code = e.code
    assert code == 2 and message in capsys.readouterr().err


def test_a_model_without_tokenizer_is_refused(tmp_path, capsys):
    data = write_task(tmp_path / "add.jsonl", 4)
    assert main(["train", "--model", "tiny", "--data", str(data), "--out",
                 str(tmp_path / "o")]) == 2
    assert "has no tokenizer to encode the training text" in capsys.readouterr().err


def test_a_held_out_fraction_that_leaves_no_training_example_is_refused():
    from training.cli import split_for_training
    from training.data import example
    examples = [example([5, 6], [7]), example([5, 6], [8])]
    with pytest.raises(ValueError, match=r"--held-out 0\.9 holds out 2 of the 2 examples and "
                                         r"leaves no training example"):
        split_for_training(examples, 0.9, 0)
    train, held_out = split_for_training(examples, 0.5, 0)
    assert len(train) == len(held_out) == 1


def test_a_tied_adapter_replaces_an_earlier_peft_export(tmp_path):
    """LoRA then Tied-LoRA into one directory: the LoRA's PEFT files would otherwise be
    loaded as the adapter; other files in the directory stay."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jlora.config import preset
    from jlora.model import init_params
    from training.cli import PEFT_FILES, write_adapter
    from training.modules import AdapterSpec, Adapters, to_adapter
    cfg = preset("tiny")
    params = init_params(cfg, jax.random.key(0), jnp.float32)
    out = tmp_path / "out"
    for variant in ("lora", "tied"):
        ad = to_adapter(Adapters(cfg, AdapterSpec(variant, 4), params, nnx.Rngs(0)), "x")
        write_adapter(ad, out, "tiny")
        if variant == "lora":
            assert all((out / name).exists() for name in PEFT_FILES)
            (out / "notes.txt").write_text("mine")
    assert {p.name for p in out.iterdir()} == {"adapter.json", "adapter.safetensors",
                                               "notes.txt"}
