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
// at the positions the mask keeps, converted to float in a row buffer, and serves all R queries of its group;
// scores and probabilities live in an R x S float buffer per (b, j).
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
#include <cstdint>
#include <limits>
#include <vector>

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

// row s of a cache view as float: converted into `buf` unless it already is float
template <class T>
inline const float* row_as_float(const T* row, float scale, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    (void)scale;
    (void)buf;
    (void)n;
    return row;
  } else if constexpr (std::is_same_v<T, int8_t>) {
    for (int64_t d = 0; d < n; ++d) buf[d] = static_cast<float>(row[d]) * scale;
    return buf;
  } else {
    (void)scale;
    for (int64_t d = 0; d < n; ++d) buf[d] = static_cast<float>(row[d]);
    return buf;
  }
}

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
  std::vector<float> buf(static_cast<size_t>(D));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = keep[i];
    const float* key = row_as_float(keys + s * s_stride, k_scale ? k_scale[s * scale_stride] : 1.f, buf.data(), D);
    for (int64_t r = 0; r < R; ++r) scores[r * n + i] = scale * dot(q + r * D, key, D);
  }
  std::vector<float> total(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) {
    float* row = scores.data() + r * n;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) top = std::max(top, row[i]);
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      row[i] = std::exp(row[i] - top);
      sum += row[i];
    }
    total[r] = sum;
  }
  std::fill(out, out + R * D, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = keep[i];
    const float* value =
        row_as_float(values + s * s_stride, v_scale ? v_scale[s * scale_stride] : 1.f, buf.data(), D);
    for (int64_t r = 0; r < R; ++r) axpy(scores[r * n + i], value, out + r * D, D);
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
