"""The `jlora generate` command line, run in-process on the tiny preset (token-id prompts)."""

import json

import pytest

from jlora.cli import main


def write_requests(tmp_path, lines):
    path = tmp_path / "reqs.jsonl"
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines))
    return path


def test_requests_file_gives_one_json_line_per_request_in_order(tmp_path, capsys):
    reqs = [{"prompt_token_ids": [5, 6, 7], "max_tokens": 4, "ignore_eos": True},
            {"prompt_token_ids": [9] * 20, "max_tokens": 2, "ignore_eos": True,
             "temperature": 0.9, "seed": 3},
            {"prompt_token_ids": [3], "max_tokens": 6, "ignore_eos": True, "top_k": 5,
             "temperature": 1.0, "seed": 1}]
    assert main(["generate", "--model", "tiny", "--json", "--requests",
                 str(write_requests(tmp_path, reqs))]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [l["index"] for l in lines] == [0, 1, 2]
    assert [len(l["token_ids"]) for l in lines] == [4, 2, 6]
    assert all(l["finish_reason"] == "length" and l["text"] == "" for l in lines)
    assert [l["prompt_tokens"] for l in lines] == [3, 20, 1]


@pytest.mark.parametrize("line, message", [
    ("{not json", "reqs.jsonl:1: not valid JSON"),
    ('["a list"]', "reqs.jsonl:1: each line must be a JSON object"),
    ({"prompt_token_ids": [1], "temprature": 1}, "unknown keys ['temprature']; allowed: prompt"),
    ({"prompt": "a", "prompt_token_ids": [1]}, "give exactly one of prompt, prompt_token_ids"),
    ({"prompt_token_ids": [1], "top_p": 2}, "reqs.jsonl:1: sampling parameter top_p=2 is "
                                            "invalid: must be a number in (0, 1]"),
    ({"prompt_token_ids": "1 2"}, "prompt_token_ids has the wrong type"),
    ({"prompt": "hello"}, "has no tokenizer (random-weight preset)"),
    ({"prompt_token_ids": [1], "stop": ["x"]}, "stop strings need a tokenizer"),
    ({"prompt_token_ids": [1], "stop_token_ids": "x"},
     "reqs.jsonl:1: sampling parameter stop_token_ids=('x',) is invalid"),
])
def test_bad_requests_get_one_line_naming_the_problem(tmp_path, capsys, line, message):
    code = main(["generate", "--model", "tiny", "--requests",
                 str(write_requests(tmp_path, [line]))])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("jlora: error: ") and message in err and err.count("\n") == 1


def test_unknown_model(capsys):
    assert main(["generate", "--model", "no-such-model", "hi"]) == 2
    assert "neither a model directory, a GGUF file, 'smollm2' nor a preset" in \
        capsys.readouterr().err


def test_nothing_to_generate(capsys):
    assert main(["generate", "--model", "tiny"]) == 2
    assert "give a PROMPT or --requests" in capsys.readouterr().err


def test_serve_lora_kernel_option_follows_the_engine():
    """`jlora serve --lora-kernel` keeps its own copy of the choices and default (building
    the parser imports no jax); they must stay the engine's."""
    from jlora.cli import build_parser
    from serving.engine import LORA_KERNELS, EngineConfig
    args = build_parser().parse_args(["serve"])
    assert args.lora_kernel == EngineConfig.lora_kernel
    for kernel in LORA_KERNELS:
        assert build_parser().parse_args(["serve", "--lora-kernel", kernel]).lora_kernel == kernel
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--lora-kernel", "bgmv"])


@pytest.mark.parametrize("flags, message", [
    (["--max-loras", "0"], "--max-loras 0: must be >= 1"),
    (["--max-lora-rank", "0"], "--max-lora-rank 0: must be >= 1"),
    (["--max-loras", "1"], "--max-loras 1 is fewer than the 2 adapters given"),
])
def test_adapter_sizes_are_checked_before_anything_loads(capsys, flags, message):
    argv = ["generate", "--model", "tiny", "--adapter", "a=/no/such/a", "--adapter",
            "b=/no/such/b", *flags, "--json", "hi"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("jlora: error: ") and message in err
