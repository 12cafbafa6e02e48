"""Chat SFT and DPO data: masks at hand-computed positions, packing equals separate forwards, errors that
name the line, resumable batches, and the bundled chat files."""

import importlib.util
import json

import pytest
import torch

from llama3.data.sft import (
    IGNORE_INDEX,
    SFTBatches,
    encode_chat_record,
    load_chat_jsonl,
    load_preference_jsonl,
    pack_batch,
    pad_batch,
    split_train_val,
)
from llama3.tokenizer import ChatFormat, Tokenizer
from tests.conftest import REPO, random_model, tiny_args

CHAT_FILE = REPO / "data" / "chat" / "austen_chat.jsonl"
DPO_FILE = REPO / "data" / "chat" / "austen_dpo.jsonl"



@pytest.fixture(scope="module")
def byte_chat():
    """A real Tokenizer over single bytes (ids 0-255, specials 256-511): every character is one token,
    so positions can be counted by hand."""
    return ChatFormat(Tokenizer({bytes([i]): i for i in range(256)}))


def _header_len(role: str) -> int:
    return 1 + len(role) + 1 + 2  # <|start_header_id|> role <|end_header_id|> "\n\n"


def test_assistant_mask_at_hand_computed_positions(byte_chat):
    system, user, answer = "Be civil.", "Who is Emma?", "A heroine."
    record = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                           {"role": "assistant", "content": answer}]}
    example = encode_chat_record(record, byte_chat, "x:1", max_seq_len=512)
    tok = byte_chat.tokenizer
    answer_start = (1 + _header_len("system") + len(system) + 1 + _header_len("user") + len(user) + 1
                    + _header_len("assistant"))
    trained = list(range(answer_start, answer_start + len(answer) + 1))  # the answer and its <|eot_id|>
    assert len(example.ids) == trained[-1] + 1
    assert [i for i, m in enumerate(example.loss_mask) if m] == trained
    assert example.ids[trained[-1]] == tok.eot_id
    assert bytes(example.ids[answer_start:trained[-1]]).decode() == answer
    batch = pad_batch([example], tok.pad_id)
    labels = batch["targets"][0]
    # label t predicts ids[t + 1]: labelled exactly at trained positions minus one, prompt unweighted
    assert (labels != IGNORE_INDEX).nonzero().flatten().tolist() == [t - 1 for t in trained]
    assert labels[answer_start - 1: trained[-1]].tolist() == example.ids[answer_start:]
    assert batch["inputs"][0].tolist() == example.ids[:-1]


def test_mask_with_the_llama3_tokenizer(llama3_tokenizer):
    chat = ChatFormat(llama3_tokenizer)
    record = {"messages": [{"role": "user", "content": "Who wrote Emma?"},
                           {"role": "assistant", "content": "Jane Austen, in 1815."},
                           {"role": "user", "content": "Thank you."},
                           {"role": "assistant", "content": "You are very welcome.", "weight": 0}]}
    example = encode_chat_record(record, chat, "x:1", max_seq_len=512)
    trained_ids = [t for t, m in zip(example.ids, example.loss_mask) if m]
    assert llama3_tokenizer.decode(trained_ids) == "Jane Austen, in 1815.<|eot_id|>"
    ids, _ = chat.encode_dialog(record["messages"])
    assert example.ids == ids  # the weight key changes the mask only


