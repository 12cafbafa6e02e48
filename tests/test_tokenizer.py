"""The tokenizer against tiktoken with Meta's tokenizer.model (golden ids) and HF `tokenizers`."""

import json

import pytest

from llama3.tokenizer import CHAT_TEMPLATE, ChatFormat, Tokenizer, special_token_names
from tests.conftest import AUSTEN, llama3_tokenizer_dir

VARIED = [
    "This is a test sentence.",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\n\tif x >= 10_000: print(x)\r\n",
    "日本語のテキストと中文文本，以及한국어 문장。",
    "Tiếng Việt có nhiều dấu: người, được, những, trường học.",
    "Emoji 👩‍💻🚀🎉 and flags 🇫🇷 with ZWJ sequences",
    "   leading spaces, trailing spaces   \n\n\n   \t\t  mixed   whitespace runs      ",
    "Numbers 1234567890 3.14159 -42 1,000,000 and 0x1F",
    "I'm sure you'll see they've done it; we'd say it's HE'S and THEY'RE.",
    "Ελληνικά, русский текст, العربية, עברית, हिन्दी",
    "" ,
    "\n",
    "a" * 3000 + " " * 3000 + "b",
]


def _corpus_chunks():
    text = (AUSTEN / "prideprejudice.txt").read_text(encoding="utf-8")
    # ~1.2 MB of prose in paragraph-sized documents (HF has no 400k-char chunking, so keep documents short)
    for name in ("emma.txt", "persuasion.txt"):
        text += (AUSTEN / name).read_text(encoding="utf-8")
    paragraphs = text.split("\n\n")
    return ["\n\n".join(paragraphs[i:i + 20]) for i in range(0, len(paragraphs), 20)]


