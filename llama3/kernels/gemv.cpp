// Matrix-vector products for decoding on the CPU: y = x · Wᵀ for a handful of rows of x.
//
// Decode at batch 1 reads every weight once per token, so its speed is the speed at which the weights
// stream from memory. torch's CPU kernels stream long rows well but short ones (576 wide for the ~100M
// shape's 128K-vocab output projection) slowly, and its int8 kernel spends more time converting than
// reading. These kernels read W strictly in memory order, one row at a time against up to 8 rows of x
// (measured here: interleaving several rows cost up to 40% on short rows, because each row's stream
// restarts the hardware prefetcher), keep independent fp32 accumulators per row of x so the
// multiply-adds do not wait on each other, and split W's rows over torch's own thread pool
// (at::parallel_for, so torch.set_num_threads applies and no second OpenMP runtime is loaded).
//
//   llama3::gemv_bf16(x bf16 (M, K), w bf16 (N, K)) -> bf16 (M, N)
//   llama3::gemv_f32(x fp32 (M, K), w fp32 (N, K)) -> fp32 (M, N)
//   llama3::gemv_group(x (M, K), [w_0 (N_0, K), ...] bf16 or f16) -> x.dtype (M, ΣN): the weights side by
//       side without a concatenated copy; bf16 weights with bf16 x, f16 weights with bf16 or fp32 x
//   llama3::gemv_int8(x bf16|fp32 (M, K), w int8 (N, K), scales fp32 (N,)) -> x.dtype (M, N),
//       y[m, n] = scales[n] · Σ_k x[m, k] · w[n, k], with x rounded to int8 per block of 32 (see below)
//   llama3::gemv_int4(x bf16|fp32 (M, K), w uint8 (N, K/2), scales fp16 (N, G), lows fp16 (N, G), group)
//       -> x.dtype (M, N), y[m, n] = Σ_k x[m, k] · (lows[n, k/group] + code[n, k] · scales[n, k/group]),
//       codes packed two per byte (layout below), x rounded to int8 per block of 32 as for int8
//
// Code paths, chosen at compile time from the instruction sets the compiler was told to use (the levels of
// kernels/__init__.py): AVX-512 (bf16 with the BF16 dot-product instruction where there is one, int8 and
// int4 with VNNI), AVX2 + FMA + F16C (bf16 widened to fp32; int8 and int4 with the VEX VNNI instruction
// where there is one, else two byte-multiply steps), and portable C++ that the compiler vectorizes. All
// paths compute the same documented arithmetic; they differ only in the order of the fp32 sums. The Python
// side builds this file once per machine and level and keeps a pure-PyTorch fallback for when no compiler
// is available.

#include "ops_namespace.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LLAMA3_AVX512 1
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LLAMA3_AVX2 1  // also set in AVX-512 builds: paths without an AVX-512 form use it there
#endif
#if defined(LLAMA3_AVX512) || defined(LLAMA3_AVX2)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 8;  // rows of x per pass over W (more rows: several passes)
// Independent accumulators per row of x: enough chains of multiply-adds in flight to hide their latency
// without running out of the 32 vector registers (unroll x rows <= 8 accumulators... 16 at most).
template <int M>
constexpr int unroll_for() { return M <= 2 ? 4 : (M <= 4 ? 2 : 1); }

#ifdef LLAMA3_AVX512
template <int U, int M>
inline void zero_accumulators(__m512 (&acc)[U][M]) {
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < M; ++m) acc[u][m] = _mm512_setzero_ps();
}

// out[m] = the sum of all lanes of all U accumulators of row m
template <int U, int M>
inline void sum_accumulators(const __m512 (&acc)[U][M], float* out) {
  for (int m = 0; m < M; ++m) {
    __m512 sum = acc[0][m];
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][m]);
    out[m] = _mm512_reduce_add_ps(sum);
  }
}
#endif
#ifdef LLAMA3_AVX2
template <int U, int M>
inline void zero_accumulators(__m256 (&acc)[U][M]) {
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < M; ++m) acc[u][m] = _mm256_setzero_ps();
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int U, int M>
inline void sum_accumulators(const __m256 (&acc)[U][M], float* out) {
  for (int m = 0; m < M; ++m) {
    __m256 sum = acc[0][m];
    for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][m]);
    out[m] = horizontal_sum(sum);
  }
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
#endif
// Weights per unit of work handed to a thread: long runs of consecutive rows stream fastest (measured on a
// 128256 x 2048 bf16 matrix, 2 threads: 37 GB/s in 64 KiB chunks, 51 in 256 KiB, 56 in 1 MiB), but a small
// matrix still needs several chunks per thread to keep both busy.
constexpr int64_t kMinChunkBytes = 64 * 1024;
constexpr int64_t kMaxChunkBytes = 1024 * 1024;
constexpr int64_t kMultiPassChunkBytes = 256 * 1024;  // half of Zen 3's L2, met again by each pass of x
constexpr int64_t kChunksPerThread = 8;

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// ---------------------------------------------------------------------------------------------------------
// bf16 weights, bf16 activations: out[m] = Σ_k w[k] · x[m, k]
// ---------------------------------------------------------------------------------------------------------

