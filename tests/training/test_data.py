"""Training data: the completion holds only its own tokens (no BOS), and malformed lines are
one error naming the file, the line and what is allowed."""

import json

import pytest

from training.data import encode, load_jsonl


class BosTokenizer:
    """Adds BOS (1) unless add_special_tokens=False, like a Llama-3 tokenizer; a character is
    one token (its code point), the chat template wraps the user text in 5 ... 6."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def encode_chat(self, messages) -> list[int]:
        return [5, *(ord(c) for m in messages for c in m["content"]), 6]


@pytest.mark.parametrize("chat", [True, False])
def test_the_completion_holds_no_bos(chat):
    e = encode(BosTokenizer(), {"prompt": "Add 1 and 2.", "completion": "3"}, eos_id=2,
               chat=chat)
    assert e.tokens[e.mask].tolist() == [ord("3"), 2]


def test_messages_completion_holds_no_bos():
    record = {"messages": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "yo"}]}
    e = encode(BosTokenizer(), record, eos_id=2)
    assert e.tokens.tolist() == [5, ord("h"), ord("i"), 6, ord("y"), ord("o"), 2]
    assert e.tokens[e.mask].tolist() == [ord("y"), ord("o"), 2]


@pytest.mark.parametrize("record, message", [
    ({"messages": ["hi", "there"]},
     "messages[0] must be an object with string 'role' and 'content', got 'hi'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]},
     "messages[1] must be an object with string 'role' and 'content'"),
    ({"messages": "hi"}, "'messages' must be a list of at least two messages, got 'hi'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "the last message must be the assistant's (the answer to learn), got role 'user'"),
    ({"prompt": 3, "completion": "x"}, "'prompt' must be a string, got 3"),
    ({"prompt": "x", "completion": None}, "'completion' must be a string, got None"),
    ({"prompt": "x", "completion": ""}, "the completion must be a non-empty string"),
])
def test_malformed_records_name_the_line_and_the_field(tmp_path, record, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps(record)
                    + "\n")
    with pytest.raises(ValueError) as e:
        load_jsonl(path, BosTokenizer(), eos_id=2)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_a_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not UTF-8 text \(byte 0xff\); the "
                                         r"training data must be UTF-8 JSON Lines"):
        load_jsonl(path, BosTokenizer(), eos_id=2)