def test_train_on_all_and_tool_roles(byte_chat):
    call = {"id": "c0", "type": "function", "function": {"name": "lookup", "arguments": '{"name": "Emma"}'}}
    messages = [{"role": "user", "content": "Look up Emma."}, {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c0", "content": '{"novel": "Emma"}'},
                {"role": "assistant", "content": "She is in Emma."}]
    tok = byte_chat.tokenizer
    example = encode_chat_record({"messages": messages}, byte_chat, "x:1", max_seq_len=512)
    text = tok.decode(t for t, m in zip(example.ids, example.loss_mask) if m)
    assert text == '{"name": "lookup", "parameters": {"name": "Emma"}}<|eot_id|>She is in Emma.<|eot_id|>'
    assert "<|start_header_id|>ipython<|end_header_id|>" in tok.decode(example.ids)
    everything = encode_chat_record({"messages": messages}, byte_chat, "x:1", max_seq_len=512, train_on="all")
    text = tok.decode(t for t, m in zip(everything.ids, everything.loss_mask) if m)
    assert text.startswith("Look up Emma.<|eot_id|>") and '{"novel": "Emma"}<|eot_id|>' in text
    assert "<|start_header_id|>" not in text  # headers never train


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})
BAD_CHAT_LINES = [
    ('{"messages": [', "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"dialog": []}', "unknown keys ['dialog']"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "messages[0]: role 'wizard'"),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}', "empty assistant"),
    ('{"messages": [{"role": "user", "content": "Hi"}]}', "no assistant reply"),
    (('{"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"}, '
      '{"role": "assistant", "content": "y"}]}'), "system message may only come first"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}', "'content' must be"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}', "missing 'content'"),
    (('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": '
      '[{"function": {"name": "f", "arguments": "{oops"}}]}]}'), "not valid JSON: '{oops'"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]}',
     "'weight' must be 0 or 1"),
    ('{"messages": [{"role": "user", "content": "x", "mood": "glad"}, {"role": "assistant", "content": "y"}]}',
     "unknown keys ['mood']"),
]


@pytest.mark.parametrize(("line", "expected"), BAD_CHAT_LINES)
def test_malformed_chat_lines_name_the_line(byte_chat, tmp_path, line, expected):
    path = _write(tmp_path, [GOOD, "", GOOD, line, GOOD])  # the bad line is line 4 (blank lines count)
    with pytest.raises(ValueError) as err:
        load_chat_jsonl(path, byte_chat, max_seq_len=256)
    assert f"{path}:4" in str(err.value) and expected in str(err.value)


BAD_PAIR_LINES = [
    ('{"prompt": "Hi", "chosen": "Hello."}', "missing 'rejected'"),
    ('{"prompt": "Hi", "chosen": "Hello.", "rejected": "Hello."}', "identical"),
    ('{"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}', "must end with a user"),
    ('{"prompt": "Hi", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}', "must start with an assistant"),
    ('{"prompt": "Hi", "chosen": 3, "rejected": "b"}', "'chosen' must be a string"),
]


@pytest.mark.parametrize(("line", "expected"), BAD_PAIR_LINES)
def test_malformed_preference_lines_name_the_line(byte_chat, tmp_path, line, expected):
    good = '{"prompt": "Hi", "chosen": "Good day.", "rejected": "yo"}'
    path = _write(tmp_path, [good, line])
    with pytest.raises(ValueError) as err:
        load_preference_jsonl(path, byte_chat, max_seq_len=256)
    assert f"{path}:2" in str(err.value) and expected in str(err.value)


def test_preference_masks_leave_out_formatting_tokens(byte_chat):
    tok = byte_chat.tokenizer
    path_record = {"prompt": "Hi", "chosen": "Good day.", "rejected": "yo"}
    from llama3.data.sft import encode_preference_record

    pair = encode_preference_record(path_record, byte_chat, "x:1", max_seq_len=256)
    assert tok.decode(t for t, m in zip(pair.chosen_ids, pair.chosen_mask) if m) == "Good day."
    assert tok.decode(t for t, m in zip(pair.rejected_ids, pair.rejected_mask) if m) == "yo"
    kept = encode_preference_record(path_record, byte_chat, "x:1", max_seq_len=256, mask_formatting=False)
    assert tok.decode(t for t, m in zip(kept.chosen_ids, kept.chosen_mask) if m) == "Good day.<|eot_id|>"


def test_truncation(byte_chat, tmp_path):
    long = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 100}]})
    (example,) = load_chat_jsonl(_write(tmp_path, [long]), byte_chat, max_seq_len=40)
    assert example.truncated and len(example.ids) == 41
    with pytest.raises(ValueError, match=":1: dialog is .* longer than max_seq_len"):
        load_chat_jsonl(_write(tmp_path, [long]), byte_chat, max_seq_len=40, overlong="error")
    long_prompt = json.dumps({"messages": [{"role": "user", "content": "q" * 100},
                                           {"role": "assistant", "content": "a"}]})
    with pytest.raises(ValueError, match=":1: no trainable token is left"):
        load_chat_jsonl(_write(tmp_path, [long_prompt]), byte_chat, max_seq_len=40)


