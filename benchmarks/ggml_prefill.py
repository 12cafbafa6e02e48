"""Prompt-sized products on ggml block weights: the byte products of `ggml_matmul` on the file's layout and
on the repacked one (`GGMLLinear.repack`, what `optimize_for_inference` does for Q4_0 / Q4_K / Q6_K; those
then take every row count) against slices of `ggml_dequantize` fed to torch's float32 GEMM (what
`GGMLLinear` does from `PROMPT_ROWS` rows on the file's layout), same run.

    python benchmarks/ggml_prefill.py                     # 1B matrices, 2 threads, M = 8 .. 512
    python benchmarks/ggml_prefill.py --rows 16,32 --types Q4_0

For each block type and each (N, K) of the 1B shape (attention 2048 x 2048, FFN in 8192 x 2048, FFN out
2048 x 8192) and each row count M of x, prints the best of `--repeats` runs of both paths as GMAC/s and
the speed-up of the repacked products over the sliced GEMM, plus `ggml_dequantize`'s own speed on one slice (weights decoded per second, fp32 out). The peak on the CPU
it was written on (Zen 3, 2 cores, AVX2 FMA) is about 96 GMAC/s fp32; the machine may be shared, so read
the ratios.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama3 import kernels  # noqa: E402
from llama3.checkpoint.gguf_quants import QUANT_TYPES  # noqa: E402
from llama3.inference import gemv  # noqa: E402
from llama3.inference.ggml_quant import GGMLLinear  # noqa: E402

try:
    from benchmarks.kernels import best_seconds, ggml_rows  # noqa: E402
except ImportError:  # run as a script from benchmarks/
    from kernels import best_seconds, ggml_rows  # noqa: E402

MATRICES = [(2048, 2048), (8192, 2048), (2048, 8192)]  # (N, K)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", default="8,16,32,64,512", help="comma list of M (rows of x)")
    parser.add_argument("--types", default="Q4_0,Q8_0,Q4_K,Q6_K")
    args = parser.parse_args(argv)
    if not kernels.available():
        raise SystemExit(f"the kernels did not build: {kernels.why_unavailable()}")
    torch.set_num_threads(args.threads)
    print(f"# {kernels.cpu_description()}; {args.threads} threads; kernels {kernels.loaded_isa()}")
    print("type  N x K        M   ggml_matmul GMAC/s  repacked GMAC/s  sliced GEMM GMAC/s  repacked/GEMM speed")
    for kind in args.types.split(","):
        for N, K in MATRICES:
            bench_matrix(kind, N, K, [int(m) for m in args.rows.split(",")], args.repeats)


def bench_matrix(kind: str, N: int, K: int, rows: list[int], repeats: int) -> None:
    """One block type and (N, K): both paths per row count, then the decode speed of one slice."""
    ggml_id = QUANT_TYPES[kind].ggml_id
    layer = GGMLLinear(ggml_rows(kind, N, K), kind, K)
    repacked = GGMLLinear(layer.data, kind, K)
    repacked.repack()
    for M in rows:
        x = torch.randn(M, K)
        ours_s = best_seconds(lambda: torch.ops.llama3.ggml_matmul(x, layer.data, ggml_id, K), repeats)  # noqa: B023
        gemm_s = best_seconds(lambda: layer._sliced_gemm(x), repeats)  # noqa: B023
        # (a type the kernels do not repack runs on the file's layout: the same product as the first column)
        repacked_s = best_seconds(lambda: repacked._product(x), repeats)  # noqa: B023
        macs = M * N * K / 1e9
        print(f"{kind:5s} {N:5d}x{K:<5d} {M:4d}  {macs / ours_s:18.1f}  {macs / repacked_s:15.1f}  "
              f"{macs / gemm_s:18.1f}  {gemm_s / repacked_s:6.2f}x")
    # one slice as the prompt path decodes it (a fresh whole-matrix output would time the page faults)
    part = layer.data[:max(1, gemv.SLICE_BYTES // (K * 4))]
    decode_s = best_seconds(lambda: torch.ops.llama3.ggml_dequantize(part, ggml_id, K, torch.float32), repeats)
    print(f"{kind:5s} {N:5d}x{K:<5d} ggml_dequantize: {part.shape[0] * K / decode_s / 1e9:.2f} G weights/s")

if __name__ == "__main__":
    main()