#ifdef LLAMA3_AVX512
// One step of the bf16 dot product: `step` values of w and x, loaded whole (`mask` only for a row's tail:
// masked loads cost more on some cores), multiplied and added into fp32 lanes.
#ifdef __AVX512BF16__
constexpr int64_t kBf16Step = 32;  // one 64-byte line of bf16 per vdpbf16ps
using Bf16Vec = __m512i;
inline Bf16Vec bf16_load(const uint16_t* p) { return _mm512_loadu_si512(p); }
inline Bf16Vec bf16_load_tail(const uint16_t* p, int64_t n) {
  return _mm512_maskz_loadu_epi16(n >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << n) - 1u), p);
}
inline __m512 bf16_fma(__m512 acc, Bf16Vec w, Bf16Vec x) { return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x); }
#else
constexpr int64_t kBf16Step = 16;  // widened to fp32, 16 per fused multiply-add
using Bf16Vec = __m512;
inline __m512 bf16_widen(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }
inline Bf16Vec bf16_load(const uint16_t* p) { return bf16_widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline Bf16Vec bf16_load_tail(const uint16_t* p, int64_t n) {
  return bf16_widen(_mm256_maskz_loadu_epi16(n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u), p));
}
inline __m512 bf16_fma(__m512 acc, Bf16Vec w, Bf16Vec x) { return _mm512_fmadd_ps(w, x, acc); }
#endif

template <int M>
inline void bf16_row(const uint16_t* w, const uint16_t* x, int64_t K, float* out) {
  constexpr int kUnroll = unroll_for<M>();
  __m512 acc[kUnroll][M];
  zero_accumulators(acc);
  int64_t k = 0;
  for (; k + kUnroll * kBf16Step <= K; k += kUnroll * kBf16Step)
    for (int u = 0; u < kUnroll; ++u) {
      const Bf16Vec wv = bf16_load(w + k + u * kBf16Step);  // read once, used for every row of x
      for (int m = 0; m < M; ++m) acc[u][m] = bf16_fma(acc[u][m], wv, bf16_load(x + m * K + k + u * kBf16Step));
    }
  for (; k < K; k += kBf16Step) {
    const int64_t n = std::min(kBf16Step, K - k);
    const Bf16Vec wv = bf16_load_tail(w + k, n);
    for (int m = 0; m < M; ++m) acc[0][m] = bf16_fma(acc[0][m], wv, bf16_load_tail(x + m * K + k, n));
  }
  sum_accumulators(acc, out);
}

// Several rows of x (a short prompt, a batch of decode steps) against NR weight rows at once: every vector
// of x loaded meets NR weight rows, where bf16_row meets one. Rows of x past what L1 holds (8 rows of 4096
// values are 64 KiB) then come from L2 once per NR weight rows, and the dot products are no longer bound by
// those loads (measured on Zen 5, 2 threads, an 8B layer's matrices: 4 rows 22 -> 15 ms, 8 rows 34 -> 24).
// One accumulator per (weight row, x row): NR · M <= 16 of the 32 registers, enough chains in flight.
template <int M>
constexpr int tile_rows() { return M <= 4 ? 4 : 2; }

template <int M, int NR>
inline void bf16_tile(const uint16_t* const* w, const uint16_t* x, int64_t K, float (*out)[kMaxRows]) {
  constexpr int64_t kAhead = 256;  // values: NR interleaved streams defeat the hardware prefetcher, so ask
  __m512 acc[NR][M];               // for each row's line 512 bytes ahead (8 rows: 25 -> 21 ms above)
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + kBf16Step <= K; k += kBf16Step) {
    Bf16Vec wv[NR];
    for (int r = 0; r < NR; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w[r] + k + kAhead), _MM_HINT_T0);
      wv[r] = bf16_load(w[r] + k);
    }
    for (int m = 0; m < M; ++m) {
      const Bf16Vec xv = bf16_load(x + m * K + k);
      for (int r = 0; r < NR; ++r) acc[r][m] = bf16_fma(acc[r][m], wv[r], xv);
    }
  }
  if (k < K) {
    const int64_t n = K - k;
    Bf16Vec wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = bf16_load_tail(w[r] + k, n);
    for (int m = 0; m < M; ++m) {
      const Bf16Vec xv = bf16_load_tail(x + m * K + k, n);
      for (int r = 0; r < NR; ++r) acc[r][m] = bf16_fma(acc[r][m], wv[r], xv);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < M; ++m) out[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}
#define LLAMA3_BF16_TILES 1
#elif defined(LLAMA3_AVX2)
// 16 bf16 values per 32-byte load, taken as the even and the odd halves of its 32-bit pairs (a shift and a
// mask make each half fp32, no shuffles); w and x are split alike, so the products pair up.
inline __m256 bf16_even(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline __m256 bf16_odd(__m256i v) {
  return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

template <int M>
inline void bf16_row(const uint16_t* w, const uint16_t* x, int64_t K, float* out) {
  constexpr int kUnroll = unroll_for<M>();
  constexpr int kSteps = kUnroll > 1 ? kUnroll / 2 : 1;  // loads of 16 per iteration: two accumulators each
  __m256 acc[kUnroll][M];
  zero_accumulators(acc);
  int64_t k = 0;
  for (; k + kSteps * 16 <= K; k += kSteps * 16)
    for (int s = 0; s < kSteps; ++s) {
      const __m256i wv = load256(w + k + 16 * s);  // read once, used for every row of x
      const __m256 even = bf16_even(wv), odd = bf16_odd(wv);
      for (int m = 0; m < M; ++m) {
        const __m256i xv = load256(x + m * K + k + 16 * s);
        acc[(2 * s) % kUnroll][m] = _mm256_fmadd_ps(even, bf16_even(xv), acc[(2 * s) % kUnroll][m]);
        acc[(2 * s + 1) % kUnroll][m] = _mm256_fmadd_ps(odd, bf16_odd(xv), acc[(2 * s + 1) % kUnroll][m]);
      }
    }
  sum_accumulators(acc, out);
  for (; k < K; ++k)  // a tail of fewer than 16 * kSteps values
    for (int m = 0; m < M; ++m) out[m] += bf16_to_float(w[k]) * bf16_to_float(x[m * K + k]);
}
#else
template <int M>
inline void bf16_row(const uint16_t* w, const uint16_t* x, int64_t K, float* out) {
  for (int m = 0; m < M; ++m) {
    float s = 0.f;
    for (int64_t k = 0; k < K; ++k) s += bf16_to_float(w[k]) * bf16_to_float(x[m * K + k]);
    out[m] = s;
  }
}
#endif

// ---------------------------------------------------------------------------------------------------------
// fp32 weights, fp32 activations: out[m] = Σ_k w[k] · x[m, k]
// ---------------------------------------------------------------------------------------------------------

// How a float-valued weight line is read into fp32 vectors: fp32 as is, f16 through F16C (vcvtph2ps, exact:
// every f16 value is an fp32 value). One row kernel below serves both.
struct F32Weights {
  using T = float;
#ifdef LLAMA3_AVX512
  static __m512 load16(const T* p) { return _mm512_loadu_ps(p); }
  static __m512 load16(__mmask16 mask, const T* p) { return _mm512_maskz_loadu_ps(mask, p); }
#elif defined(LLAMA3_AVX2)
  static __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
#endif
  static float at(const T* p) { return *p; }
};

// out[m] = Σ_k w[k] · x[m, k] for a weight line read by `Weights` and M rows of fp32 x: each weight vector is
// read once and used for every row of x
template <int M, class Weights>
inline void float_row(const typename Weights::T* w, const float* x, int64_t K, float* out) {
#ifdef LLAMA3_AVX512
  constexpr int kUnroll = unroll_for<M>();
  __m512 acc[kUnroll][M];
  zero_accumulators(acc);
  int64_t k = 0;
  for (; k + kUnroll * 16 <= K; k += kUnroll * 16)
    for (int u = 0; u < kUnroll; ++u) {
      const __m512 wv = Weights::load16(w + k + u * 16);
      for (int m = 0; m < M; ++m) acc[u][m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k + u * 16), acc[u][m]);
    }
  for (; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1u);
    const __m512 wv = Weights::load16(mask, w + k);
    for (int m = 0; m < M; ++m) acc[0][m] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + m * K + k), acc[0][m]);
  }
  sum_accumulators(acc, out);
