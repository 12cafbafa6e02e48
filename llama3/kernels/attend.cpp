// Decode-time attention: one new query per sequence against its KV cache, without temporaries.
//
//   llama3::attend_one_query(q float32 (B, K, R, D), keys (B, K, S, D), values (B, K, S, D),
//                            k_scale (B, K, S, 1) float32 or empty, v_scale likewise, mask bool (B, S),
//                            float scale) -> float32 (B, K, R, D)
//       out[b, j, r] = Σ_s softmax_s(scale · q[b, j, r] · key[b, j, s]) · value[b, j, s] over the positions s
//       where mask[b, s] is true; the R query heads of group j share kv head j (grouped-query attention).
//       keys and values are float32, bfloat16 or float16, or int8 codes with a float scale per position
//       (k_scale, v_scale: key = code · scale), as the KV cache holds them.
//
// Written as broadcast multiply-and-sum in PyTorch, one step materialises (B, K, R, S, D) products twice per
// layer: 4 MB at S = 256 and 64 MB at S = 4096 for an 8B model, whose fresh pages (large allocations are
// mapped and unmapped per call) cost more than the arithmetic. Here each key and value row is read once, only
// at the positions the mask keeps, and serves all R queries of its group; scores and probabilities live in an
// R x S float buffer per (b, j).
//
// With AVX2, FMA and F16C (and D a multiple of 8) rows are widened 8 values at a time in registers (fp16 by
// vcvtph2ps, bf16 by a shift, int8 codes with the row's scale folded into its score and its probability), up
// to 4 queries' sums stay in registers per pass, the value sums keep 4 x 16 outputs in registers over a run
// of 256 rows (which stays in L2 while the passes go over it), and the softmax's exponentials are a vector
// polynomial. Otherwise (portable builds, odd D) plain loops the compiler vectorises do the same sums.
//
// Threads: the B · K (sequence, kv head) pairs are split over torch's thread pool when the work is big enough
// to pay for waking it (a decode step of an 8B model stays on the calling thread up to ~1000 positions).

#include "ops_namespace.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LLAMA3_ATTEND_AVX2 1
#endif

namespace {

// Below this many multiply-adds per call (~1 ms on one core) the pairs run on the calling thread: waking
// torch's sleeping threads costs 0.3-0.5 ms on a 2-core VM, and a thread another process holds costs more.
constexpr int64_t kParallelWork = 1 << 22;

// Σ a[d] b[d] in 8 partial sums, a form the compiler turns into vector FMAs without reassociation flags.
inline float dot(const float* a, const float* b, int64_t n) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int l = 0; l < 8; ++l) part[l] += a[d + l] * b[d + l];
  float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// y[d] += w · x[d]
inline void axpy(float w, const float* x, float* y, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += w * x[d];
}

// row s of a cache view as float: converted into `buf` unless it already is float (int8 codes stay unscaled:
// the callers fold the row's scale into its score and its probability)
template <class T>
inline const float* row_as_float(const T* row, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    (void)buf;
    (void)n;
    return row;
  } else {
    for (int64_t d = 0; d < n; ++d) buf[d] = static_cast<float>(row[d]);
    return buf;
  }
}

// e^x for every element of `row`, minus `top`, in place; returns their sum
inline float exp_in_place(float* row, int64_t n, float top);

#ifdef LLAMA3_ATTEND_AVX2
// 8 values of a cache row as float: fp16 through F16C, bf16 by a shift into the high half, int8 codes widened
template <class T>
inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  } else {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// e^x for 8 floats x <= 0 (softmax after subtracting the maximum): x = n ln2 + r with |r| <= ln2 / 2, e^r by a
// degree-6 polynomial (relative error ~2e-7), 2^n into the exponent bits; below -87 the result is 0 (or the
// smallest normal), as the scalar std::exp's underflow would be
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: the first exact in float
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

inline float exp_in_place(float* row, int64_t n, float top) {
  const __m256 t = _mm256_set1_ps(top);
  __m256 sum8 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + i), t));
    _mm256_storeu_ps(row + i, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float sum = hsum8(sum8);
  for (; i < n; ++i) {
    row[i] = std::exp(row[i] - top);
    sum += row[i];
  }
  return sum;
}

