"""Training throughput on this CPU: our training step vs HF transformers on the same config and batch.

Each step is forward + loss + backward + AdamW update. Ours is the loop's own code (`build_model`, the
chunked `causal_lm_loss`, `build_optimizer`); the peer is `LlamaForCausalLM` with `labels=` (its own loss)
and `torch.optim.AdamW(fused=True)` (what HF's Trainer uses by default with torch >= 2.8). Both start from the same weights and see the same batches; runs alternate
(ours, HF, ours, HF, ...) so that load from other processes hits both alike, and the median step time of
each is reported. MFU = ModelArgs.flops_per_token · tokens/s over the matmul peak measured here in the
same dtype. Also: data preparation (`prepare_dataset` over all cores) vs single-threaded tiktoken encoding
of the same documents.

    python benchmarks/train.py                # demo shape, fp32 and bf16, plus data prep
    python benchmarks/train.py --compile      # also ours with per-block torch.compile
    python benchmarks/train.py --vocab 128256 --batch 4 --skip-data   # Llama 3's vocabulary, small body
    python benchmarks/train.py --shape 100m --batch 4 --skip-data      # a ~100M Llama 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=["custom", "100m"], default="custom",
                   help="100m: the ~100M Llama 3 of benchmarks/decode.py (dim 576, 9 layers, 9/3 heads, tied "
                        "embeddings, vocabulary 128256; overrides the shape options below)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4352)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps per implementation and dtype")
    p.add_argument("--compile", action="store_true", help="also time ours with torch.compile'd blocks")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--isa", default=None,
                   help="build our kernels (the loss) at this instruction-set level (llama3.kernels.ISA_LEVELS) "
                        "instead of the best one this CPU runs")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: torch.profiler over 2 of our steps (after the warm-up), operators by "
                        "input shape with each matmul's GFLOP/s")
    p.add_argument("--skip-data", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    return p.parse_args(argv)


def _ours(args, cfg, initial):
    from llama3.train.loop import Runtime, build_model
    from llama3.train.optim import build_optimizer

    state = initial.state_dict()
    model = build_model(args, cfg, Runtime(device=torch.device("cpu")),
                        initialize=lambda m: m.load_state_dict(state)).train()
    return model, build_optimizer(model, cfg.optim, "cpu")


def _hf(initial, cfg):
    from conftest import hf_model_from

    model = hf_model_from(initial).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(0.9, 0.95), fused=True)
    return model, opt


def _step_ours(model, opt, batch, amp):
    from llama3.train.loss import causal_lm_loss

    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        loss = causal_lm_loss(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _step_hf(model, opt, batch, amp):
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        # HF shifts labels itself: labels = inputs; our targets are already shifted, so give it one token more.
        out = model(input_ids=batch["inputs"], labels=batch["labels"])
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def _computes(amp) -> str:
    from llama3.train.runtime import native_bf16

    if amp is None:
        return "fp32"
    return "bf16 autocast" + ("" if native_bf16(torch.device("cpu")) else " (emulated: no bf16 instructions)")


def bench_training(a) -> list[dict]:

    from llama3.train.config import TrainConfig
    from llama3.train.metrics import measure_peak_flops
    from llama3.train.runtime import autocast_dtype

    args, initial, batch = _model_and_batch(a)
    rows = []
    for dtype in a.dtypes.split(","):
        # What each side computes: HF under the autocast it is asked for; ours as `train.dtype` runs in the
        # loop, which is fp32 where bf16 would be emulated (llama3.train.runtime.autocast_dtype).
        hf_amp = torch.bfloat16 if dtype == "bf16" else None
        our_amp = autocast_dtype(dtype, torch.device("cpu"))
        impls = {"ours": (*_ours(args, TrainConfig(), initial), _step_ours, our_amp),
                 "HF transformers": (*_hf(initial, TrainConfig()), _step_hf, hf_amp)}
        if a.compile:
            cfg = TrainConfig()
            cfg.parallel.compile = True
            impls["ours + compile"] = (*_ours(args, cfg, initial), _step_ours, our_amp)
        peaks = {amp: measure_peak_flops(torch.device("cpu"), amp or torch.float32, size=1024, repeats=10)
                 for amp in {our_amp, hf_amp}}
        times = {name: [] for name in impls}
        for _name, (model, opt, step, amp) in impls.items():  # warm-up (and compilation)
            for _ in range(a.warmup):
                step(model, opt, batch, amp)
        for _ in range(a.steps):
            for name, (model, opt, step, amp) in impls.items():
                start = time.perf_counter()
                step(model, opt, batch, amp)
                times[name].append(time.perf_counter() - start)
        # The machine is shared: measure the peaks again after the timed steps and keep the higher figure.
        peaks = {amp: max(peak, measure_peak_flops(torch.device("cpu"), amp or torch.float32, size=1024, repeats=10))
                 for amp, peak in peaks.items()}
        num_tokens = a.batch * a.seq
        hf_tps = num_tokens / statistics.median(times["HF transformers"])
        for name, (_model, _opt, _step, amp) in impls.items():
            tps = num_tokens / statistics.median(times[name])
            rows.append({"dtype": dtype, "impl": name, "computes": _computes(amp), "tokens_per_s": tps,
                         "vs_hf": tps / hf_tps, "mfu": args.flops_per_token(a.seq) * tps / peaks[amp],
                         "peak_gflops": peaks[amp] / 1e9})
    return rows


def _model_and_batch(a):
    from conftest import random_model

    from llama3.config import ModelArgs

    if a.shape == "custom":
        args = ModelArgs(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, vocab_size=a.vocab,
                         multiple_of=64, max_seq_len=a.seq)
    else:
        from decode import SHAPES

        args = ModelArgs(**SHAPES[a.shape], vocab_size=128256, max_seq_len=a.seq)
        a.vocab = args.vocab_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "labels": tokens[:, :-1]}
    return args, random_model(args, seed=0), batch


def profile_ours(a) -> None:
    """Where our step's time goes (the first of --dtypes, as the loop runs it): self CPU time by operator and
    input shape over 2 steps, each matmul with its achieved GFLOP/s (2·M·N·K per call), beside the 1024³
    matmul peak measured here in the same dtype."""
    from torch.profiler import ProfilerActivity, profile

    from llama3.train.config import TrainConfig
    from llama3.train.metrics import measure_peak_flops
    from llama3.train.runtime import autocast_dtype

    args, initial, batch = _model_and_batch(a)
    amp = autocast_dtype(a.dtypes.split(",")[0], torch.device("cpu"))
    model, opt = _ours(args, TrainConfig(), initial)
    for _ in range(a.warmup):
        _step_ours(model, opt, batch, amp)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(2):
            _step_ours(model, opt, batch, amp)
    peak = measure_peak_flops(torch.device("cpu"), amp or torch.float32, size=1024, repeats=10)
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total_us = sum(e.self_cpu_time_total for e in events)
    print(f"{_computes(amp)}: matmul peak (1024^3) {peak / 1e9:.0f} GFLOP/s; profiled CPU time "
          f"{total_us / 2e6:.2f} s per step\n")
    print("| operator | input shapes | calls/step | ms/step | share | GFLOP/s |\n|---|---|---:|---:|---:|---:|")
    for e in events[:30]:
        gflops = ""
        if e.key == "aten::mm" and len(e.input_shapes) >= 2 and len(e.input_shapes[0]) == 2:
            (m, k), n = e.input_shapes[0], e.input_shapes[1][1]
            gflops = f"{2 * m * n * k * e.count / (e.self_cpu_time_total / 1e6) / 1e9:.0f}"
        print(f"| {e.key} | {e.input_shapes} | {e.count / 2:g} | {e.self_cpu_time_total / 2e3:,.0f} | "
              f"{100 * e.self_cpu_time_total / total_us:.1f}% | {gflops} |")


def bench_data() -> dict:
    from llama3.bpe import train_tokenizer
    from llama3.data.pretrain import prepare_dataset, read_documents
    from llama3.tokenizer import Tokenizer

    files = sorted((REPO / "data" / "austen").glob("*.txt"))
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / "tokenizer.model"
        train_tokenizer(files, 4096, tok_path, progress=False)
        tokenizer = Tokenizer.from_file(tok_path)
        docs = [d for f in files for d in read_documents(f)]
        num_bytes = sum(len(d.encode()) for d in docs)
        start = time.perf_counter()
        for d in docs:
            tokenizer.model.encode_ordinary(d)
        tiktoken_s = time.perf_counter() - start
        start = time.perf_counter()
        prepare_dataset(files, Path(tmp) / "data", tok_path, progress=False)
        prepare_s = time.perf_counter() - start
        start = time.perf_counter()  # 8 copies of the corpus (32 MB)
        prepare_dataset(files * 8, Path(tmp) / "data8", tok_path, progress=False)
        prepare8_s = time.perf_counter() - start
    return {"mb": num_bytes / 1e6, "tiktoken_mb_s": num_bytes / 1e6 / tiktoken_s,
            "prepare_mb_s": num_bytes / 1e6 / prepare_s, "prepare8_mb_s": 8 * num_bytes / 1e6 / prepare8_s}


def main(argv=None) -> int:
    a = parse_args(argv)
    unknown = set(a.dtypes.split(",")) - {"fp32", "bf16"}
    if unknown:
        raise SystemExit(f"--dtypes: unknown {sorted(unknown)}; use fp32 and/or bf16")
    from llama3 import kernels

    if a.isa:
        os.environ["LLAMA3_KERNELS_ISA"] = a.isa
    level = kernels.loaded_isa() if kernels.available() else f"unavailable ({kernels.why_unavailable()})"
    print(f"CPU: {kernels.cpu_description()}; our kernels' level: {level}")
    shape = (f"the {a.shape} shape" if a.shape != "custom" else
             f"model dim {a.dim}, {a.layers} layers, {a.heads}/{a.kv_heads} heads, vocab {a.vocab}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {shape}, batch {a.batch}x{a.seq}\n")
    if a.profile:
        profile_ours(a)
        return 0
    print("| dtype asked | implementation | computes | tokens/s | vs HF | MFU (vs measured matmul peak of what it computes) |")
    print("|---|---|---|---:|---:|---:|")
    for r in [] if a.skip_train else bench_training(a):
        print(f"| {r['dtype']} | {r['impl']} | {r['computes']} | {r['tokens_per_s']:,.0f} | {r['vs_hf']:.2f}x | "
              f"{100 * r['mfu']:.1f}% of {r['peak_gflops']:.0f} GFLOP/s |")
    print(f"\nload average after the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not a.skip_data:
        d = bench_data()
        print(f"\n| data prep ({d['mb']:.1f} MB Austen) | MB/s | vs tiktoken 1 thread |\n|---|---:|---:|")
        print(f"| tiktoken encode_ordinary, 1 thread | {d['tiktoken_mb_s']:.2f} | 1.00x |")
        print(f"| llama3 prepare, 4 MB (threads over all cores) | {d['prepare_mb_s']:.2f} | "
              f"{d['prepare_mb_s'] / d['tiktoken_mb_s']:.2f}x |")
        print(f"| llama3 prepare, 32 MB (threads over all cores) | {d['prepare8_mb_s']:.2f} | "
              f"{d['prepare8_mb_s'] / d['tiktoken_mb_s']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
