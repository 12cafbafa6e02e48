"""BPE tokenizer training: tiktoken-format output that round-trips text and compresses the corpus."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import AUSTEN, REPO

from llama3.bpe import count_chunks, train_bpe, train_tokenizer
from llama3.tokenizer import LLAMA3_SPLIT_PATTERN, Tokenizer

SAMPLES = ["It is a truth universally acknowledged, that a single man in possession of a good fortune...",
           "Ünïcödé — 日本語のテキスト, emoji 🦙🦙, tabs\t\tand\r\nCRLF, numbers 1234567 and 3.14159",
           "", "   leading and trailing spaces   ", "\n\n\n", "<|begin_of_text|> is plain text here",
           bytes(range(32, 127)).decode()]


@pytest.fixture(scope="module")
def austen_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe") / "tokenizer.model"
    tokenizer = train_tokenizer([AUSTEN / "persuasion.txt", AUSTEN / "northangerabbey.txt"], 1024, out,
                                num_workers=1, progress=False)
    return out, tokenizer


def test_trained_file_loads_round_trips_and_compresses(austen_tokenizer):
    path, trained = austen_tokenizer
    tokenizer = Tokenizer.from_file(path)
    assert tokenizer.mergeable_ranks == trained.mergeable_ranks
    assert len(tokenizer.mergeable_ranks) == 1024 and tokenizer.n_words == 1024 + 256
    assert all(tokenizer.mergeable_ranks[bytes([b])] == b for b in range(256))  # bytes first
    assert tokenizer.bos_id == 1024 and tokenizer.decode([tokenizer.eos_id]) == "<|end_of_text|>"
    for text in SAMPLES:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    held_out = (AUSTEN / "emma.txt").read_text()[:200_000]  # not in the training files
    assert tokenizer.decode(tokenizer.encode(held_out)) == held_out
    bytes_per_token = len(held_out.encode()) / len(tokenizer.encode(held_out))
    assert bytes_per_token > 2.5, bytes_per_token  # bytes alone give 1.0; 1024 ranks give ~2.7
    assert " the" in {tok.decode(errors="replace") for tok in tokenizer.mergeable_ranks}


def test_merges_follow_the_split_pattern_and_are_deterministic():
    counts = count_chunks("low lower lowest newer wider " * 50 + "don't it's 12345")
    assert counts[" lower"] == 50 and counts["'t"] == 1 and counts["123"] == 1  # Llama 3 pre-tokens
    ranks = train_bpe(counts, 256 + 12)
    assert ranks == train_bpe(counts, 256 + 12)
    learned = [tok for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]) if r >= 256]
    assert all(b" " not in tok[1:] for tok in learned)  # no merge crosses a pre-token boundary
    assert b" low" in learned and b"er" in learned
    tokenizer = Tokenizer(ranks)
    assert len(tokenizer.encode(" lower")) < len(b" lower")  # tiktoken applies the learned merges
    assert tokenizer.model._pat_str == LLAMA3_SPLIT_PATTERN


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="below 256"):
        train_bpe({"abc": 3}, 100)
    with pytest.raises(ValueError, match="does not exist"):
        train_tokenizer([tmp_path / "missing.txt"], 300, tmp_path / "t.model", num_workers=1, progress=False)


def test_cli_writes_a_loadable_file(tmp_path):
    out = tmp_path / "tok"
    proc = subprocess.run([sys.executable, "-m", "llama3", "train-tokenizer", "--input", str(AUSTEN / "persuasion.txt"),
                           "--vocab-size", "300", "--output", str(out), "--workers", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "300 BPE ranks" in proc.stdout
    assert len(Tokenizer.from_file(out / "tokenizer.model").mergeable_ranks) == 300
