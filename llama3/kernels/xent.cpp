// Cross-entropy rows for training: per-row loss and, in place, the gradient with respect to the logits.
//
// The training loss (llama3/train/loss.py) computes the output projection a chunk of rows at a time and turns
// each chunk's logits straight into their gradient. With Llama 3's 128K vocabulary that chunk is the largest
// tensor of the step (1024 rows: 256 MB in bf16), and doing the softmax with torch's element-wise operators
// costs one full pass over it per operator (upcast, max, subtract, exp, sum, log, gather, subtract, exp,
// scale, downcast), each through main memory. Here each row (256 KB in bf16, 512 KB in fp32) is read three
// times while it stays in the core's L2 cache (its maximum; its exponentials, summed and kept in an fp32
// scratch row; the gradient, written over the row), so the chunk goes through main memory once in and
// once out, with one exponential per value.
//
//   llama3::xent_rows_(Tensor(a!) logits (N, V) bf16|fp32, targets int64 (N,), weights fp32 (N,),
//                      bool write_grad) -> fp32 (N,)
//     returns nll[i] = logsumexp(logits[i]) - logits[i, targets[i]]
//     and, with write_grad, overwrites logits[i] with (softmax(logits[i]) - one_hot(targets[i])) * weights[i]
//
// Sums of exponentials are kept in fp32 within blocks of 256 values and in double across blocks. Three code
// paths, chosen at compile time from the instruction sets the compiler was told to use: AVX-512 and AVX2 + FMA
// (one templated body over a small vector type), and portable C++.

#include "ops_namespace.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LLAMA3_XENT_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLAMA3_XENT_AVX2 1
#endif
#if defined(LLAMA3_XENT_AVX512) || defined(LLAMA3_XENT_AVX2)
#define LLAMA3_XENT_VECTOR 1
#endif

