// Matrix products for prompts with 16-bit weights: y = x · Wᵀ for many rows of x (a prompt's tokens),
// bf16 or f16 weights as they lie in the checkpoint, fp32 arithmetic.
//
//   llama3::gemm16(x bf16|fp32 (M, K), [w_0 (N_0, K), ...] all bf16 or all f16) -> x.dtype (M, ΣN)
//
// On a CPU without native bf16 products, torch multiplies bf16 slowly, and its fp32 GEMM on widened copies
// of the weights reached only ~100 GFLOP/s on 2 Zen 3 cores. This kernel reaches more by keeping the
// fp32 units busy from registers: a tile of 3 rows of x against 4 weight rows, 12 accumulators of 8 lanes
// along K, fed by 7 vector loads per 12 fused multiply-adds (2 loads per cycle keep up with 2 FMA units).
// Both operands are read along K, where they are contiguous, so neither x nor W is transposed; each tile's
// 12 sums are folded across lanes once per block of K.
//
// Blocking: the threads take chunks of kChunkRows weight rows (an atomic counter, so a core slowed by other
// work takes fewer); a chunk is widened to fp32 a block of kBlockK columns at a time into a per-thread
// buffer (the widening costs one conversion per weight per call, M times fewer than the multiply-adds, and
// lets the inner loop be pure loads and FMAs); that block (128 KB) stays in L2 while every row of x meets
// it, 4 weight rows (8 KB, L1) against kBlockM rows of x (96 KB, L2) at a time.
//
// Code paths: AVX2 + FMA (also taken in the AVX-512 builds), and portable C++ for the others. Results equal
// a float64 product up to fp32 summation order (bf16 and f16 widen to fp32 exactly).

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

constexpr int kTileM = 3;              // rows of x per tile
constexpr int kTileN = 4;              // weight rows per tile
constexpr int64_t kBlockK = 512;       // columns per block: 2 KB per fp32 row, a tile's 7 rows stay in L1
constexpr int64_t kChunkRows = 64;     // weight rows per unit of thread work (a multiple of kTileN)
constexpr int64_t kBlockM = 48;        // rows of x per pass over a widened block (a multiple of kTileM)

inline int64_t round8(int64_t v) { return (v + 7) / 8 * 8; }

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

#ifdef LLAMA3_GEMM16_AVX2
// out[0:4] += the lane sums of a, b, c, d: three horizontal adds and one 4-lane add
inline void add_sums4(__m256 a, __m256 b, __m256 c, __m256 d, float* out) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // a0123 b0123 c0123 d0123 | a4567 ...
  const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
  _mm_storeu_ps(out, _mm_add_ps(_mm_loadu_ps(out), sums));
}
#endif

// y[m * y_stride + n] += Σ_k x[m * x_stride + k] · w[n * w_stride + k] for m < MR, n < NR, k < K8 (a
// multiple of 8; both operands zero past their true width)
template <int MR, int NR>
void tile(const float* x, int64_t x_stride, const float* w, int64_t w_stride, int64_t K8, float* y,
          int64_t y_stride) {
#ifdef LLAMA3_GEMM16_AVX2
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x + m * x_stride + k);
    for (int n = 0; n < NR; ++n) {
      const __m256 wv = _mm256_loadu_ps(w + n * w_stride + k);
      for (int m = 0; m < MR; ++m) acc[m][n] = _mm256_fmadd_ps(xv[m], wv, acc[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    float* out = y + m * y_stride;
    if constexpr (NR == 4) {
      add_sums4(acc[m][0], acc[m][1], acc[m][2], acc[m][3], out);
    } else {
      for (int n = 0; n < NR; ++n) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[m][n]), _mm256_extractf128_ps(acc[m][n], 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        out[n] += _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
      }
    }
  }
#else
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) {
      float s = 0.f;
      for (int64_t k = 0; k < K8; ++k) s += x[m * x_stride + k] * w[n * w_stride + k];
      y[m * y_stride + n] += s;
    }
