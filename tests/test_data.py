"""Pretraining data: prepare (text/JSONL/parquet, parallel, val split) and packed, resumable batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import AUSTEN

from llama3.data.pretrain import PackedBatches, load_index, prepare_dataset, read_documents
from llama3.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from llama3.bpe import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer([AUSTEN / "persuasion.txt"], 512, path, num_workers=1, progress=False)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("inputs")
    text = (AUSTEN / "persuasion.txt").read_text()[:60_000]
    (root / "a.txt").write_text(text)
    records = [{"text": f"Letter {i}: my dear Anne, {'the weather is fine. ' * (i % 7 + 1)}", "id": i} for i in range(40)]
    (root / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.table({"text": [f"Parquet row {i} about Bath." for i in range(30)]}), root / "c.parquet")
    return [root / "a.txt", root / "b.jsonl", root / "c.parquet"]


def _documents(data_dir, split, tokenizer):
    index = load_index(data_dir)
    tokens = np.concatenate([np.fromfile(data_dir / s["file"], dtype=index["dtype"])
                             for s in index["splits"][split]["shards"]])
    docs, start = [], 0
    for end in np.flatnonzero(tokens == tokenizer.eos_id):
        assert tokens[start] == tokenizer.bos_id  # every document is <|begin_of_text|> ... <|end_of_text|>
        docs.append(tokenizer.decode(tokens[start + 1: end].tolist()))
        start = end + 1
    assert start == tokens.size
    return docs


def test_prepare_reads_all_formats_and_splits_documents(tmp_path, tokenizer_path, inputs):
    index = prepare_dataset(inputs, tmp_path / "ds", tokenizer_path, val_fraction=0.1, text_chunk_chars=5000,
                            num_workers=1, progress=False, shard_tokens=5000)
    tokenizer = Tokenizer.from_file(tmp_path / "ds" / "tokenizer.model")
    assert index["dtype"] == "uint16" and index["vocab_size"] == tokenizer.n_words
    expected = [d for p in inputs for d in read_documents(p, text_chunk_chars=5000)]
    assert len(expected) > 80 and index["splits"]["val"]["num_documents"] == round(0.1 * len(expected))
    assert len(index["splits"]["train"]["shards"]) > 1  # shard_tokens forces several files
    train_docs, val_docs = _documents(tmp_path / "ds", "train", tokenizer), _documents(tmp_path / "ds", "val", tokenizer)
    assert sorted(train_docs + val_docs) == sorted(expected) and not set(train_docs) & set(val_docs)
    assert "Parquet row 7 about Bath." in train_docs + val_docs


@pytest.mark.timeout(120)
def test_parallel_prepare_writes_identical_shards(tmp_path, tokenizer_path, inputs):
    prepare_dataset(inputs, tmp_path / "one", tokenizer_path, num_workers=1, progress=False)
    prepare_dataset(inputs, tmp_path / "two", tokenizer_path, num_workers=2, progress=False)
    for name in ("train-000000.bin", "val-000000.bin"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer_path):
    out = tmp_path_factory.mktemp("ds") / "data"
    prepare_dataset([AUSTEN / "persuasion.txt"], out, tokenizer_path, num_workers=1, progress=False)
    return out


def _take(batches, n):
    return [next(batches) for _ in range(n)]


def test_packed_batches_shapes_targets_and_document_ids(dataset):
    bos = load_index(dataset)["bos_id"]
    batches = PackedBatches(dataset, "train", batch_size=3, seq_len=64)
    batch = next(b for b in batches if "document_ids" in b)  # the first batch holding a document boundary
    assert batch["inputs"].shape == batch["targets"].shape == batch["document_ids"].shape == (3, 64)
    plain = next(b for b in batches if "document_ids" not in b)  # no boundary: plain causal attention
    assert not (plain["inputs"][:, 1:] == bos).any()
    assert torch.equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])  # targets are inputs shifted by one
    for row_inputs, row_ids in zip(batch["inputs"], batch["document_ids"]):
        starts = (row_inputs == bos).long()
        assert torch.equal(torch.diff(row_ids), starts[1:])  # a new document id exactly at each BOS


def test_batches_are_deterministic_resumable_and_cross_epochs(dataset):
    reference = PackedBatches(dataset, "train", batch_size=4, seq_len=128, seed=3)
    epoch_len = reference.batches_per_epoch
    expected = _take(reference, epoch_len + 5)  # crosses into the second epoch (a new shuffle)
    again = _take(PackedBatches(dataset, "train", batch_size=4, seq_len=128, seed=3), epoch_len + 5)
    assert all(torch.equal(a["inputs"], b["inputs"]) for a, b in zip(expected, again))
    assert not torch.equal(expected[0]["inputs"], expected[epoch_len]["inputs"])
    other_seed = next(PackedBatches(dataset, "train", batch_size=4, seq_len=128, seed=4))
    assert not torch.equal(other_seed["inputs"], expected[0]["inputs"])

    first = PackedBatches(dataset, "train", batch_size=4, seq_len=128, seed=3)
    _take(first, epoch_len - 2)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialization
    resumed = PackedBatches(dataset, "train", batch_size=4, seq_len=128, seed=3)
    resumed.load_state_dict(state)
    for want, got in zip(expected[epoch_len - 2:], _take(resumed, 7)):
        assert torch.equal(want["inputs"], got["inputs"]) and torch.equal(want["targets"], got["targets"])
    with pytest.raises(ValueError, match="cannot resume the data order"):
        PackedBatches(dataset, "train", batch_size=4, seq_len=128, seed=9).load_state_dict(state)


def test_data_parallel_ranks_partition_the_global_batch(dataset):
    whole = _take(PackedBatches(dataset, "train", batch_size=6, seq_len=64, dp_world_size=1), 3)
    ranks = [_take(PackedBatches(dataset, "train", batch_size=2, seq_len=64, dp_rank=r, dp_world_size=3), 3)
             for r in range(3)]
    for step in range(3):
        joined = torch.cat([ranks[r][step]["inputs"] for r in range(3)])
        assert torch.equal(joined, whole[step]["inputs"])
    # the state is that of the global batch: 3 ranks × 2 rows resume as 1 process × 6 rows
    rank0 = PackedBatches(dataset, "train", batch_size=2, seq_len=64, dp_rank=0, dp_world_size=3)
    _take(rank0, 2)
    single = PackedBatches(dataset, "train", batch_size=6, seq_len=64)
    single.load_state_dict(rank0.state_dict())
    assert torch.equal(next(single)["inputs"], whole[2]["inputs"])


def test_validation_batches_stop_after_one_pass(dataset):
    val = PackedBatches(dataset, "val", batch_size=2, seq_len=64, shuffle=False, repeat=False)
    assert len(list(val)) == val.batches_per_epoch


def test_bad_inputs_get_clear_errors(tmp_path, tokenizer_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string field 'text'"):
        list(read_documents(bad))
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        list(read_documents(bad))
    with pytest.raises(ValueError, match="no index.json"):
        PackedBatches(tmp_path, "train", batch_size=1, seq_len=8)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("one short document")
    with pytest.raises(ValueError, match="too few for a validation split"):
        prepare_dataset([tiny], tmp_path / "x", tokenizer_path, num_workers=1, progress=False)


def test_fast_document_encoding_equals_tokenizer_encode(tokenizer_path):
    from llama3.data.pretrain import encode_document

    tokenizer = Tokenizer.from_file(tokenizer_path)
    texts = ["plain <|begin_of_text|> and <|eot_id|> stay text", (AUSTEN / "emma.txt").read_text()[:50_000],
             "x" * 30_000 + " tail", " " * 26_000 + "after a long space run", ""]
    for text in texts:
        assert encode_document(tokenizer, text).tolist() == tokenizer.encode(text, bos=True, eos=True)