// Scores of RB queries (rows of q, D apart) against the kept rows [i0, i1): each key row is loaded (and
// widened) once per 8 values for all RB queries, whose sums stay in registers.
template <class T, int RB>
void scores_block(const float* q, const T* keys, const float* k_scale, const int64_t* keep, int64_t i0, int64_t i1,
                  int64_t D, int64_t s_stride, int64_t scale_stride, float scale, float* scores, int64_t n) {
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t s = keep[i];
    const T* key = keys + s * s_stride;
    __m256 acc[RB];
    for (int r = 0; r < RB; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 k8 = load8(key + d);
      for (int r = 0; r < RB; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + d), k8, acc[r]);
    }
    const float row_scale = scale * (k_scale ? k_scale[s * scale_stride] : 1.f);
    for (int r = 0; r < RB; ++r) scores[r * n + i] = row_scale * hsum8(acc[r]);
  }
}

// out[r, d0 : d0 + 8 DB] += Σ_i p[r, i] · value_i[d0 : ...] for RB queries over the kept rows [i0, i1): the
// RB x DB sums stay in registers across the rows, each value slice is loaded (and widened) once for all.
template <class T, int RB, int DB>
void values_block(const float* p, const T* values, const float* v_scale, const int64_t* keep, int64_t i0, int64_t i1,
                  int64_t d0, int64_t D, int64_t s_stride, int64_t scale_stride, int64_t n, float* out) {
  __m256 acc[RB][DB];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < DB; ++c) acc[r][c] = _mm256_loadu_ps(out + r * D + d0 + 8 * c);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t s = keep[i];
    const T* value = values + s * s_stride + d0;
    __m256 v8[DB];
    for (int c = 0; c < DB; ++c) v8[c] = load8(value + 8 * c);
    if (v_scale) {
      const __m256 w = _mm256_set1_ps(v_scale[s * scale_stride]);
      for (int c = 0; c < DB; ++c) v8[c] = _mm256_mul_ps(v8[c], w);
    }
    for (int r = 0; r < RB; ++r) {
      const __m256 pr = _mm256_broadcast_ss(p + r * n + i);
      for (int c = 0; c < DB; ++c) acc[r][c] = _mm256_fmadd_ps(pr, v8[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < DB; ++c) _mm256_storeu_ps(out + r * D + d0 + 8 * c, acc[r][c]);
}

template <class T, int RB>
void values_rows(const float* p, const T* values, const float* v_scale, const int64_t* keep, int64_t i0, int64_t i1,
                 int64_t D, int64_t s_stride, int64_t scale_stride, int64_t n, float* out) {
  int64_t d0 = 0;
  for (; d0 + 16 <= D; d0 += 16)
    values_block<T, RB, 2>(p, values, v_scale, keep, i0, i1, d0, D, s_stride, scale_stride, n, out);
  if (d0 < D) values_block<T, RB, 1>(p, values, v_scale, keep, i0, i1, d0, D, s_stride, scale_stride, n, out);
}

// f(std::integral_constant<int, RB>) for a block of min(4, left) queries: RB a compile-time count
template <class F>
inline void with_query_block(int64_t left, F&& f) {
  switch (std::min<int64_t>(4, left)) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{});
  }
}