@pytest.mark.timeout(60)
def test_packed_rows_equal_separate_forwards(byte_chat):
    examples = [e for e in load_chat_jsonl(CHAT_FILE, byte_chat, max_seq_len=512) if len(e.ids) < 160][:6]
    model = random_model(tiny_args("gqa", vocab_size=512, max_seq_len=512))
    rows = [examples[:3], examples[3:]]
    seq_len = max(sum(len(e.ids) - 1 for e in row) for row in rows) + 5  # leave some padding
    batch = pack_batch(rows, byte_chat.tokenizer.pad_id, seq_len)
    with torch.no_grad():
        packed = model(batch["inputs"], input_pos=batch["input_pos"], document_ids=batch["document_ids"])
        for b, row in enumerate(rows):
            start = 0
            for example in row:
                alone = model(torch.tensor([example.ids[:-1]]))[0]
                torch.testing.assert_close(packed[b, start: start + len(alone)], alone, atol=1e-5, rtol=1e-5)
                start += len(alone)
    alone_labels = torch.cat([pad_batch([e], 0)["targets"][0] for e in rows[0]])
    assert batch["targets"][0, : len(alone_labels)].tolist() == alone_labels.tolist()
    assert (batch["targets"][0, len(alone_labels):] == IGNORE_INDEX).all()


def test_batches_resume_and_fill_rows(byte_chat):
    examples = load_chat_jsonl(CHAT_FILE, byte_chat, max_seq_len=256)
    stream = SFTBatches(examples, batch_size=2, pad_id=byte_chat.tokenizer.pad_id, seq_len=256, seed=3)
    for _ in range(5):
        next(stream)
    state = stream.state_dict()
    expected = [next(stream) for _ in range(3)]
    resumed = SFTBatches(examples, batch_size=2, pad_id=byte_chat.tokenizer.pad_id, seq_len=256, seed=3)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert got["inputs"].shape == (2, 256)
    # an epoch visits every dialog once
    padded = SFTBatches(examples, batch_size=7, pad_id=0, seq_len=256, pack=False)
    seen = sum(next(padded)["inputs"].shape[0] for _ in range(len(examples) // 7))
    assert seen == len(examples) // 7 * 7 and padded.epoch == 0
    # validation: one pass in file order, the last batch short, then the iterator ends
    one_pass = list(SFTBatches(examples, batch_size=7, pad_id=0, seq_len=256, pack=False, shuffle=False,
                               num_epochs=1))
    assert sum(b["inputs"].shape[0] for b in one_pass) == len(examples)
    assert one_pass[0]["inputs"][0, :5].tolist() == examples[0].ids[:5]
    packed = list(SFTBatches(examples, batch_size=2, pad_id=0, seq_len=256, shuffle=False, num_epochs=1))
    with pytest.raises(ValueError, match="do not fit a packed row of 64"):
        SFTBatches(examples, batch_size=2, pad_id=0, seq_len=64)
    assert sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in packed) == sum(e.num_loss_tokens for e in examples)


def test_split_train_val():
    items = list(range(50))
    train, val = split_train_val(items, 0.1, seed=1)
    assert len(val) == 5 and sorted(train + val) == items
    assert split_train_val(items, 0.1, seed=1) == (train, val)
    assert len(split_train_val(items[:3], 0.01)[1]) == 1
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(items, 1.0)


def test_bundled_chat_files_load_and_match_their_script(llama3_tokenizer):
    chat = ChatFormat(llama3_tokenizer)
    dialogs = load_chat_jsonl(CHAT_FILE, chat, max_seq_len=512)
    pairs = load_preference_jsonl(DPO_FILE, chat, max_seq_len=512)
    assert len(dialogs) >= 200 and len(pairs) >= 50
    assert not any(d.truncated for d in dialogs)
    spec = importlib.util.spec_from_file_location("make_chat", REPO / "data" / "chat" / "make_chat.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    import random

    lines = CHAT_FILE.read_text().splitlines()
    assert [json.loads(line) for line in lines] == script.chat_records(random.Random(0))
