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