#endif
}

#ifdef LLAMA3_GEMM16_AVX2
// The full tile, written out: with 12 accumulators, 3 x vectors and a weight vector the 16 vector registers
// are all taken, and the compiler, left to the generic loop, folds the loads into the FMAs (each x vector
// loaded 4 times and each weight vector 3 times: 15 loads per 12 FMAs) or spills. The empty asm statements
// pin each loaded vector to a register, so each is loaded once.
template <>
void tile<3, 4>(const float* x, int64_t x_stride, const float* w, int64_t w_stride, int64_t K8, float* y,
                int64_t y_stride) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,
         a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00;
  const float *x0 = x, *x1 = x + x_stride, *x2 = x + 2 * x_stride;
  const float *w0 = w, *w1 = w + w_stride, *w2 = w + 2 * w_stride, *w3 = w + 3 * w_stride;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 v0 = _mm256_loadu_ps(x0 + k), v1 = _mm256_loadu_ps(x1 + k), v2 = _mm256_loadu_ps(x2 + k);
    asm("" : "+x"(v0), "+x"(v1), "+x"(v2));
    __m256 wv = _mm256_loadu_ps(w0 + k);
    asm("" : "+x"(wv));
    a00 = _mm256_fmadd_ps(v0, wv, a00), a10 = _mm256_fmadd_ps(v1, wv, a10), a20 = _mm256_fmadd_ps(v2, wv, a20);
    wv = _mm256_loadu_ps(w1 + k);
    asm("" : "+x"(wv));
    a01 = _mm256_fmadd_ps(v0, wv, a01), a11 = _mm256_fmadd_ps(v1, wv, a11), a21 = _mm256_fmadd_ps(v2, wv, a21);
    wv = _mm256_loadu_ps(w2 + k);
    asm("" : "+x"(wv));
    a02 = _mm256_fmadd_ps(v0, wv, a02), a12 = _mm256_fmadd_ps(v1, wv, a12), a22 = _mm256_fmadd_ps(v2, wv, a22);
    wv = _mm256_loadu_ps(w3 + k);
    asm("" : "+x"(wv));
    a03 = _mm256_fmadd_ps(v0, wv, a03), a13 = _mm256_fmadd_ps(v1, wv, a13), a23 = _mm256_fmadd_ps(v2, wv, a23);
  }
  add_sums4(a00, a01, a02, a03, y);
  add_sums4(a10, a11, a12, a13, y + y_stride);
  add_sums4(a20, a21, a22, a23, y + 2 * y_stride);
}
#endif

template <int MR>
void tile_rows(int nr, const float* x, int64_t x_stride, const float* w, int64_t w_stride, int64_t K8, float* y,
               int64_t y_stride) {
  switch (nr) {
    case 1: tile<MR, 1>(x, x_stride, w, w_stride, K8, y, y_stride); break;
    case 2: tile<MR, 2>(x, x_stride, w, w_stride, K8, y, y_stride); break;
    case 3: tile<MR, 3>(x, x_stride, w, w_stride, K8, y, y_stride); break;
    default: tile<MR, 4>(x, x_stride, w, w_stride, K8, y, y_stride); break;
  }
}