#elif defined(LLAMA3_AVX2)
  constexpr int kUnroll = unroll_for<M>();
  __m256 acc[kUnroll][M];
  zero_accumulators(acc);
  int64_t k = 0;
  for (; k + kUnroll * 8 <= K; k += kUnroll * 8)
    for (int u = 0; u < kUnroll; ++u) {
      const __m256 wv = Weights::load8(w + k + u * 8);
      for (int m = 0; m < M; ++m) acc[u][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + u * 8), acc[u][m]);
    }
  sum_accumulators(acc, out);
  for (; k < K; ++k)  // a tail of fewer than 8 * kUnroll values
    for (int m = 0; m < M; ++m) out[m] += Weights::at(w + k) * x[m * K + k];
#else
  for (int m = 0; m < M; ++m) {
    float s = 0.f;
    for (int64_t k = 0; k < K; ++k) s += Weights::at(w + k) * x[m * K + k];
    out[m] = s;
  }
#endif
}

template <int M>
inline void f32_row(const float* w, const float* x, int64_t K, float* out) {
  float_row<M, F32Weights>(w, x, K, out);
}

// ---------------------------------------------------------------------------------------------------------
// int8 weights (one scale per output row) against activations quantized to int8 in blocks of 32
// ---------------------------------------------------------------------------------------------------------
//
// Like llama.cpp's q8_0 products, each row of x is quantized per block of 32 values (absmax / 127, a
// relative error of the order of bf16 rounding), so the inner loop is the VNNI byte dot product: 64
// weights per instruction, int32 partial sums per 4 bytes, converted to fp32 and scaled per block.
// vpdpbusd multiplies unsigned by signed bytes, so the weights are read as w + 128 (a XOR of the sign
// bit); each int32 lane starts from -128 · (the sum of its 4 activation bytes) instead of zero, which takes
// the offset back out exactly, in integers, before anything is rounded.

constexpr int64_t kQBlock = 32;  // activation values per scale
constexpr int64_t kChunk = 64;   // bytes per VNNI step: two blocks

struct QuantizedRows {
  int64_t padded_k = 0;           // K rounded up to kChunk; padding holds zeros
  std::vector<int8_t> q;          // (M, padded_k)
  std::vector<float> lane_scale;     // (M, padded_k / 4): the scale of the block each int32 lane belongs to
  std::vector<int32_t> lane_start;  // (M, padded_k / 4): -128 · the sum of the lane's 4 values of q
  std::vector<float> block_scale;   // (M, padded_k / 32): the scale of each block
};

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K) {
  QuantizedRows out;
  out.padded_k = (K + kChunk - 1) / kChunk * kChunk;
  out.q.assign(M * out.padded_k, 0);
  out.lane_scale.assign(M * out.padded_k / 4, 0.f);
  out.lane_start.assign(M * out.padded_k / 4, 0);
  out.block_scale.assign(M * out.padded_k / kQBlock, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    int8_t* qr = out.q.data() + m * out.padded_k;
    float* lr = out.lane_scale.data() + m * out.padded_k / 4;
    int32_t* starts = out.lane_start.data() + m * out.padded_k / 4;
    for (int64_t b0 = 0; b0 < K; b0 += kQBlock) {
      const int64_t b1 = std::min(K, b0 + kQBlock);
      float amax = 0.f;
      for (int64_t k = b0; k < b1; ++k) amax = std::max(amax, std::fabs(xr[k]));
      const float scale = amax / 127.f;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int64_t k = b0; k < b1; ++k) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(xr[k] * inv));
        qr[k] = static_cast<int8_t>(v);
        starts[k / 4] -= 128 * v;
      }
      for (int64_t lane = b0 / 4; lane < b0 / 4 + kQBlock / 4; ++lane) lr[lane] = scale;
      out.block_scale[m * out.padded_k / kQBlock + b0 / kQBlock] = scale;
    }
  }
  return out;
}

