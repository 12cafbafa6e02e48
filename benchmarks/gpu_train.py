"""Training throughput and MFU of the CUDA path of `llama3 pretrain` on one GPU.

What runs is the training loop's own machinery (`llama3.train.loop.build_model` with the distributed
runtime: FSDP2 with bf16 compute / fp32 reduction, per-block torch.compile, the loop's chunked loss, fused
AdamW, global-norm clipping) on Llama-3-8B-shaped blocks (dim 4096, 32 heads, 8 kv heads, FFN 14336,
vocab 128256), truncated to the number of layers that fits the GPU. Data is synthetic (random token ids,
plain causal attention); nothing is downloaded.

It first measures the bf16 matmul peak of this GPU (an 8192³ product), then times training steps and
prints a markdown row: tokens/s, step time, MFU against the measured peak and against the datasheet.

    python benchmarks/gpu_train.py                       # layers picked from free GPU memory
    python benchmarks/gpu_train.py --layers 8 --seq 8192 --batch 1
    python benchmarks/gpu_train.py --dry-run             # the same code on CPU (gloo) with a tiny shape

MFU = 6·N·tokens/s + attention FLOPs (ModelArgs.flops_per_token, PaLM appendix B) over the peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout without `pip install`

DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=0, help="transformer blocks (0 = as many as fit)")
    p.add_argument("--seq", type=int, default=8192, help="tokens per sequence (Llama 3 pretraining: 8192)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--ac", choices=["none", "full", "selective"], default="none", help="activation checkpointing")
    p.add_argument("--no-compile", action="store_true", help="eager blocks")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; the dry run uses aot_eager: graph capture "
                        "with FSDP's hooks is checked without waiting for C++ code generation)")
    p.add_argument("--loss-chunk", type=int, default=4096, help="rows per chunk of the output projection + loss")
    p.add_argument("--dry-run", action="store_true", help="CPU, gloo, a tiny shape: checks the code path")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    return p.parse_args(argv)


def ensure_process_group_env() -> None:
    """Describe a one-process job in torchrun's variables when not started by torchrun."""
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def measure_matmul_peak(device, dtype, size: int, repeats: int = 10) -> float:
    """FLOP/s of a size³ matmul in `dtype` (mean of `repeats` after 3 warm-ups; random data)."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def layers_that_fit(args_8b, free_bytes: int, tokens: int) -> int:
    """Blocks whose training state (fp32 weights + grads + AdamW moments + bf16 copies: ~18 B/param) and
    activations (no recomputation; ~2·(10·d + 5·ffn) + 16·d bytes per token, with 20% slack) fit in 85% of
    `free_bytes` next to the embeddings, the output projection and one loss chunk."""
    one, two = (dataclasses.replace(args_8b, n_layers=n).num_params() for n in (1, 2))
    per_layer_params = two - one
    d, h = args_8b.dim, args_8b.hidden_dim
    act_per_layer = 1.2 * tokens * (2 * (10 * d + 5 * h) + 16 * d)
    fixed = 18 * 2 * args_8b.vocab_size * d + 4 * 4096 * args_8b.vocab_size * 2  # embeddings+output, logits
    budget = 0.85 * free_bytes - fixed
    return max(1, min(args_8b.n_layers, int(budget // (18 * per_layer_params + act_per_layer))))


def build(cfg, runtime, model_args):
    """The loop's model (meta → parallelize → to_empty → init) and optimizer."""
    from llama3.train.loop import build_model
    from llama3.train.optim import build_optimizer

    model = build_model(model_args, cfg, runtime)
    model.train()
    return model, build_optimizer(model, cfg.optim, runtime.device.type)