void any_tile(int mr, int nr, const float* x, int64_t x_stride, const float* w, int64_t w_stride, int64_t K8,
              float* y, int64_t y_stride) {
  switch (mr) {
    case 1: tile_rows<1>(nr, x, x_stride, w, w_stride, K8, y, y_stride); break;
    case 2: tile_rows<2>(nr, x, x_stride, w, w_stride, K8, y, y_stride); break;
    default: tile_rows<3>(nr, x, x_stride, w, w_stride, K8, y, y_stride); break;
  }
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

// One chunk of weight rows [n0, n0 + rows) against all of x (M, Kp fp32, padded with zeros): the sums go to
// `sums` (M, kChunkRows), which stays in L2 across the blocks of K, then once to y's columns n0.. in y's type
template <typename Out>
void chunk_product(const WeightRows& w, bool bf16, int64_t n0, int64_t rows, const float* x, int64_t M,
                   int64_t Kp, Out* y, int64_t N, float* buffer, float* sums) {
  const int64_t K = w.K;
  std::fill(sums, sums + M * kChunkRows, 0.f);
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
    const int64_t kc = std::min(kBlockK, K - k0), kc8 = round8(kc);
    for (int64_t r = 0; r < rows; ++r) widen(w.row(n0 + r) + k0, kc, kc8, bf16, buffer + r * kBlockK);
    for (int64_t m0 = 0; m0 < M; m0 += kBlockM) {
      const int64_t m1 = std::min(M, m0 + kBlockM);
      for (int64_t j = 0; j < rows; j += kTileN) {
        const int nr = static_cast<int>(std::min<int64_t>(kTileN, rows - j));
        for (int64_t i = m0; i < m1; i += kTileM) {
          const int mr = static_cast<int>(std::min<int64_t>(kTileM, m1 - i));
          any_tile(mr, nr, x + i * Kp + k0, Kp, buffer + j * kBlockK, kBlockK, kc8, sums + i * kChunkRows + j,
                   kChunkRows);
        }
      }
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < rows; ++r) y[m * N + n0 + r] = Out(sums[m * kChunkRows + r]);
}

// x (M, K) bf16 or fp32 -> fp32 (M, Kp), each row padded with zeros, over the thread pool
void widen_activations(const at::Tensor& x_in, float* out, int64_t Kp) {
  const int64_t M = x_in.size(0), K = x_in.size(1);
  const bool bf16 = x_in.scalar_type() == at::kBFloat16;
  const auto* x16 = bf16 ? reinterpret_cast<const uint16_t*>(x_in.const_data_ptr()) : nullptr;
  const float* x32 = bf16 ? nullptr : x_in.const_data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      if (bf16) {
        widen(x16 + m * K, K, Kp, true, out + m * Kp);
      } else {
        std::memcpy(out + m * Kp, x32 + m * K, K * sizeof(float));
        std::fill(out + m * Kp + K, out + (m + 1) * Kp, 0.f);
      }
    }
  });
}

template <typename Out>
void product(const WeightRows& rows, bool bf16, const float* x, int64_t M, int64_t Kp, Out* y) {
  const int64_t N = rows.starts.back();
  const int64_t chunks = (N + kChunkRows - 1) / kChunkRows;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), chunks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> buffer(kChunkRows * kBlockK), sums(M * kChunkRows);
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      const int64_t n0 = c * kChunkRows;
      chunk_product(rows, bf16, n0, std::min(kChunkRows, N - n0), x, M, Kp, y, N, buffer.data(), sums.data());
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
  const int64_t M = x_in.size(0), K = x_in.size(1), Kp = round8(K);
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
  // x once in fp32, each row padded with zeros to a whole number of 8-lane steps
  at::Tensor x = at::empty({M, Kp}, x_in.options().dtype(at::kFloat));
  widen_activations(x_in, x.mutable_data_ptr<float>(), Kp);
  const bool bf16 = wtype == at::kBFloat16;
  if (y.scalar_type() == at::kFloat) {
    product(rows, bf16, x.const_data_ptr<float>(), M, Kp, y.mutable_data_ptr<float>());
  } else {
    product(rows, bf16, x.const_data_ptr<float>(), M, Kp, y.mutable_data_ptr<c10::BFloat16>());
  }
  return y;
}

}  // namespace gemm16_detail
}  // namespace

LLAMA3_LIBRARY_FRAGMENT(m) { m.def("gemm16(Tensor x, Tensor[] ws) -> Tensor"); }

LLAMA3_LIBRARY_IMPL_CPU(m) { m.impl("gemm16", &gemm16_detail::gemm16); }