#if defined(LLAMA3_AVX512) && defined(__AVX512VNNI__)
template <int M>
inline void int8_row(const int8_t* w, int64_t K, const QuantizedRows& qx, int64_t m0, float* out) {
  const int64_t Kp = qx.padded_k;
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  constexpr int kUnroll = unroll_for<M>();
  __m512 acc[kUnroll][M];
  zero_accumulators(acc);
  auto step = [&](int u, int64_t k0, __m512i w_bytes) {
    const __m512i wv = _mm512_xor_si512(w_bytes, sign);
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_loadu_si512(qx.q.data() + (m0 + m) * Kp + k0);
      const __m512 sv = _mm512_loadu_ps(qx.lane_scale.data() + (m0 + m) * Kp / 4 + k0 / 4);
      const __m512i start = _mm512_loadu_si512(qx.lane_start.data() + (m0 + m) * Kp / 4 + k0 / 4);
      const __m512i dot = _mm512_dpbusd_epi32(start, wv, xv);  // exactly Σ w · q per lane
      acc[u][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sv, acc[u][m]);
    }
  };
  int64_t k = 0;
  for (; k + kUnroll * kChunk <= K; k += kUnroll * kChunk)
    for (int u = 0; u < kUnroll; ++u) step(u, k + u * kChunk, _mm512_loadu_si512(w + k + u * kChunk));
  // the tail: masked-off weight bytes read as 0 ^ 0x80 = 128, against the zero padding of x: no contribution
  for (; k < K; k += kChunk)
    step(0, k, _mm512_maskz_loadu_epi8(K - k >= kChunk ? ~__mmask64(0) : ((__mmask64(1) << (K - k)) - 1), w + k));
  sum_accumulators(acc, out);
}
#elif defined(LLAMA3_AVX2)
// Unsigned-by-signed byte products summed in fours per int32 lane. maddubs adds pairs of products in int16
// with saturation: exact here because one side is at most 128 and the other at most 127 in magnitude.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#ifdef __AVXVNNI__
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// One activation block (32 values) per 256-bit step, with one scale per step. The byte products need one
// unsigned side: |w| against x carrying w's sign (x never reaches -128, so the sign change cannot overflow).
template <int M>
inline void int8_row(const int8_t* w, int64_t K, const QuantizedRows& qx, int64_t m0, float* out) {
  const int64_t Kp = qx.padded_k;
  constexpr int kUnroll = unroll_for<M>();
  __m256 acc[kUnroll][M];
  zero_accumulators(acc);
  auto block = [&](int u, int64_t k0, __m256i wv) {
    const __m256i magnitude = _mm256_abs_epi8(wv);  // |-128| is 0x80: 128 read unsigned
    for (int m = 0; m < M; ++m) {
      const __m256i xv = load256(qx.q.data() + (m0 + m) * Kp + k0);
      const __m256i dot = dot_u8s8(magnitude, _mm256_sign_epi8(xv, wv));  // exactly Σ w · q per lane
      const __m256 scale = _mm256_broadcast_ss(qx.block_scale.data() + (m0 + m) * Kp / kQBlock + k0 / kQBlock);
      acc[u][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[u][m]);
    }
  };
  int64_t k = 0;
  for (; k + kUnroll * kQBlock <= K; k += kUnroll * kQBlock)
    for (int u = 0; u < kUnroll; ++u) block(u, k + u * kQBlock, load256(w + k + u * kQBlock));
  for (; k + kQBlock <= K; k += kQBlock) block(0, k, load256(w + k));
  if (k < K) {  // a last partial block: w's remaining bytes then zeros, against the zero padding of x
    alignas(32) int8_t last[kQBlock] = {};
    std::memcpy(last, w + k, static_cast<size_t>(K - k));
    block(0, k, load256(last));
  }
  sum_accumulators(acc, out);
}
#else
// Portable form of the quantized products: per block of 32, Σ weight(k) · q[k] in integers, times the block's
// activation scale and the weight's block scale.
template <int M, typename WeightAt, typename BlockScale>
inline void quantized_row_portable(WeightAt weight_at, BlockScale block_scale, int64_t K, const QuantizedRows& qx,
                                   int64_t m0, float* out) {
  const int64_t Kp = qx.padded_k;
  for (int m = 0; m < M; ++m) {
    const int8_t* q = qx.q.data() + (m0 + m) * Kp;
    const float* ls = qx.lane_scale.data() + (m0 + m) * Kp / 4;
    float s = 0.f;
    for (int64_t b0 = 0; b0 < K; b0 += kQBlock) {
      int32_t dot = 0;
      for (int64_t k = b0; k < std::min(K, b0 + kQBlock); ++k) dot += weight_at(k) * int32_t(q[k]);
      s += dot * ls[b0 / 4] * block_scale(b0);
    }
    out[m] = s;  // no offset here, so lane_start is not needed
  }
}

template <int M>
inline void int8_row(const int8_t* w, int64_t K, const QuantizedRows& qx, int64_t m0, float* out) {
  quantized_row_portable<M>([w](int64_t k) { return int32_t(w[k]); }, [](int64_t) { return 1.f; }, K, qx, m0, out);
}
#endif

// ---------------------------------------------------------------------------------------------------------
// int4 weights (asymmetric groups: w = low + code · scale, code in 0..15, fp16 scale and low per group of
// input channels) against activations quantized to int8 in blocks of 32, as for int8
// ---------------------------------------------------------------------------------------------------------
//
// Codes are packed two per byte in chunks of 128 values: byte j (0..63) of a chunk holds value j in its low
// nibble and value 64 + j in its high nibble, so one 64-byte load, a mask and a shift give two vectors of
// 64 codes in order, each ready for one vpdpbusd (codes are unsigned bytes, activations signed: no offset
// needed). A last 64 values (K = 128·c + 64) are packed the same way in 32 bytes (value j and 32 + j). Per
// int32 lane: dot · (activation block scale · weight group scale), the two scales multiplied for the two
// blocks of 64 values in a 128-bit register and spread over the lanes; the lows contribute
// Σ_groups low · (the exact sum of x over the group), computed once per row of x and group.

