"""Loading a folder's tokenizer quickly: the tiktoken ranks decoded in one pass, tokenizer.json's
`added_tokens` read without parsing the whole file when it sits near the top (as writers put it), and the
same names either way; a bad rank line still names the file and line."""

from __future__ import annotations

import base64
import json

import pytest

from llama3.checkpoint.hf import load_tokenizer
from llama3.tokenizer import read_tiktoken_ranks, special_token_names

RANKS = {bytes([i]): i for i in range(256)}


def _write_folder(root, *, added_first: bool):
    root.mkdir()
    (root / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in RANKS.items()))
    added = [{"id": 256 + i, "content": name, "special": True} for i, name in enumerate(special_token_names("3.0"))]
    # a vocabulary entry spelled like the key, to show the fast path does not take the first match anywhere
    model = {"type": "BPE", "vocab": {'"added_tokens": [': 1, **{f"t{i}": i for i in range(2000)}}, "merges": []}
    data = {"version": "1.0", "added_tokens": added, "model": model} if added_first else \
        {"version": "1.0", "model": model, "added_tokens": added}
    (root / "tokenizer.json").write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("added_first", [True, False])
def test_special_names_come_from_tokenizer_json_wherever_they_are(tmp_path, added_first):
    tokenizer = load_tokenizer(_write_folder(tmp_path / "tok", added_first=added_first))
    assert list(tokenizer.special_tokens) == special_token_names("3.0")  # not the 3.1 default
    assert tokenizer.special_tokens["<|eot_id|>"] == 256 + 9
    assert tokenizer.encode("hi", bos=True, eos=False) == [256, ord("h"), ord("i")]


def test_tiktoken_ranks_decode_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("aGk= 0\n\nYQ== 1\n")
    assert read_tiktoken_ranks(path) == {b"hi": 0, b"a": 1}
    path.write_text("aGk= 0\nnot*base64 1\n")
    with pytest.raises(ValueError, match=r"line 2: expected 'base64-token rank'"):
        read_tiktoken_ranks(path)
    path.write_text("")
    with pytest.raises(ValueError, match="empty tokenizer file"):
        read_tiktoken_ranks(path)


def test_byte_level_tokens_map_to_their_bytes_and_others_are_refused():
    from llama3.tokenizer import _byte_to_unicode, _hf_to_bytes

    table = _byte_to_unicode()
    every_byte = bytes(range(256))
    assert _hf_to_bytes("".join(table[b] for b in every_byte)) == every_byte
    assert _hf_to_bytes("Ġthe") == b" the"
    for bad in (" ", "a b", "\x7f", "\u4e00"):  # raw space and DEL are not byte-level characters; nor is CJK
        with pytest.raises(ValueError, match="not byte-level BPE"):
            _hf_to_bytes(bad)


def test_many_tokens_at_once_equal_one_by_one_and_name_a_bad_one():
    from llama3.tokenizer import _byte_to_unicode, _hf_to_bytes, _hf_tokens_to_bytes

    table = _byte_to_unicode()
    tokens = ["Ġthe", "Ċ", "".join(table[b] for b in range(256)), "abc", "Ġ"]  # Ċ is the newline byte
    assert _hf_tokens_to_bytes(tokens) == [_hf_to_bytes(t) for t in tokens]
    assert _hf_tokens_to_bytes([]) == []
    for bad in ("a b", "a\uffffb"):
        with pytest.raises(ValueError, match="not byte-level BPE"):
            _hf_tokens_to_bytes(["ok", bad])