def test_golden_ids(llama3_tokenizer):
    ids = llama3_tokenizer.encode("This is a test sentence.", bos=True, eos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama3_tokenizer.encode("user") == [882]
    assert llama3_tokenizer.encode("system") == [9125]
    assert llama3_tokenizer.encode("assistant") == [78191]
    assert llama3_tokenizer.encode("\n\n") == [271]
    assert llama3_tokenizer.n_words == 128256


def test_special_token_ids(llama3_tokenizer):
    t = llama3_tokenizer
    assert (t.bos_id, t.eos_id, t.eot_id, t.eom_id, t.python_tag_id) == (128000, 128001, 128009, 128008, 128010)
    assert t.special_tokens["<|start_header_id|>"] == 128006
    assert t.special_tokens["<|finetune_right_pad_id|>"] == 128004
    assert t.stop_tokens == {128001, 128008, 128009}
    old = Tokenizer(t.mergeable_ranks, special_tokens=special_token_names("3.0"))
    assert old.stop_tokens == {128001, 128009} and old.eom_id is None
    assert old.special_tokens["<|reserved_special_token_250|>"] == 128255
    assert len(special_token_names("3.0")) == len(special_token_names("3.1")) == 256


def test_ids_equal_hf_tokenizers_on_varied_text(llama3_tokenizer, hf_reference_tokenizer):
    docs = VARIED + _corpus_chunks()
    assert sum(len(d) for d in docs) > 2_000_000
    ours = llama3_tokenizer.encode_batch(docs)
    for doc, ids in zip(docs, ours):
        assert ids == llama3_tokenizer.encode(doc)
        assert ids == hf_reference_tokenizer.encode(doc, add_special_tokens=False).ids, doc[:80]


def test_decode_round_trips(llama3_tokenizer):
    for doc in VARIED + _corpus_chunks()[:20]:
        assert llama3_tokenizer.decode(llama3_tokenizer.encode(doc)) == doc


def test_long_runs_are_chunked(llama3_tokenizer):
    text = "x" * 60_000 + " " * 60_000 + "y"
    ids = llama3_tokenizer.encode(text)
    assert llama3_tokenizer.decode(ids) == text


def test_special_tokens_in_user_text_stay_text(llama3_tokenizer):
    t = llama3_tokenizer
    ids = t.encode("hi <|eot_id|> there")
    assert t.eot_id not in ids
    assert t.decode(ids) == "hi <|eot_id|> there"
    assert t.eot_id in t.encode("hi <|eot_id|>", allowed_special="all")
    with pytest.raises(ValueError):
        t.encode("<|eot_id|>", disallowed_special="all")


def test_stream_decoder_never_splits_a_character(llama3_tokenizer):
    t = llama3_tokenizer
    text = "naïve 日本語 👩‍💻 done"
    ids = t.encode(text)
    # some of these ids carry partial UTF-8 sequences
    assert any("\ufffd" in t.decode([i]) for i in ids)
    stream = t.stream_decoder()
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_from_hf_json_equals_tiktoken_file(llama3_tokenizer):
    from_json = Tokenizer.from_file(llama3_tokenizer_dir() / "tokenizer.json")
    assert from_json.mergeable_ranks == llama3_tokenizer.mergeable_ranks
    # this tokenizer.json (from a 3.2 release) also lists <|image|> at 128256, after the 256 text specials
    assert {k: v for k, v in from_json.special_tokens.items() if v < 128256} == llama3_tokenizer.special_tokens
    assert from_json.special_tokens.get("<|image|>") == 128256
    assert from_json.encode(VARIED[3]) == llama3_tokenizer.encode(VARIED[3])


def test_our_tokenizer_json_matches_hf_tokenizers(llama3_tokenizer, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    data = llama3_tokenizer.to_hf_json()
    assert data["model"]["ignore_merges"] is True
    hf = HFTokenizer.from_str(json.dumps(data))
    for doc in VARIED + _corpus_chunks()[:30]:
        assert hf.encode(doc, add_special_tokens=False).ids == llama3_tokenizer.encode(doc)
    assert hf.encode("hi").ids[0] == 128000  # post-processor adds BOS as Llama 3's does


def test_tiktoken_file_round_trip(llama3_tokenizer, tmp_path, tokenizer_model_path):
    out = tmp_path / "tokenizer.model"
    llama3_tokenizer.save_tiktoken(out)
    assert out.read_bytes() == tokenizer_model_path.read_bytes()


def test_bad_tokenizer_files(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x00\x01 not a tiktoken file\n")
    with pytest.raises(ValueError, match="tokenizer.model, line 1"):
        Tokenizer.from_file(bad)
    with pytest.raises(ValueError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer.from_file(tmp_path / "..")


DIALOGS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "  You are terse.  "}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?\n"}],
    [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "tool_calls": [{"type": "function", "function": {
         "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
     {"role": "tool", "content": "{\"temp_c\": 21}"}, {"role": "assistant", "content": "It is 21°C."},
     {"role": "user", "content": "Thanks, bye"}],
]


@pytest.mark.parametrize("dialog", DIALOGS)
def test_chat_format_equals_hf_chat_template(llama3_tokenizer, dialog):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(llama3_tokenizer_dir() / "tokenizer.json"),
                                 bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    hf.chat_template = CHAT_TEMPLATE
    fmt = ChatFormat(llama3_tokenizer)
    ours = fmt.encode_dialog_prompt(dialog)
    text = hf.apply_chat_template(dialog, tokenize=False, add_generation_prompt=True)
    ref = llama3_tokenizer.encode(text, allowed_special={"<|begin_of_text|>", "<|start_header_id|>",
                                                         "<|end_header_id|>", "<|eot_id|>"})
    assert ours == ref
    assert ours.count(128000) == 1 and ours[0] == 128000
    assert ours[-4:] == [128006, 78191, 128007, 271]


def test_user_typed_eot_stays_text(llama3_tokenizer):
    fmt = ChatFormat(llama3_tokenizer)
    ids = fmt.encode_dialog_prompt([{"role": "user", "content": "stop <|eot_id|> now"}])
    assert ids.count(llama3_tokenizer.eot_id) == 1  # only the real end of the user turn


def test_assistant_only_loss_mask(llama3_tokenizer):
    fmt = ChatFormat(llama3_tokenizer)
    dialog = DIALOGS[1]
    ids, mask = fmt.encode_dialog(dialog)
    assert len(ids) == len(mask)
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == llama3_tokenizer.encode("Hello.") + [llama3_tokenizer.eot_id]
    _, everything = fmt.encode_dialog(dialog, train_on="all")
    assert sum(everything) > sum(mask) and not everything[0]


def test_unknown_role_is_rejected(llama3_tokenizer):
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        ChatFormat(llama3_tokenizer).encode_dialog_prompt([{"role": "robot", "content": "x"}])