struct Int4Sums {
  std::vector<float> group_sum;  // (M, G): Σ x over each group, from the unrounded activations
};

Int4Sums group_sums(const float* x, int64_t M, int64_t K, int64_t group) {
  Int4Sums out;
  const int64_t G = K / group;
  out.group_sum.assign(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      double s = 0.0;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += x[m * K + k];
      out.group_sum[m * G + g] = static_cast<float>(s);
    }
  return out;
}

inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

// Σ_g low[g] · group_sum[g]
inline float low_term(const uint16_t* lows, const float* sums, int64_t G) {
  float s = 0.f;
  int64_t g = 0;
#ifdef LLAMA3_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; g + 16 <= G; g += 16)
    acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lows + g))),
                          _mm512_loadu_ps(sums + g), acc);
  s = _mm512_reduce_add_ps(acc);
#elif defined(LLAMA3_AVX2)
  __m256 acc = _mm256_setzero_ps();
  for (; g + 8 <= G; g += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lows + g))),
                          _mm256_loadu_ps(sums + g), acc);
  s = horizontal_sum(acc);
#endif
  for (; g < G; ++g) s += half_to_float(lows[g]) * sums[g];
  return s;
}

#if defined(LLAMA3_AVX512) && defined(__AVX512VNNI__)
template <int M>
inline void int4_row(const uint8_t* w, const uint16_t* scales, const uint16_t* lows, int64_t K, int64_t group,
                     const QuantizedRows& qx, const Int4Sums& sums, int64_t m0, float* out) {
  const int64_t Kp = qx.padded_k, G = K / group;
  // lanes 0-7 belong to the first 32 values of a 64, lanes 8-15 to the next 32
  const __m512i pair_index = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  constexpr int kUnroll = unroll_for<M>();
  __m512 acc[kUnroll][M];
  zero_accumulators(acc);
  // 64 codes at value k0 into accumulator set u
  auto step = [&](int u, int64_t k0, __m512i codes) {
    __m128 weight_scales;  // the group scales of the two blocks of 32
    if (group == 32) {
      uint32_t two;
      std::memcpy(&two, scales + k0 / 32, sizeof(two));
      weight_scales = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(two)));
    } else {
      weight_scales = _mm_set1_ps(half_to_float(scales[k0 / group]));
    }
    for (int m = 0; m < M; ++m) {
      const __m128 x_scales = _mm_castpd_ps(
          _mm_load_sd(reinterpret_cast<const double*>(qx.block_scale.data() + (m0 + m) * Kp / kQBlock + k0 / kQBlock)));
      const __m512 lane_scales =
          _mm512_permutexvar_ps(pair_index, _mm512_castps128_ps512(_mm_mul_ps(weight_scales, x_scales)));
      const __m512i xv = _mm512_loadu_si512(qx.q.data() + (m0 + m) * Kp + k0);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xv);
      acc[u][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), lane_scales, acc[u][m]);
    }
  };
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  int64_t k = 0;
  for (int s = 0; k + 2 * kChunk <= K; k += 2 * kChunk, s += 2) {
    const __m512i packed = _mm512_loadu_si512(w + k / 2);
    step(s % kUnroll, k, _mm512_and_si512(packed, nibble));
    step((s + 1) % kUnroll, k + kChunk, _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble));
  }
  if (k < K) {  // the last 64 values
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k / 2));
    const __m256i lo = _mm256_and_si256(packed, _mm256_set1_epi8(0x0F));
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), _mm256_set1_epi8(0x0F));
    step(0, k, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
  }
  sum_accumulators(acc, out);
  for (int m = 0; m < M; ++m) out[m] += low_term(lows, sums.group_sum.data() + (m0 + m) * G, G);
}
#elif defined(LLAMA3_AVX2)
// One activation block (32 codes) per 256-bit step: a 32-byte load holds the low nibbles of one block and
// the high nibbles of the block 64 values later. Codes (0..15) against int8 activations: exact byte products.
template <int M>
inline void int4_row(const uint8_t* w, const uint16_t* scales, const uint16_t* lows, int64_t K, int64_t group,
                     const QuantizedRows& qx, const Int4Sums& sums, int64_t m0, float* out) {
  const int64_t Kp = qx.padded_k, G = K / group;
  constexpr int kUnroll = unroll_for<M>();
  __m256 acc[kUnroll][M];
  zero_accumulators(acc);
  auto block = [&](int u, int64_t k0, __m256i codes) {
    const float weight_scale = _cvtsh_ss(scales[k0 / group]);
    for (int m = 0; m < M; ++m) {
      const __m256i xv = load256(qx.q.data() + (m0 + m) * Kp + k0);
      const __m256 scale = _mm256_set1_ps(weight_scale * qx.block_scale[(m0 + m) * Kp / kQBlock + k0 / kQBlock]);
      acc[u][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(codes, xv)), scale, acc[u][m]);
    }
  };
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  int64_t k = 0;
  for (; k + 2 * kChunk <= K; k += 2 * kChunk) {  // 128 values in 64 bytes: byte j holds values j and 64 + j
    const __m256i first = load256(w + k / 2), second = load256(w + k / 2 + 32);
    block(0, k, _mm256_and_si256(first, nibble));
    block(1 % kUnroll, k + 32, _mm256_and_si256(second, nibble));
    block(2 % kUnroll, k + 64, _mm256_and_si256(_mm256_srli_epi16(first, 4), nibble));
    block(3 % kUnroll, k + 96, _mm256_and_si256(_mm256_srli_epi16(second, 4), nibble));
  }
  if (k < K) {  // the last 64 values in 32 bytes: byte j holds values j and 32 + j
    const __m256i packed = load256(w + k / 2);
    block(0, k, _mm256_and_si256(packed, nibble));
    block(1 % kUnroll, k + 32, _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble));
  }
  sum_accumulators(acc, out);
  for (int m = 0; m < M; ++m) out[m] += low_term(lows, sums.group_sum.data() + (m0 + m) * G, G);
}
#else
template <int M>
inline void int4_row(const uint8_t* w, const uint16_t* scales, const uint16_t* lows, int64_t K, int64_t group,
                     const QuantizedRows& qx, const Int4Sums& sums, int64_t m0, float* out) {
  const int64_t full = K / (2 * kChunk) * (2 * kChunk);  // values in whole chunks of 128
  auto code_at = [w, full](int64_t k) {
    const int64_t span = k < full ? 2 * kChunk : kChunk;  // 128, or the last 64
    const int64_t base = k < full ? k / span * span : full, r = k - base;
    const uint8_t byte = w[base / 2 + r % (span / 2)];
    return int32_t(r < span / 2 ? (byte & 0x0F) : (byte >> 4));
  };
  quantized_row_portable<M>(code_at, [=](int64_t k) { return half_to_float(scales[k / group]); }, K, qx, m0, out);
  const int64_t G = K / group;
  for (int m = 0; m < M; ++m) out[m] += low_term(lows, sums.group_sum.data() + (m0 + m) * G, G);
}
#endif

