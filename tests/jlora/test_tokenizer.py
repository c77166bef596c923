"""The incremental detokenizer the engine streams text with (the embedded model's tokenizer)."""

from jlora.formats.gguf_file import read_gguf
from jlora.loader import embedded_model_path
from jlora.tokenizer import IncrementalDecoder, Tokenizer


def test_incremental_text_equals_decode_and_a_cut_character_is_flushed():
    tok = Tokenizer.from_gguf_metadata(read_gguf(embedded_model_path())[1])
    ids = tok.encode("日本語 ok", add_special_tokens=False)   # 日 is two tokens here
    whole = IncrementalDecoder(tok)
    deltas = [whole.push(i) for i in ids]
    assert "".join(deltas) == whole.text == tok.decode(ids) == "日本語 ok"
    assert deltas[0] == "" and whole.flush() == ""
    cut = IncrementalDecoder(tok)   # a sequence that ends inside a character
    assert cut.push(ids[0]) == "" and cut.text == ""
    assert cut.flush() == "\ufffd" and cut.text == "\ufffd"