namespace {

constexpr int64_t kBlock = 256;  // values summed in fp32 before the running sum (double) takes them

inline float load_value(const float* p) { return *p; }
inline float load_value(const c10::BFloat16* p) { return static_cast<float>(*p); }
inline void store_value(float* p, float v) { *p = v; }
inline void store_value(c10::BFloat16* p, float v) { *p = c10::BFloat16(v); }  // round to nearest even

// The vector paths: one body (row_max, row_exp_sum, row_scale below) over the vector type `Vec`, which
// supplies its width and the few operations whose instructions differ between AVX-512 and AVX2.
#ifdef LLAMA3_XENT_VECTOR
#ifdef LLAMA3_XENT_AVX512
struct Vec {
  using F = __m512;
  static constexpr int kWidth = 16;
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load(const c10::BFloat16* p) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store(c10::BFloat16* p, F v) {
    // round to nearest even, as c10::BFloat16 does (the inputs here are finite or the loss is already NaN)
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
  }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F zero() { return _mm512_setzero_ps(); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F round(F v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static float reduce_add(F v) { return _mm512_reduce_add_ps(v); }
  static float reduce_max(F v) { return _mm512_reduce_max_ps(v); }
  // Arguments below this give 0 (scalef reaches fp32's subnormals on its own).
  static constexpr float kLowest = -100.0f;
  // p · 2^n for the clamped arguments x
  static F scale_by_power_of_two(F p, F n, F) { return _mm512_scalef_ps(p, n); }
};
#else  // AVX2
struct Vec {
  using F = __m256;
  static constexpr int kWidth = 8;
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load(const c10::BFloat16* p) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store(c10::BFloat16* p, F v) {
    // round to nearest even, as c10::BFloat16 does (the inputs here are finite or the loss is already NaN)
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded =
        _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    // the eight 16-bit results sit in 32-bit lanes: pack them (values below 65536, so no saturation)
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F zero() { return _mm256_setzero_ps(); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F round(F v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static float reduce_add(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float reduce_max(F v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  // AVX2 has no scalef: 2^n is built from its exponent bits, so arguments are clamped to -87 (n >= -126
  // keeps the exponent normal) and results for arguments below -87 (under e^-87 = 1.6e-38, fp32's smallest
  // normal) are set to 0.
  static constexpr float kLowest = -87.0f;
  static F scale_by_power_of_two(F p, F n, F x_unclamped) {
    const __m256 underflow = _mm256_cmp_ps(x_unclamped, _mm256_set1_ps(kLowest), _CMP_LT_OQ);  // false for NaN
    const __m256i two_to_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(two_to_n)));
  }
};
#endif

using VecF = Vec::F;
constexpr int kW = Vec::kWidth;

// e^x for x <= 0 (the arguments here are logits minus their row's maximum): x = n·ln2 + r with |r| <= ln2/2,
// e^r by a degree-7 polynomial (Taylor coefficients, relative error below 1e-7 on that interval), then
// scaled by 2^n. Arguments below Vec::kLowest give 0; NaN gives NaN, so a NaN logit reaches the loss.
inline VecF exp_vec(VecF x_in) {
  const VecF x = Vec::max(Vec::set1(Vec::kLowest), x_in);  // NaN stays NaN (max returns its second operand then)
  const VecF n = Vec::round(Vec::mul(x, Vec::set1(1.44269504088896341f)));
  // ln2 split in a high part exact in float and a low part, so that r keeps its low bits
  VecF r = Vec::fnmadd(n, Vec::set1(0.693145751953125f), x);
  r = Vec::fnmadd(n, Vec::set1(1.428606765330187e-06f), r);
  VecF p = Vec::set1(1.0f / 5040.0f);
  p = Vec::fmadd(p, r, Vec::set1(1.0f / 720.0f));
  p = Vec::fmadd(p, r, Vec::set1(1.0f / 120.0f));
  p = Vec::fmadd(p, r, Vec::set1(1.0f / 24.0f));
  p = Vec::fmadd(p, r, Vec::set1(1.0f / 6.0f));
  p = Vec::fmadd(p, r, Vec::set1(0.5f));
  p = Vec::fmadd(p, r, Vec::set1(1.0f));
  p = Vec::fmadd(p, r, Vec::set1(1.0f));
  return Vec::scale_by_power_of_two(p, n, x_in);
}

template <typename T>
float row_max(const T* x, int64_t V) {
  VecF m0 = Vec::set1(-std::numeric_limits<float>::infinity()), m1 = m0;
  int64_t k = 0;
  for (; k + 2 * kW <= V; k += 2 * kW) {
    m0 = Vec::max(m0, Vec::load(x + k));
    m1 = Vec::max(m1, Vec::load(x + k + kW));
  }
  float m = Vec::reduce_max(Vec::max(m0, m1));
  for (; k < V; ++k) m = std::max(m, load_value(x + k));
  return m;
}

// e[k] = e^(x[k] - mx); returns the sum of e
template <typename T>
double row_exp_sum(const T* x, float* e, int64_t V, float mx) {
  const VecF vmax = Vec::set1(mx);
  double total = 0.0;
  int64_t k = 0;
  for (; k + kBlock <= V; k += kBlock) {
    VecF s0 = Vec::zero(), s1 = s0;
    for (int64_t j = k; j < k + kBlock; j += 2 * kW) {
      const VecF e0 = exp_vec(Vec::sub(Vec::load(x + j), vmax));
      const VecF e1 = exp_vec(Vec::sub(Vec::load(x + j + kW), vmax));
      Vec::store(e + j, e0);
      Vec::store(e + j + kW, e1);
      s0 = Vec::add(s0, e0);
      s1 = Vec::add(s1, e1);
    }
    total += Vec::reduce_add(Vec::add(s0, s1));
  }
  for (; k < V; ++k) {
    e[k] = std::exp(load_value(x + k) - mx);
    total += e[k];
  }
  return total;
}

// x[k] = e[k] · scale for every k
template <typename T>
void row_scale(T* x, const float* e, int64_t V, float scale) {
  const VecF vs = Vec::set1(scale);
  int64_t k = 0;
  for (; k + kW <= V; k += kW) Vec::store(x + k, Vec::mul(Vec::load(e + k), vs));
  for (; k < V; ++k) store_value(x + k, e[k] * scale);
}
#else  // portable
template <typename T>
float row_max(const T* x, int64_t V) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < V; ++k) m = std::max(m, load_value(x + k));
  return m;
}

template <typename T>
double row_exp_sum(const T* x, float* e, int64_t V, float mx) {
  double total = 0.0;
  for (int64_t k = 0; k < V; k += kBlock) {
    float block = 0.0f;
    const int64_t end = std::min(V, k + kBlock);
    for (int64_t j = k; j < end; ++j) {
      e[j] = std::exp(load_value(x + j) - mx);
      block += e[j];
    }
    total += block;
  }
  return total;
}

template <typename T>
void row_scale(T* x, const float* e, int64_t V, float scale) {
  for (int64_t k = 0; k < V; ++k) store_value(x + k, e[k] * scale);
}
#endif

template <typename T>
void xent_rows_impl(T* logits, const int64_t* targets, const float* weights, float* nll, int64_t N, int64_t V,
                    bool write_grad) {
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(V);  // this row's exponentials, fp32 (512 KB at 128K: stays in L2 with the row)
    float* e = scratch.data();
    for (int64_t i = begin; i < end; ++i) {
      T* x = logits + i * V;
      const int64_t t = targets[i];
      const float mx = row_max(x, V);
      const double sum = row_exp_sum(x, e, V, mx);
      const float picked = load_value(x + t);
      nll[i] = mx + static_cast<float>(std::log(sum)) - picked;
      if (write_grad) {
        const float w = weights[i];
        const float scale = static_cast<float>(w / sum);
        const float target_prob = static_cast<float>(e[t] / sum);
        row_scale(x, e, V, scale);
        store_value(x + t, (target_prob - 1.0f) * w);  // from the unrounded probability
      }
    }
  });
}

at::Tensor xent_rows_(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& weights, bool write_grad) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.is_contiguous(),
              "llama3::xent_rows_: logits must be a contiguous 2-D CPU tensor, got shape ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "llama3::xent_rows_: logits must be float32 or bfloat16, got ", logits.scalar_type());
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "llama3::xent_rows_: logits have no columns");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == N &&
                  targets.is_contiguous(),
              "llama3::xent_rows_: targets must be a contiguous int64 vector of logits.size(0) = ", N);
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.dim() == 1 && weights.size(0) == N &&
                  weights.is_contiguous(),
              "llama3::xent_rows_: weights must be a contiguous float32 vector of logits.size(0) = ", N);
  const auto* tp = targets.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < V, "llama3::xent_rows_: target ", tp[i], " at row ", i,
                " is outside the vocabulary [0, ", V, ")");
  at::Tensor nll = at::empty({N}, logits.options().dtype(at::kFloat));
  if (logits.scalar_type() == at::kFloat) {
    xent_rows_impl(logits.mutable_data_ptr<float>(), tp, weights.const_data_ptr<float>(),
                   nll.mutable_data_ptr<float>(), N, V, write_grad);
  } else {
    xent_rows_impl(logits.mutable_data_ptr<c10::BFloat16>(), tp, weights.const_data_ptr<float>(),
                   nll.mutable_data_ptr<float>(), N, V, write_grad);
  }
  return nll;
}

}  // namespace

LLAMA3_LIBRARY_FRAGMENT(m) {
  m.def("xent_rows_(Tensor(a!) logits, Tensor targets, Tensor weights, bool write_grad) -> Tensor");
}

LLAMA3_LIBRARY_IMPL_CPU(m) { m.impl("xent_rows_", &xent_rows_); }