// The R queries of one group against its kept rows, D a multiple of 8, in runs of 256 rows (whose keys and
// values stay in L2 while every block of queries and of output columns passes over them) and blocks of up
// to 4 queries.
template <class T>
void attend_pair_avx2(const float* q, const T* keys, const T* values, const float* k_scale, const float* v_scale,
                      const std::vector<int64_t>& keep, int64_t R, int64_t D, int64_t s_stride, int64_t scale_stride,
                      float scale, float* scores, float* out) {
  constexpr int64_t kRun = 256;
  const int64_t n = static_cast<int64_t>(keep.size());
  const int64_t* kp = keep.data();
  for (int64_t i0 = 0; i0 < n; i0 += kRun) {
    const int64_t i1 = std::min(n, i0 + kRun);
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const float* qr = q + r0 * D;
      float* sr = scores + r0 * n;
      with_query_block(R - r0, [&](auto rb) {
        scores_block<T, decltype(rb)::value>(qr, keys, k_scale, kp, i0, i1, D, s_stride, scale_stride, scale, sr, n);
      });
    }
  }
  std::vector<float> inv(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) {
    float* row = scores + r * n;
    __m256 top8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(row + i));
    float lanes[8];
    _mm256_storeu_ps(lanes, top8);
    float top = *std::max_element(lanes, lanes + 8);
    for (; i < n; ++i) top = std::max(top, row[i]);
    inv[r] = 1.f / exp_in_place(row, n, top);
  }
  std::fill(out, out + R * D, 0.f);
  for (int64_t i0 = 0; i0 < n; i0 += kRun) {
    const int64_t i1 = std::min(n, i0 + kRun);
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const float* pr = scores + r0 * n;
      float* o = out + r0 * D;
      with_query_block(R - r0, [&](auto rb) {
        values_rows<T, decltype(rb)::value>(pr, values, v_scale, kp, i0, i1, D, s_stride, scale_stride, n, o);
      });
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const __m256 w = _mm256_set1_ps(inv[r]);
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(out + r * D + d, _mm256_mul_ps(w, _mm256_loadu_ps(out + r * D + d)));
  }
}
#else
inline float exp_in_place(float* row, int64_t n, float top) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    row[i] = std::exp(row[i] - top);
    sum += row[i];
  }
  return sum;
}
#endif

struct Strides {  // element strides of a (B, K, S, D) view, D contiguous
  int64_t b, k, s;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// one (sequence b, kv head j) pair: its R queries against the kept positions `keep`
template <class T>
void attend_pair(const float* q, const T* keys, const T* values, const float* k_scale, const float* v_scale,
                 const std::vector<int64_t>& keep, int64_t R, int64_t D, int64_t s_stride, int64_t scale_stride,
                 float scale, float* out) {
  const int64_t n = static_cast<int64_t>(keep.size());
  std::vector<float> scores(static_cast<size_t>(R * n));
#ifdef LLAMA3_ATTEND_AVX2
  if (D % 8 == 0)
    return attend_pair_avx2<T>(q, keys, values, k_scale, v_scale, keep, R, D, s_stride, scale_stride, scale,
                               scores.data(), out);
#endif
  std::vector<float> buf(static_cast<size_t>(D));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = keep[i];
    const float* key = row_as_float(keys + s * s_stride, buf.data(), D);
    const float row_scale = scale * (k_scale ? k_scale[s * scale_stride] : 1.f);
    for (int64_t r = 0; r < R; ++r) scores[r * n + i] = row_scale * dot(q + r * D, key, D);
  }
  std::vector<float> total(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) {
    float* row = scores.data() + r * n;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) top = std::max(top, row[i]);
    total[r] = exp_in_place(row, n, top);
  }
  std::fill(out, out + R * D, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = keep[i];
    const float* value = row_as_float(values + s * s_stride, buf.data(), D);
    const float row_scale = v_scale ? v_scale[s * scale_stride] : 1.f;
    for (int64_t r = 0; r < R; ++r) axpy(row_scale * scores[r * n + i], value, out + r * D, D);
  }
  for (int64_t r = 0; r < R; ++r) {
    const float inv = 1.f / total[r];
    for (int64_t d = 0; d < D; ++d) out[r * D + d] *= inv;
  }
}

