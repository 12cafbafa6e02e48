"""The CPU kernels at every instruction-set level this CPU runs, against torch's own operators, same run.

    python benchmarks/kernels.py                 # Llama-3.2-1B matrices, 2 threads
    python benchmarks/kernels.py --threads 1 --repeats 30

For each matrix of the 1B shape (the fused FFN input 16384 x 2048 is taken as 8192 x 2048, the FFN output
2048 x 8192, the output projection 128256 x 2048) one activation row goes through `gemv_bf16`, `gemv_int8`
and `gemv_int4` of every level in `llama3.kernels.supported_isas()`, through `ggml_matmul` on the GGUF block
types Q8_0, Q4_0, Q4_K, Q5_K and Q6_K (rows of one quantized 64-row matrix, repeated; file layout, and repacked
by `ggml_repack` where the level repacks the type), and through torch's bf16
`F.linear` as the peer; the loss kernel `xent_rows_` runs on 256 rows of the 128K vocabulary beside torch's
log-softmax + its gradient. The best of `--repeats` runs is reported (the machine is shared), as
milliseconds and as GB/s of weights read.

Prompts on 16-bit weights (`--prompt-rows`, "" to skip): for the 1B shape's q/k/v (3072 x 2048), FFN input and
output, bf16 and f16 weights meet M activation rows in `gemm16` of every level, in the matrix-vector kernel
`gemv_group` (a pass over the weight per 8 rows) and in torch's fp32 GEMM on the weight widened slice by slice
(`gemv.sliced_matmul`, the route without `gemm16`); reported as ms and GFLOP/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama3 import kernels  # noqa: E402
from llama3.checkpoint.gguf_quants import QUANT_TYPES, quantize  # noqa: E402
from llama3.inference.gemv import sliced_matmul  # noqa: E402
from llama3.inference.quantize import pack_int4_codes  # noqa: E402

MATRICES = [(8192, 2048), (2048, 8192), (128256, 2048)]  # (N, K): rows of W, input width
GGML_TYPES = ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")


def ggml_rows(kind: str, N: int, K: int) -> torch.Tensor:
    """uint8 (N, row bytes): a 64-row random matrix quantized to `kind`, its rows repeated N / 64 times
    (the speed does not depend on the values; quantizing all N rows in NumPy would take minutes)."""
    import numpy as np

    block = quantize(np.random.default_rng(0).standard_normal((64, K)).astype(np.float32), kind).reshape(64, -1)
    return torch.from_numpy(np.ascontiguousarray(np.tile(block, (-(-N // 64), 1))[:N]))


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_gemv(N: int, K: int, repeats: int) -> list[tuple[str, float, float]]:
    """(name, seconds, bytes of weights read) for every level and torch on one (N, K) matrix."""
    torch.manual_seed(0)
    x = torch.randn(1, K).bfloat16()
    w = torch.randn(N, K).bfloat16()
    q, scales = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N)
    codes = pack_int4_codes(torch.randint(0, 16, (N, K), dtype=torch.uint8))
    group_scales = (torch.rand(N, K // 32) * 0.1).half()
    rows = [("torch F.linear bf16", best_seconds(lambda: F.linear(x, w), repeats), 2.0 * N * K)]
    blocks = {kind: ggml_rows(kind, N, K) for kind in GGML_TYPES}
    for isa in kernels.supported_isas():
        ops = kernels.ops(isa)
        rows += [(f"{isa} gemv_bf16", best_seconds(lambda ops=ops: ops.gemv_bf16(x, w), repeats), 2.0 * N * K),
                 (f"{isa} gemv_int8", best_seconds(lambda ops=ops: ops.gemv_int8(x, q, scales), repeats), 1.0 * N * K),
                 (f"{isa} gemv_int4", best_seconds(lambda ops=ops: ops.gemv_int4(x, codes, group_scales, group_scales, 32),
                                                   repeats), (0.5 + 4 / 32) * N * K)]
        rows += [(f"{isa} ggml_matmul {kind}",
                  best_seconds(lambda ops=ops, kind=kind: ops.ggml_matmul(x, blocks[kind], QUANT_TYPES[kind].ggml_id, K),
                               repeats), blocks[kind].numel()) for kind in GGML_TYPES]
        for kind in GGML_TYPES:  # the same weights repacked, where this level repacks the type
            repacked = repack(ops, blocks[kind], kind, K)
            if repacked is not None:
                ggml_id = QUANT_TYPES[kind].ggml_id | REPACKED
                rows.append((f"{isa} ggml_matmul {kind} repacked", best_seconds(
                    lambda ops=ops, w=repacked, t=ggml_id: ops.ggml_matmul(x, w, t, K), repeats), blocks[kind].numel()))
    return rows


REPACKED = 256  # a ggml type | this: the type in the kernels' 8-row layout


def repack(ops, blocks: torch.Tensor, kind: str, K: int) -> torch.Tensor | None:
    """`blocks` (N, row bytes) in the 8-row layout of `ggml_repack`, or None where `ops` does not repack `kind`."""
    qtype = QUANT_TYPES[kind]
    group_bytes = ops.ggml_repack_block_bytes(qtype.ggml_id)
    if group_bytes == 0:
        return None
    out = torch.empty(blocks.shape[0] // 8, K // qtype.block_values * group_bytes, dtype=torch.uint8)
    ops.ggml_repack(blocks, qtype.ggml_id, K, out)
    return out


PROMPT_MATRICES = [(3072, 2048), (8192, 2048), (2048, 8192)]  # (N, K): q/k/v, FFN input, FFN output


def bench_prompt(M: int, N: int, K: int, dtype: torch.dtype, repeats: int) -> list[tuple[str, float]]:
    """(name, seconds) for M rows of x against one 16-bit (N, K) weight: gemm16 and gemv_group of every
    level, and torch's fp32 GEMM on slices widened from the weight."""
    torch.manual_seed(0)
    x = torch.randn(M, K).to(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    w = torch.randn(N, K).to(dtype)
    rows = [("torch fp32 GEMM, widened slices", best_seconds(
        lambda: sliced_matmul(x, N, lambda n0, n1: w[n0:n1].float(), torch.float32), repeats))]
    for isa in kernels.supported_isas():
        if isa == "portable" and M > 64:
            continue  # minutes of plain C++; the portable level keeps torch's route for prompts
        ops = kernels.ops(isa)
        rows += [(f"{isa} gemm16", best_seconds(lambda ops=ops: ops.gemm16(x, [w]), repeats)),
                 (f"{isa} gemv_group", best_seconds(lambda ops=ops: ops.gemv_group(x, [w]), repeats))]
    return rows


def print_prompt_table(rows_list: list[int], repeats: int) -> None:
    print("\n| rows x matrix (N x K) | weights | operator | ms | GFLOP/s |\n|---|---|---|---:|---:|")
    for M in rows_list:
        for N, K in PROMPT_MATRICES:
            for dtype in (torch.bfloat16, torch.float16):
                for name, seconds in bench_prompt(M, N, K, dtype, max(2, repeats // (1 + M // 64))):
                    print(f"| {M} x {N} x {K} | {str(dtype).removeprefix('torch.')} | {name} | {1e3 * seconds:.1f} "
                          f"| {2 * M * N * K / seconds / 1e9:.0f} |", flush=True)


def bench_xent(repeats: int) -> list[tuple[str, float]]:
    torch.manual_seed(0)
    logits = torch.randn(256, 128256).bfloat16()
    targets, weights = torch.randint(0, 128256, (256,)), torch.full((256,), 1 / 256)

    def torch_loss_and_grad():
        probs = logits.float().softmax(-1)  # what the loss's backward needs without the kernel
        probs[torch.arange(256), targets] -= 1
        return (probs * weights[:, None]).bfloat16()

    rows = [("torch softmax gradient (fp32)", best_seconds(torch_loss_and_grad, repeats))]
    for isa in kernels.supported_isas():
        ops = kernels.ops(isa)
        rows.append((f"{isa} xent_rows_", best_seconds(lambda ops=ops: ops.xent_rows_(logits.clone(), targets, weights, True),
                                                       repeats)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--prompt-rows", default="8,16,32,64,512", help="comma list of prompt rows ('' skips)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit(f"the kernels are unavailable: {kernels.why_unavailable()}")
    print(f"CPU: {kernels.cpu_description()}; levels run here: {', '.join(kernels.supported_isas())} "
          f"(default {kernels.loaded_isa()}); torch {torch.__version__}, {args.threads} threads\n")
    print("| matrix (N x K) | operator | ms | GB/s of weights |\n|---|---|---:|---:|")
    for N, K in MATRICES:
        for name, seconds, num_bytes in bench_gemv(N, K, args.repeats):
            print(f"| {N} x {K} | {name} | {1e3 * seconds:.2f} | {num_bytes / seconds / 1e9:.1f} |", flush=True)
    prompt_rows = [int(r) for r in args.prompt_rows.split(",") if r.strip()]
    if prompt_rows:
        print_prompt_table(prompt_rows, args.repeats)
    print("\n| loss, 256 x 128256 bf16 logits | ms |\n|---|---:|")
    for name, seconds in bench_xent(max(3, args.repeats // 3)):
        print(f"| {name} | {1e3 * seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
