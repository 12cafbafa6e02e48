"""BPE tokenizer training speed: `llama3.bpe` vs HF `tokenizers` (Rust) on the same corpus and vocab size.

Both split text with Llama 3's regex and learn byte-level merges; the peer is `tokenizers`' BpeTrainer with
a Split(LLAMA3_SPLIT_PATTERN) + ByteLevel pre-tokenizer. Reports MB/s of training input for each, and the
bytes per token each vocabulary reaches on held-out text (Emma, left out of training).

    python benchmarks/tokenizer.py                 # 5 Austen novels, 4096 ranks
    python benchmarks/tokenizer.py --vocab 8192 --repeat 4   # ~14 MB input (the corpus 4 times)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=4096, help="BPE ranks (256 bytes + merges)")
    p.add_argument("--repeat", type=int, default=1, help="feed the training files this many times")
    a = p.parse_args(argv)

    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from llama3.bpe import train_tokenizer
    from llama3.tokenizer import LLAMA3_SPLIT_PATTERN

    corpus = sorted((REPO / "data" / "austen").glob("*.txt"))
    held_out = REPO / "data" / "austen" / "emma.txt"
    files = [f for f in corpus if f != held_out] * a.repeat
    num_mb = sum(f.stat().st_size for f in files) / 1e6
    test_text = held_out.read_text()

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ours = train_tokenizer(files, a.vocab, Path(tmp) / "tokenizer.model", progress=False)
        ours_s = time.perf_counter() - start

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=a.vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    start = time.perf_counter()
    hf.train([str(f) for f in files], trainer)
    hf_s = time.perf_counter() - start

    test_bytes = len(test_text.encode())
    ours_bpt = test_bytes / len(ours.encode(test_text))
    hf_bpt = test_bytes / len(hf.encode(test_text).ids)
    assert ours.decode(ours.encode(test_text)) == test_text
    print(f"BPE training, {num_mb:.1f} MB of Austen, {a.vocab} ranks (held-out: Emma, {test_bytes / 1e6:.1f} MB)\n")
    print("| trainer | seconds | MB/s | vs HF tokenizers | held-out bytes/token |")
    print("|---|---:|---:|---:|---:|")
    print(f"| llama3.bpe (Python, counting on all cores) | {ours_s:.1f} | {num_mb / ours_s:.2f} | "
          f"{hf_s / ours_s:.2f}x | {ours_bpt:.2f} |")
    print(f"| HF tokenizers BpeTrainer (Rust) | {hf_s:.1f} | {num_mb / hf_s:.2f} | 1.00x | {hf_bpt:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
