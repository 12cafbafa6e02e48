// Matrix products for prompts with 16-bit weights: y = x · Wᵀ for many rows of x (a prompt's tokens),
// bf16 or f16 weights as they lie in the checkpoint, fp32 arithmetic.
//
//   llama3::gemm16(x bf16|fp32 (M, K), [w_0 (N_0, K), ...] all bf16 or all f16) -> x.dtype (M, ΣN)
//
// On a CPU without native bf16 products, torch multiplies bf16 slowly, and its fp32 GEMM on widened copies
// of the weights reached only ~100 GFLOP/s on 2 Zen 3 cores (quiet machine). This kernel keeps the fp32 units busy from
// registers: an outer-product tile of 6 rows of x by 16 weight rows, 12 accumulators of 8 lanes, each step
// of K one value of each of the 6 rows of x (broadcast) against 16 weight values (two vector loads): 8 loads
// and 24 bytes of x per 12 fused multiply-adds, so x can stream from L2 while the weights' panel sits in L1.
// (A dot-product tile along K, 3 x 4 rows, needed 224 bytes per 12 FMAs and ran slower.)
//
// Packing: x is widened once per call into panels of kTileM rows, value k of those rows side by side; each thread
// takes chunks of kChunkRows weight rows (an atomic counter, so a core slowed by other work takes fewer)
// and widens them a block of kBlockK columns at a time into panels of kTileN rows, value k of those rows side
// by side (64 KB per block, in L2; one conversion per weight per call, M times fewer than the FMAs). Every
// panel of x meets each weight panel (16 KB, in L1) in turn. A chunk's sums stay in a buffer of the thread
// (M x kChunkRows fp32) across the blocks of K and are written once, in the output's type.
//
// Code paths: AVX-512, AVX2 + FMA, and portable C++ for the others. With AVX-512 the tile is 8 rows of x by
// 32 weight rows (16 accumulators of 16 lanes, 10 loads per 16 multiply-adds) over blocks of 128 values of
// K, so that a panel stays 16 KB: on 2 Zen 5 cores, 512 rows of fp32 x against 1B- and 8B-shaped f16
// weights, 305-395 GFLOP/s against 180-220 with the AVX2 tile and ~180 for torch's fp32 GEMM on a widened
// copy (6 x 32 tiles: 290-350; 12 x 32: 295-390; blocks of 256 values: 3% faster there, but a 32 KB panel
// fills a 32 KB L1). Results equal a float64 product up to fp32 summation order (bf16 and f16 widen to
// fp32 exactly).

#include "ops_namespace.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LLAMA3_GEMM16_AVX2 1
#include <immintrin.h>
#endif