template <class T>
void attend_all(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& k_scale,
                const at::Tensor& v_scale, const std::vector<std::vector<int64_t>>& keep, double scale,
                at::Tensor& out) {
  const int64_t B = q.size(0), K = q.size(1), R = q.size(2), D = q.size(3);
  const Strides ks = strides_of(keys), vs = strides_of(values);
  TORCH_CHECK(ks.s == vs.s, "llama3::attend_one_query: keys and values must have the same layout");
  const bool scaled = k_scale.defined() && k_scale.numel() > 0;
  const Strides ss = scaled ? strides_of(k_scale) : Strides{0, 0, 0};
  const T* kp = keys.const_data_ptr<T>();
  const T* vp = values.const_data_ptr<T>();
  const float* ksp = scaled ? k_scale.const_data_ptr<float>() : nullptr;
  const float* vsp = scaled ? v_scale.const_data_ptr<float>() : nullptr;
  const float* qp = q.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  int64_t kept = 0;
  for (const auto& k : keep) kept += static_cast<int64_t>(k.size());
  const int64_t work = kept * K * R * D * 2;
  auto run = [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / K, j = p % K;
      attend_pair<T>(qp + (b * K + j) * R * D, kp + b * ks.b + j * ks.k, vp + b * vs.b + j * vs.k,
                     scaled ? ksp + b * ss.b + j * ss.k : nullptr, scaled ? vsp + b * ss.b + j * ss.k : nullptr,
                     keep[b], R, D, ks.s, ss.s, static_cast<float>(scale), op + (b * K + j) * R * D);
    }
  };
  if (work < kParallelWork) {
    run(0, B * K);
  } else {
    at::parallel_for(0, B * K, 1, run);
  }
}

at::Tensor attend_one_query(const at::Tensor& q_in, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& k_scale, const at::Tensor& v_scale, const at::Tensor& mask,
                            double scale) {
  const char* op = "llama3::attend_one_query";
  TORCH_CHECK(q_in.dim() == 4 && keys.dim() == 4 && values.dim() == 4, op, ": q, keys, values must be 4-D");
  TORCH_CHECK(keys.sizes() == values.sizes(), op, ": keys ", keys.sizes(), " and values ", values.sizes(), " differ");
  TORCH_CHECK(keys.scalar_type() == values.scalar_type(), op, ": keys and values differ in dtype");
  const int64_t B = q_in.size(0), K = q_in.size(1), D = q_in.size(3), S = keys.size(2);
  TORCH_CHECK(keys.size(0) == B && keys.size(1) == K && keys.size(3) == D, op, ": q ", q_in.sizes(),
              " does not fit keys ", keys.sizes());
  TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1, op, ": keys/values rows must be contiguous");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B && mask.size(1) == S, op,
              ": mask must be bool (B, S) = (", B, ", ", S, "), got ", mask.sizes());
  const bool scaled = k_scale.defined() && k_scale.numel() > 0;
  TORCH_CHECK(scaled == (keys.scalar_type() == at::kChar), op, ": int8 keys/values need k_scale and v_scale");
  if (scaled) {
    TORCH_CHECK(k_scale.scalar_type() == at::kFloat && v_scale.scalar_type() == at::kFloat && k_scale.dim() == 4 &&
                    k_scale.sizes() == v_scale.sizes() && k_scale.size(2) == S && k_scale.strides() == v_scale.strides(),
                op, ": k_scale/v_scale must be float32 (B, K, S, 1) with the same layout");
  }
  const at::Tensor q = q_in.to(at::kFloat).contiguous();
  const at::Tensor m = mask.contiguous();
  std::vector<std::vector<int64_t>> keep(static_cast<size_t>(B));
  const bool* mp = m.const_data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s)
      if (mp[b * S + s]) keep[b].push_back(s);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(!keep[b].empty(), op, ": sequence ", b, " has no position to attend to");
  at::Tensor out = at::empty(q.sizes(), q.options());
  switch (keys.scalar_type()) {
    case at::kFloat: attend_all<float>(q, keys, values, k_scale, v_scale, keep, scale, out); break;
    case at::kBFloat16: attend_all<c10::BFloat16>(q, keys, values, k_scale, v_scale, keep, scale, out); break;
    case at::kHalf: attend_all<c10::Half>(q, keys, values, k_scale, v_scale, keep, scale, out); break;
    case at::kChar: attend_all<int8_t>(q, keys, values, k_scale, v_scale, keep, scale, out); break;
    default: TORCH_CHECK(false, op, ": keys/values must be float32, bfloat16, float16 or int8, got ", keys.scalar_type());
  }
  return out;
}

}  // namespace

LLAMA3_LIBRARY_FRAGMENT(m) {
  m.def("attend_one_query(Tensor q, Tensor keys, Tensor values, Tensor k_scale, Tensor v_scale, Tensor mask, "
        "float scale) -> Tensor");
}

LLAMA3_LIBRARY_IMPL_CPU(m) { m.impl("attend_one_query", &attend_one_query); }