// ---------------------------------------------------------------------------------------------------------
// f16 weights (a GGUF f16 file's tensors, read where they lie), fp32 activations: out[m] = Σ_k w[k] · x[m, k]
// ---------------------------------------------------------------------------------------------------------
//
// The weights widen with the F16C conversion (vcvtph2ps, exact: every f16 value is an fp32 value); x is
// widened to fp32 once per call by the operator, since it is read once per weight line and stays in L1.

struct F16Weights {
  using T = uint16_t;
#ifdef LLAMA3_AVX512
  static __m512 load16(const T* p) { return _mm512_cvtph_ps(load256(p)); }
  static __m512 load16(__mmask16 mask, const T* p) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p)); }
#elif defined(LLAMA3_AVX2)
  static __m256 load8(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif
  static float at(const T* p) { return half_to_float(*p); }
};

template <int M>
inline void f16_row(const uint16_t* w, const float* x, int64_t K, float* out) {
  float_row<M, F16Weights>(w, x, K, out);
}

// ---------------------------------------------------------------------------------------------------------
// Driver: W's rows split over the thread pool, each thread streaming a contiguous range; x in passes of at
// most kMaxRows rows over each range, with the row count a template parameter so the accumulators stay in
// registers.
// ---------------------------------------------------------------------------------------------------------

// W's rows are dealt out in chunks of consecutive rows (a multiple of `row_multiple`), each thread taking
// the next chunk when it finishes one (an atomic counter): on a shared machine one core is often slower than
// the other for a while, and a fixed half-and-half split would make the fast core wait. A chunk meets every
// pass while it is still in the core's cache, so a short prompt (M up to a few dozen rows) streams the
// weights from memory once, not once per pass. For each chunk [n0, end),
// pass.template operator()<R>(n0, end, m0) for every pass m0 = 0, 8, ... of R = min(8, M - m0) rows of x.
template <typename PassFn>
void for_chunk_passes(int64_t N, int64_t M, int64_t row_bytes, int64_t row_multiple, PassFn pass) {
  const int64_t threads = at::get_num_threads();
  // several passes: chunks that stay in L2 between them
  const int64_t max_chunk = M > kMaxRows ? kMultiPassChunkBytes : kMaxChunkBytes;
  const int64_t chunk_bytes = std::clamp(N * row_bytes / (threads * kChunksPerThread), kMinChunkBytes, max_chunk);
  const int64_t chunk_rows =
      std::max<int64_t>(row_multiple, chunk_bytes / std::max<int64_t>(row_bytes, 1) / row_multiple * row_multiple);
  const int64_t chunks = (N + chunk_rows - 1) / chunk_rows;
  const int64_t workers = std::min<int64_t>(threads, chunks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      const int64_t n0 = c * chunk_rows, end = std::min(N, n0 + chunk_rows);
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        switch (std::min(kMaxRows, M - m0)) {
          case 1: pass.template operator()<1>(n0, end, m0); break;
          case 2: pass.template operator()<2>(n0, end, m0); break;
          case 3: pass.template operator()<3>(n0, end, m0); break;
          case 4: pass.template operator()<4>(n0, end, m0); break;
          case 5: pass.template operator()<5>(n0, end, m0); break;
          case 6: pass.template operator()<6>(n0, end, m0); break;
          case 7: pass.template operator()<7>(n0, end, m0); break;
          default: pass.template operator()<8>(n0, end, m0); break;
        }
      }
    }
  });
}

// Calls row_fn.template operator()<R>(n, m0, out) for every row n of W and every pass m0 over x.
template <typename RowFn>
void for_rows(int64_t N, int64_t M, int64_t row_bytes, RowFn row_fn) {
  for_chunk_passes(N, M, row_bytes, 1, [&]<int R>(int64_t n0, int64_t end, int64_t m0) {
    float out[kMaxRows];
    for (int64_t n = n0; n < end; ++n) row_fn.template operator()<R>(n, m0, out);
  });
}