def train_steps(model, optimizer, runtime, loss_fn, batch, num_steps: int, autocast: bool) -> list[float]:
    """Seconds per step of forward + backward + clip + AdamW, as the loop's step runs them."""
    import torch

    times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        with torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model, batch)
        loss.backward()
        runtime.clip_grad_norm([p for group in optimizer.param_groups for p in group["params"]], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        if not torch.isfinite(loss.detach()).item():
            raise RuntimeError(f"non-finite loss {loss.item()}")
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_process_group_env()
    import functools

    import torch

    from llama3.config import preset
    from llama3.distributed.runtime import distributed_runtime
    from llama3.train.config import TrainConfig

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the code path on CPU", file=sys.stderr)
        return 2
    cfg = TrainConfig()
    cfg.train.device = "cpu" if args.dry_run else "cuda"
    cfg.train.dtype = "bf16"
    cfg.train.loss_chunk_size = args.loss_chunk
    cfg.parallel.compile = not args.no_compile
    cfg.parallel.activation_checkpoint = args.ac
    cfg.data.seq_len, cfg.data.batch_size = args.seq, args.batch
    if args.dry_run:
        cfg.data.seq_len, cfg.data.batch_size = min(args.seq, 64), min(args.batch, 2)
    backend = args.compile_backend or ("aot_eager" if args.dry_run else "inductor")
    runtime = distributed_runtime(cfg, compile_backend=backend)
    device = runtime.device
    if cfg.parallel.compile:
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)

    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    peak = measure_matmul_peak(device, torch.bfloat16, 256 if args.dry_run else 8192)
    datasheet = next((v for k, v in DATASHEET_BF16.items() if k in gpu_name), None)
    print(f"{gpu_name}: measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s"
          + (f" (datasheet {datasheet / 1e12:.0f})" if datasheet else ""), flush=True)

    tokens = cfg.data.seq_len * cfg.data.batch_size
    if args.dry_run:
        shape = preset("llama3-8b", dim=64, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=512,
                       n_layers=args.layers or 2, max_seq_len=cfg.data.seq_len)
    else:
        shape = preset("llama3-8b", vocab_size=128256, max_seq_len=cfg.data.seq_len)
        free, _ = torch.cuda.mem_get_info(device)
        layers = args.layers or layers_that_fit(shape, free, tokens)
        shape = preset("llama3-8b", vocab_size=128256, max_seq_len=cfg.data.seq_len, n_layers=layers)
    loss_fn = functools.partial(runtime.lm_loss, chunk_size=cfg.train.loss_chunk_size)  # as the loop's
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, shape.vocab_size, (cfg.data.batch_size, cfg.data.seq_len + 1), generator=gen)
    batch = {"inputs": ids[:, :-1].to(device), "targets": ids[:, 1:].to(device)}

    for attempt in range(3):  # on out-of-memory, drop two layers and try again
        model = optimizer = None
        try:
            model, optimizer = build(cfg, runtime, shape)
            t0 = time.perf_counter()
            train_steps(model, optimizer, runtime, loss_fn, batch, args.warmup, autocast=True)
            warmup_s = time.perf_counter() - t0
            times = train_steps(model, optimizer, runtime, loss_fn, batch, args.steps, autocast=True)
            break
        except torch.cuda.OutOfMemoryError:
            if attempt == 2 or shape.n_layers <= 2 or args.layers:
                raise
        # Freed here, after the except block: its traceback kept the failed attempt's tensors alive.
        print(f"out of memory with {shape.n_layers} layers; retrying with {shape.n_layers - 2}", flush=True)
        model = optimizer = None
        torch._dynamo.reset()  # compiled graphs may still refer to the old blocks
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        shape = preset("llama3-8b", vocab_size=128256, max_seq_len=cfg.data.seq_len, n_layers=shape.n_layers - 2)

    step_s = statistics.median(times)
    tokens_per_s = tokens / step_s
    flops_per_token = shape.flops_per_token(cfg.data.seq_len)
    mfu = flops_per_token * tokens_per_s / peak
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    result = {"gpu": gpu_name, "layers": shape.n_layers, "params": shape.num_params(), "seq": cfg.data.seq_len,
              "batch": cfg.data.batch_size, "compile": cfg.parallel.compile, "ac": args.ac,
              "peak_tflops": peak / 1e12, "step_s": step_s, "tokens_per_s": tokens_per_s, "mfu": mfu,
              "mfu_datasheet": flops_per_token * tokens_per_s / datasheet if datasheet else None,
              "warmup_s": warmup_s, "max_mem_gib": mem, "torch": torch.__version__}
    print("| GPU | layers (params) | seq × batch | compile / AC | peak TFLOP/s (measured) | step s | tokens/s "
          "| MFU (measured peak) | MFU (datasheet) | max mem GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ds = f"{100 * result['mfu_datasheet']:.1f}%" if datasheet else "n/a"
    print(f"| {gpu_name} | {shape.n_layers} ({shape.num_params() / 1e9:.2f}B) | {cfg.data.seq_len} × "
          f"{cfg.data.batch_size} | {'on' if cfg.parallel.compile else 'off'} / {args.ac} | {peak / 1e12:.1f} "
          f"| {step_s:.3f} | {tokens_per_s:,.0f} | {100 * mfu:.1f}% | {ds} | {mem:.1f} |")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