namespace {
namespace gemm16_detail {  // one translation unit holds every source: names stay apart

#if defined(__AVX512F__) && defined(LLAMA3_GEMM16_AVX2)
#define LLAMA3_GEMM16_AVX512 1
constexpr int kTileM = 8;            // rows of x per tile
constexpr int kTileN = 32;           // weight rows per tile: two vectors of 16
constexpr int64_t kBlockK = 128;     // values of K per packed block: a 32-row panel is 16 KB, in L1
#else
constexpr int kTileM = 6;            // rows of x per tile
constexpr int kTileN = 16;           // weight rows per tile: two vectors of 8
constexpr int64_t kBlockK = 256;     // values of K per packed block: a 16-row panel is 16 KB, in L1
#endif
constexpr int64_t kChunkRows = 64;   // weight rows per unit of thread work (a multiple of kTileN)

inline float half_bits_to_float(uint16_t h) {
  // IEEE binary16 to binary32, exact (the portable path; the AVX2 path uses F16C)
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu, bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float bf16_bits_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// dst[0:n] = src[0:n] widened to fp32; dst[n:padded] = 0
void widen(const uint16_t* src, int64_t n, int64_t padded, bool bf16, float* dst) {
  int64_t k = 0;
#ifdef LLAMA3_GEMM16_AVX2
  if (bf16) {
    for (; k + 8 <= n; k += 8) {
      const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k)));
      _mm256_storeu_ps(dst + k, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    }
  } else {
    for (; k + 8 <= n; k += 8)
      _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
  }
#endif
  for (; k < n; ++k) dst[k] = bf16 ? bf16_bits_to_float(src[k]) : half_bits_to_float(src[k]);
  for (; k < padded; ++k) dst[k] = 0.f;
}

// sums[m * stride + n] += Σ_k xp[k * kTileM + m] · wp[k * kTileN + n] for m < kTileM, n < kTileN: xp a
// panel of x and wp one of W, both packed (values past the true rows are zeros); only the first `rows`
// rows and `cols` columns of sums are written
void tile(const float* xp, const float* wp, int64_t kc, float* sums, int64_t stride, int rows, int cols) {
#if defined(LLAMA3_GEMM16_AVX512)
  __m512 acc[kTileM][2];
#pragma GCC unroll 16
  for (int m = 0; m < kTileM; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k, xp += kTileM, wp += kTileN) {
    const __m512 b0 = _mm512_loadu_ps(wp), b1 = _mm512_loadu_ps(wp + 16);
#pragma GCC unroll 16
    for (int m = 0; m < kTileM; ++m) {
      const __m512 a = _mm512_set1_ps(xp[m]);
      acc[m][0] = _mm512_fmadd_ps(a, b0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(a, b1, acc[m][1]);
    }
  }
  // columns past `cols` are left alone: a mask per half of the tile
  const __mmask16 lo = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1u);
  const __mmask16 hi = cols >= 32 ? __mmask16(0xFFFF) : cols <= 16 ? __mmask16(0) : __mmask16((1u << (cols - 16)) - 1u);
  for (int m = 0; m < rows; ++m) {
    float* out = sums + m * stride;
    _mm512_mask_storeu_ps(out, lo, _mm512_add_ps(_mm512_maskz_loadu_ps(lo, out), acc[m][0]));
    _mm512_mask_storeu_ps(out + 16, hi, _mm512_add_ps(_mm512_maskz_loadu_ps(hi, out + 16), acc[m][1]));
  }
#elif defined(LLAMA3_GEMM16_AVX2)
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < kc; ++k, xp += kTileM, wp += kTileN) {
    const __m256 b0 = _mm256_loadu_ps(wp), b1 = _mm256_loadu_ps(wp + 8);
    __m256 a = _mm256_broadcast_ss(xp);
    c00 = _mm256_fmadd_ps(a, b0, c00), c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(xp + 1);
    c10 = _mm256_fmadd_ps(a, b0, c10), c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(xp + 2);
    c20 = _mm256_fmadd_ps(a, b0, c20), c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(xp + 3);
    c30 = _mm256_fmadd_ps(a, b0, c30), c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(xp + 4);
    c40 = _mm256_fmadd_ps(a, b0, c40), c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(xp + 5);
    c50 = _mm256_fmadd_ps(a, b0, c50), c51 = _mm256_fmadd_ps(a, b1, c51);
  }
  const __m256 acc[kTileM][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (cols == kTileN) {
    for (int m = 0; m < rows; ++m) {
      float* out = sums + m * stride;
      _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), acc[m][0]));
      _mm256_storeu_ps(out + 8, _mm256_add_ps(_mm256_loadu_ps(out + 8), acc[m][1]));
    }
    return;
  }
  alignas(32) float row[kTileN];
  for (int m = 0; m < rows; ++m) {
    _mm256_store_ps(row, acc[m][0]);
    _mm256_store_ps(row + 8, acc[m][1]);
    for (int n = 0; n < cols; ++n) sums[m * stride + n] += row[n];
  }
#else
  float acc[kTileM][kTileN] = {};
  for (int64_t k = 0; k < kc; ++k)
    for (int m = 0; m < kTileM; ++m)
      for (int n = 0; n < kTileN; ++n) acc[m][n] += xp[k * kTileM + m] * wp[k * kTileN + n];
  for (int m = 0; m < rows; ++m)
    for (int n = 0; n < cols; ++n) sums[m * stride + n] += acc[m][n];
#endif
}

// The weights side by side: row n of the group lies in part `part_of(n)`
struct WeightRows {
  std::vector<int64_t> starts{0};  // the first row of each part, then the total
  std::vector<const uint16_t*> parts;
  int64_t K = 0;
  const uint16_t* row(int64_t n) const {
    size_t part = 0;
    while (n >= starts[part + 1]) ++part;  // a handful of parts: a scan beats a search
    return parts[part] + (n - starts[part]) * K;
  }
};

// rows [n0, n0 + rows) of W, columns [k0, k0 + kc), widened into panels of kTileN rows (value k of those rows
// side by side; rows past `rows` are zeros); `row` is scratch for one widened row
void pack_weights(const WeightRows& w, bool bf16, int64_t n0, int64_t rows, int64_t k0, int64_t kc, float* panels,
                  float* row) {
  const int64_t num_panels = (rows + kTileN - 1) / kTileN;
  for (int64_t r = 0; r < num_panels * kTileN; ++r) {
    float* panel = panels + (r / kTileN) * kc * kTileN + r % kTileN;
    if (r >= rows) {
      for (int64_t k = 0; k < kc; ++k) panel[k * kTileN] = 0.f;
      continue;
    }
    widen(w.row(n0 + r) + k0, kc, kc, bf16, row);
    for (int64_t k = 0; k < kc; ++k) panel[k * kTileN] = row[k];
  }
}

// One chunk of weight rows [n0, n0 + rows) against all of x (packed: panels of kTileM rows, (K, kTileM) each): the
// sums go to `sums` (M, kChunkRows), kept across the blocks of K, then once to y's columns n0.. in y's type
template <typename Out>
void chunk_product(const WeightRows& w, bool bf16, int64_t n0, int64_t rows, const float* x, int64_t M,
                   Out* y, int64_t N, float* panels, float* row, float* sums) {
  const int64_t K = w.K;
  std::fill(sums, sums + M * kChunkRows, 0.f);
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
    const int64_t kc = std::min(kBlockK, K - k0);
    pack_weights(w, bf16, n0, rows, k0, kc, panels, row);
    for (int64_t j = 0; j < rows; j += kTileN) {
      const int cols = static_cast<int>(std::min<int64_t>(kTileN, rows - j));
      const float* wp = panels + (j / kTileN) * kc * kTileN;
      for (int64_t i = 0; i < M; i += kTileM) {
        const int num = static_cast<int>(std::min<int64_t>(kTileM, M - i));
        tile(x + i * K + k0 * kTileM, wp, kc, sums + i * kChunkRows + j, kChunkRows, num, cols);
      }
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < rows; ++r) y[m * N + n0 + r] = Out(sums[m * kChunkRows + r]);
}