#ifdef LLAMA3_BF16_TILES
// for_rows for the bf16 tiles: calls dot_fn.template operator()<R, NR>(n, m0, out), out[r][m] the dot
// product of W's row n + r with x's row m0 + m, for tiles of NR = tile_rows<R>() consecutive rows of W
// (fewer at a chunk's end) and passes of R <= 8 rows of x, then store_fn(n, m, value) for each of them.
// Chunks as in for_rows, a multiple of 4 rows.
template <typename DotFn, typename StoreFn>
void for_row_tiles(int64_t N, int64_t M, int64_t row_bytes, DotFn dot_fn, StoreFn store_fn) {
  for_chunk_passes(N, M, row_bytes, 4, [&]<int R>(int64_t n0, int64_t end, int64_t m0) {
    constexpr int kRows = tile_rows<R>();
    float out[4][kMaxRows];
    auto tile = [&]<int NR>(int64_t n) {
      dot_fn.template operator()<R, NR>(n, m0, out);
      for (int r = 0; r < NR; ++r)
        for (int m = 0; m < R; ++m) store_fn(n + r, m0 + m, out[r][m]);
    };
    int64_t n = n0;
    for (; n + kRows <= end; n += kRows) tile.template operator()<kRows>(n);
    switch (end - n) {
      case 1: tile.template operator()<1>(n); break;
      case 2: if constexpr (kRows > 2) tile.template operator()<2>(n); break;
      case 3: if constexpr (kRows > 3) tile.template operator()<3>(n); break;
      default: break;
    }
  });
}
#endif

void check_inputs(const at::Tensor& x, const at::Tensor& w, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, op, ": expected x (M, K) and w (N, K), got x ", x.sizes(), " and w ",
              w.sizes());
  TORCH_CHECK(x.size(1) == w.size(1), op, ": x has ", x.size(1), " columns but w has ", w.size(1));
  TORCH_CHECK(w.is_contiguous(), op, ": w must be contiguous");
}

// y = x · Wᵀ with x, w and y of one floating type T (read by the row kernel as Raw).
template <typename T, typename Raw, typename RowKernel>
at::Tensor gemv_same_type(const at::Tensor& x_in, const at::Tensor& w, const char* op, at::ScalarType dtype,
                          const char* dtype_name, RowKernel row) {
  check_inputs(x_in, w, op);
  TORCH_CHECK(x_in.scalar_type() == dtype && w.scalar_type() == dtype, op, ": x and w must be ", dtype_name);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const auto* wp = reinterpret_cast<const Raw*>(w.const_data_ptr());
  T* yp = y.mutable_data_ptr<T>();
  const auto* xp = reinterpret_cast<const Raw*>(x.const_data_ptr());
  for_rows(N, M, K * static_cast<int64_t>(sizeof(Raw)), [&]<int R>(int64_t n, int64_t m0, float* out) {
    row.template operator()<R>(wp + n * K, xp + m0 * K, K, out);
    for (int m = 0; m < R; ++m) yp[(m0 + m) * N + n] = T(out[m]);
  });
  return y;
}

at::Tensor gemv_group(const at::Tensor& x_in, at::TensorList ws);

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w) {
#ifdef LLAMA3_BF16_TILES
  if (x.dim() == 2 && x.size(0) > 1) {  // several rows: gemv_group's tiles (one row streams W row by row)
    check_inputs(x, w, "llama3::gemv_bf16");
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
                "llama3::gemv_bf16: x and w must be bfloat16");
    return gemv_group(x, {w});
  }
#endif
  return gemv_same_type<c10::BFloat16, uint16_t>(
      x, w, "llama3::gemv_bf16", at::kBFloat16, "bfloat16",
      []<int R>(const uint16_t* wr, const uint16_t* xr, int64_t K, float* out) { bf16_row<R>(wr, xr, K, out); });
}

at::Tensor gemv_f32(const at::Tensor& x, const at::Tensor& w) {
  return gemv_same_type<float, float>(
      x, w, "llama3::gemv_f32", at::kFloat, "float32",
      []<int R>(const float* wr, const float* xr, int64_t K, float* out) { f32_row<R>(wr, xr, K, out); });
}

// The quantized operators return x's dtype: exactly one of y32 / y16 is set.
inline void store_output(float* y32, c10::BFloat16* y16, int64_t index, float v) {
  if (y32 != nullptr) {
    y32[index] = v;
  } else {
    y16[index] = c10::BFloat16(v);
  }
}

// [x · W_0ᵀ | x · W_1ᵀ | ...] for 16-bit weights of one type and width: a layer's q/k/v or gate/up
// projections as they lie in the checkpoint (views of its memory map), in one pass of the thread pool, so
// they need not be concatenated into a copy. bf16 weights take bf16 x (the bf16 row kernel); f16 weights
// take bf16 or fp32 x, widened to fp32 once here. Returns x's dtype, (M, ΣN).
at::Tensor gemv_group(const at::Tensor& x_in, at::TensorList ws) {
  const char* op = "llama3::gemv_group";
  TORCH_CHECK(!ws.empty(), op, ": needs at least one weight");
  const auto wtype = ws[0].scalar_type();
  TORCH_CHECK(wtype == at::kBFloat16 || wtype == at::kHalf, op, ": weights must be bfloat16 or float16, got ",
              wtype);
  for (const at::Tensor& w : ws) {
    check_inputs(x_in, w, op);
    TORCH_CHECK(w.scalar_type() == wtype, op, ": all weights must have one dtype, got ", wtype, " and ",
                w.scalar_type());
  }
  const auto out_dtype = x_in.scalar_type();
  const bool bf16 = wtype == at::kBFloat16;
  TORCH_CHECK(bf16 ? out_dtype == at::kBFloat16 : (out_dtype == at::kBFloat16 || out_dtype == at::kFloat), op,
              bf16 ? ": bfloat16 weights need bfloat16 x" : ": float16 weights need bfloat16 or float32 x");
  const at::Tensor x = (bf16 ? x_in : x_in.to(at::kFloat)).contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<int64_t> starts{0};  // the first output of each weight, then the total
  std::vector<const uint16_t*> rows;
  for (const at::Tensor& w : ws) {
    starts.push_back(starts.back() + w.size(0));
    rows.push_back(reinterpret_cast<const uint16_t*>(w.const_data_ptr()));
  }
  const int64_t N = starts.back();
  at::Tensor y = at::empty({M, N}, x_in.options());
  float* y32 = out_dtype == at::kFloat ? y.mutable_data_ptr<float>() : nullptr;
  c10::BFloat16* y16 = out_dtype == at::kBFloat16 ? y.mutable_data_ptr<c10::BFloat16>() : nullptr;
#ifdef LLAMA3_BF16_TILES
  if (bf16 && M > 1) {
    const auto* xp = reinterpret_cast<const uint16_t*>(x.const_data_ptr());
    for_row_tiles(
        N, M, K * 2,
        [&]<int R, int NR>(int64_t n, int64_t m0, float (*out)[kMaxRows]) {
          const uint16_t* tile[NR];
          size_t part = 0;
          for (int r = 0; r < NR; ++r) {  // a tile may span two weights
            while (n + r >= starts[part + 1]) ++part;
            tile[r] = rows[part] + (n + r - starts[part]) * K;
          }
          bf16_tile<R, NR>(tile, xp + m0 * K, K, out);
        },
        [&](int64_t n, int64_t m, float v) { store_output(y32, y16, m * N + n, v); });
    return y;
  }
#endif
  for_rows(N, M, K * 2, [&]<int R>(int64_t n, int64_t m0, float* out) {
    size_t part = 0;
    while (n >= starts[part + 1]) ++part;  // a handful of weights: a scan beats a search
    const uint16_t* wr = rows[part] + (n - starts[part]) * K;
    if (bf16) {
      bf16_row<R>(wr, reinterpret_cast<const uint16_t*>(x.const_data_ptr()) + m0 * K, K, out);
    } else {
      f16_row<R>(wr, x.const_data_ptr<float>() + m0 * K, K, out);
    }
    for (int m = 0; m < R; ++m) store_output(y32, y16, (m0 + m) * N + n, out[m]);
  });
  return y;
}

at::Tensor gemv_int8(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scales) {
  check_inputs(x_in, w, "llama3::gemv_int8");
  TORCH_CHECK(w.scalar_type() == at::kChar, "llama3::gemv_int8: w must be int8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.size(0) == w.size(0) &&
                  scales.is_contiguous(),
              "llama3::gemv_int8: scales must be a contiguous float32 vector of w.size(0)");
  const auto out_dtype = x_in.scalar_type();
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16, "llama3::gemv_int8: x must be float32 or bfloat16");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x_in.options());
  const auto* wp = w.const_data_ptr<int8_t>();
  const auto* sp = scales.const_data_ptr<float>();
  float* y32 = out_dtype == at::kFloat ? y.mutable_data_ptr<float>() : nullptr;
  c10::BFloat16* y16 = out_dtype == at::kBFloat16 ? y.mutable_data_ptr<c10::BFloat16>() : nullptr;
  const QuantizedRows qx = quantize_rows(x.const_data_ptr<float>(), M, K);
  for_rows(N, M, K, [&]<int R>(int64_t n, int64_t m0, float* out) {
    int8_row<R>(wp + n * K, K, qx, m0, out);
    for (int m = 0; m < R; ++m) store_output(y32, y16, (m0 + m) * N + n, out[m] * sp[n]);
  });
  return y;
}

at::Tensor gemv_int4(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& lows,
                     int64_t group) {
  const char* op = "llama3::gemv_int4";
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kByte, op,
              ": expected x (M, K) and packed codes w, contiguous uint8 (N, K / 2)");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) * 2 == K, op, ": x has ", K, " columns but w packs ", w.size(1) * 2);
  TORCH_CHECK(K % kChunk == 0 && group % kQBlock == 0 && group > 0 && K % group == 0, op,
              ": needs K (", K, ") a multiple of 64 and a group size (", group, ") that is a multiple of 32 dividing K");
  const int64_t G = K / group;
  for (const at::Tensor* t : {&scales, &lows})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->dim() == 2 && t->size(0) == N &&
                    t->size(1) == G,
                op, ": scales and lows must be contiguous float16 (N, K / group) = (", N, ", ", G, ")");
  const auto out_dtype = x_in.scalar_type();
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16, op, ": x must be float32 or bfloat16");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x_in.options());
  const auto* wp = w.const_data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.const_data_ptr());
  const auto* lp = reinterpret_cast<const uint16_t*>(lows.const_data_ptr());
  float* y32 = out_dtype == at::kFloat ? y.mutable_data_ptr<float>() : nullptr;
  c10::BFloat16* y16 = out_dtype == at::kBFloat16 ? y.mutable_data_ptr<c10::BFloat16>() : nullptr;
  const QuantizedRows qx = quantize_rows(x.const_data_ptr<float>(), M, K);
  const Int4Sums sums = group_sums(x.const_data_ptr<float>(), M, K, group);
  for_rows(N, M, K / 2 + 4 * G, [&]<int R>(int64_t n, int64_t m0, float* out) {
    int4_row<R>(wp + n * (K / 2), sp + n * G, lp + n * G, K, group, qx, sums, m0, out);
    for (int m = 0; m < R; ++m) store_output(y32, y16, (m0 + m) * N + n, out[m]);
  });
  return y;
}

}  // namespace

LLAMA3_LIBRARY_FRAGMENT(m) {
  m.def("gemv_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("gemv_f32(Tensor x, Tensor w) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor w, Tensor scales, Tensor lows, int group_size) -> Tensor");
  m.def("gemv_group(Tensor x, Tensor[] ws) -> Tensor");
}

LLAMA3_LIBRARY_IMPL_CPU(m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemv_f32", &gemv_f32);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int4", &gemv_int4);
  m.impl("gemv_group", &gemv_group);
}