// x (M, K) bf16 or fp32 -> panels of kTileM rows, (K, kTileM) each, value k of those rows side by side (rows past M
// are zeros), over the thread pool
void pack_activations(const at::Tensor& x_in, float* out) {
  const int64_t M = x_in.size(0), K = x_in.size(1);
  const bool bf16 = x_in.scalar_type() == at::kBFloat16;
  const auto* x16 = bf16 ? reinterpret_cast<const uint16_t*>(x_in.const_data_ptr()) : nullptr;
  const float* x32 = bf16 ? nullptr : x_in.const_data_ptr<float>();
  const int64_t num_panels = (M + kTileM - 1) / kTileM;
  at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t p = begin; p < end; ++p) {
      float* panel = out + p * K * kTileM;
      for (int64_t i = 0; i < kTileM; ++i) {
        const int64_t m = p * kTileM + i;
        if (m >= M) {
          for (int64_t k = 0; k < K; ++k) panel[k * kTileM + i] = 0.f;
          continue;
        }
        const float* src = x32 + m * K;
        if (bf16) {
          widen(x16 + m * K, K, K, true, row.data());
          src = row.data();
        }
        for (int64_t k = 0; k < K; ++k) panel[k * kTileM + i] = src[k];
      }
    }
  });
}

template <typename Out>
void product(const WeightRows& rows, bool bf16, const float* x, int64_t M, Out* y) {
  const int64_t N = rows.starts.back();
  const int64_t chunks = (N + kChunkRows - 1) / kChunkRows;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), chunks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> panels(kChunkRows * kBlockK), row(kBlockK), sums(M * kChunkRows);
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      const int64_t n0 = c * kChunkRows;
      chunk_product(rows, bf16, n0, std::min(kChunkRows, N - n0), x, M, y, N, panels.data(), row.data(),
                    sums.data());
    }
  });
}

at::Tensor gemm16(const at::Tensor& x_arg, at::TensorList ws) {
  const char* op = "llama3::gemm16";
  TORCH_CHECK(!ws.empty(), op, ": needs at least one weight");
  const auto wtype = ws[0].scalar_type();
  TORCH_CHECK(wtype == at::kBFloat16 || wtype == at::kHalf, op, ": weights must be bfloat16 or float16, got ",
              wtype);
  TORCH_CHECK(x_arg.device().is_cpu() && x_arg.dim() == 2, op, ": x must be a 2-D CPU tensor (M, K), got ",
              x_arg.sizes());
  TORCH_CHECK(x_arg.scalar_type() == at::kBFloat16 || x_arg.scalar_type() == at::kFloat, op,
              ": x must be bfloat16 or float32, got ", x_arg.scalar_type());
  const at::Tensor x_in = x_arg.contiguous();
  const int64_t M = x_in.size(0), K = x_in.size(1);
  WeightRows rows;
  rows.K = K;
  for (const at::Tensor& w : ws) {
    TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(), op,
                ": weights must be contiguous 2-D CPU tensors (N, K), got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == wtype, op, ": all weights must have one dtype, got ", wtype, " and ",
                w.scalar_type());
    TORCH_CHECK(w.size(1) == K, op, ": x has ", K, " columns but a weight has ", w.size(1));
    rows.starts.push_back(rows.starts.back() + w.size(0));
    rows.parts.push_back(reinterpret_cast<const uint16_t*>(w.const_data_ptr()));
  }
  const int64_t N = rows.starts.back();
  at::Tensor y = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return y;
  // x once in fp32, in panels of kTileM rows
  at::Tensor x = at::empty({(M + kTileM - 1) / kTileM * kTileM, K}, x_in.options().dtype(at::kFloat));
  pack_activations(x_in, x.mutable_data_ptr<float>());
  const bool bf16 = wtype == at::kBFloat16;
  if (y.scalar_type() == at::kFloat) {
    product(rows, bf16, x.const_data_ptr<float>(), M, y.mutable_data_ptr<float>());
  } else {
    product(rows, bf16, x.const_data_ptr<float>(), M, y.mutable_data_ptr<c10::BFloat16>());
  }
  return y;
}

}  // namespace gemm16_detail
}  // namespace

LLAMA3_LIBRARY_FRAGMENT(m) { m.def("gemm16(Tensor x, Tensor[] ws) -> Tensor"); }

LLAMA3_LIBRARY_IMPL_CPU(m) { m.impl("gemm16", &gemm16_detail::gemm16); }
