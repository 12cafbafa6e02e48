// Fused element-wise operators of the training step on the CPU: RMSNorm, SwiGLU and RoPE, forward and backward.
//
// Written with torch's operators, each of these is several passes over the activations: RMSNorm's forward
// is pow, mean, add, rsqrt, mul, mul (and its backward twice that), SwiGLU's backward is silu_backward and
// three multiplications, RoPE's backward zero-fills a buffer for `stack`'s gradient. At the ~100M training
// shape these passes were a sixth of the CPU step (profiled by benchmarks/train.py --profile). Here each is
// one pass per direction, row by row, with the row kept in cache between its reads. The autograd wrappers
// and the modules that use them are in llama3/train/fused.py; the plain torch composition stays the
// reference (tests/test_train_fused.py).
//
//   train_rms_norm(x fp32 (N, D), weight fp32 (D,), eps) -> (y fp32 (N, D), rstd fp32 (N,))
//   train_rms_norm_backward(grad (N, D), x, weight, rstd) -> (grad_x (N, D), grad_weight (D,))
//   train_swiglu(gate, up) -> silu(gate) * up                     fp32 or bf16, computed in fp32
//   train_swiglu_backward(grad, gate, up) -> (grad_gate, grad_up)
//   train_rope(x (R, H, Dh), rope fp32 (R, Dh/2, 2), inverse) -> x rotated by +angle (or -angle: backward)
//
// Plain C++ loops: with the instruction-set flags the compiler vectorizes them (the `omp simd` reductions
// allow it to reorder the sums). SwiGLU's exponential is a polynomial the compiler vectorizes as well
// (`exp_of`: libm's expf is a call per value, which made SwiGLU ~14% of a bf16 step at the demo shape).

#include "ops_namespace.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

namespace {

// Below ~32K values a parallel region costs more than it saves (torch's own GRAIN_SIZE).
constexpr int64_t kGrainValues = 32768;
inline int64_t grain_rows(int64_t values_per_row) { return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, values_per_row)); }

inline float train_load(const float* p) { return *p; }
inline float train_load(const c10::BFloat16* p) { return static_cast<float>(*p); }
inline void train_store(float* p, float v) { *p = v; }
inline void train_store(c10::BFloat16* p, float v) { *p = c10::BFloat16(v); }  // round to nearest even

void check_fp32_rows(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, op, ": x and weight must be float32");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), op, ": x and weight must be contiguous");
  TORCH_CHECK(weight.dim() == 1 && x.dim() >= 1 && x.size(-1) == weight.numel(), op,
              ": weight must be (D,) with D the last dimension of x");
}

// ----- RMSNorm: y = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps) -----

std::tuple<at::Tensor, at::Tensor> train_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_fp32_rows(x, weight, "train_rms_norm");
  const int64_t D = weight.numel(), N = D ? x.numel() / D : 0;
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, N, grain_rows(D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xr = xp + i * D;
      float* yr = yp + i * D;
      float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
      for (int64_t d = 0; d < D; ++d) squares += xr[d] * xr[d];
      const float r = 1.0f / std::sqrt(squares / static_cast<float>(D) + feps);
      rp[i] = r;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) yr[d] = (xr[d] * r) * wp[d];
    }
  });
  return {y, rstd};
}

// d/dx: rstd * (g - xhat * mean(g * xhat)) with g = grad * weight, xhat = x * rstd; d/dweight: sum over
// rows of grad * xhat, summed per block of rows into its own partial row and the partials added at the end.
std::tuple<at::Tensor, at::Tensor> train_rms_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                           const at::Tensor& weight, const at::Tensor& rstd) {
  check_fp32_rows(x, weight, "train_rms_norm_backward");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == at::kFloat && grad.is_contiguous(),
              "train_rms_norm_backward: grad must be a contiguous float32 tensor shaped like x");
  const int64_t D = weight.numel(), N = D ? x.numel() / D : 0;
  TORCH_CHECK(rstd.numel() == N && rstd.scalar_type() == at::kFloat && rstd.is_contiguous(),
              "train_rms_norm_backward: rstd must be float32 with one value per row");
  at::Tensor grad_x = at::empty_like(x);
  const int64_t num_blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, N / grain_rows(D)));
  at::Tensor partial = at::zeros({num_blocks, D}, x.options());
  const float* gp = grad.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  float* dxp = grad_x.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      float* dw = pp + block * D;
      for (int64_t i = N * block / num_blocks; i < N * (block + 1) / num_blocks; ++i) {
        const float* gr = gp + i * D;
        const float* xr = xp + i * D;
        float* dxr = dxp + i * D;
        const float r = rp[i];
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) {
          const float xhat = xr[d] * r;
          dot += gr[d] * wp[d] * xhat;
          dw[d] += gr[d] * xhat;
        }
        const float mean_dot = dot / static_cast<float>(D);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dxr[d] = r * (gr[d] * wp[d] - xr[d] * r * mean_dot);
      }
    }
  });
  return {grad_x, partial.sum(0)};
}

// ----- SwiGLU: silu(gate) * up -----

// e^x in float arithmetic only, so that a loop of it vectorizes: 2^n · e^r with n = round(x · log2 e) and
// r = x - n · ln 2 (ln 2 in two parts, the first exact in a few bits, so n · ln2_hi is exact), e^r by
// Cephes' degree-6 polynomial on |r| <= ln 2 / 2, 2^n built in the exponent bits. Within 2 ulp of expf
// over [-87, 88]; below, e^-87 stands for anything smaller (1 + it is 1), above 88.72 it is +inf as
// expf's (g / (1 + inf) = -0 for a very negative g).
inline float exp_of(float x_in) {
  const float x = std::min(std::max(x_in, -87.0f), 88.0f);
  constexpr float kRound = 12582912.0f;  // 1.5 · 2^23: adding and subtracting it rounds to an integer
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t exponent = (static_cast<int32_t>(n) + 127) << 23;
  return x_in > 88.72f ? std::numeric_limits<float>::infinity() : p * std::bit_cast<float>(exponent);
}

// Values a block at a time: loaded (bf16 widened) into float arrays, computed in a loop the compiler
// vectorizes, stored (rounded once for bf16)
constexpr int64_t kSimdBlock = 64;

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), op, ": tensors must match in shape and dtype");
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16, op, ": float32 or bfloat16 only");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), op, ": tensors must be contiguous");
}

template <typename T>
void swiglu_rows(const T* gate, const T* up, T* out, int64_t n) {
  at::parallel_for(0, n, kGrainValues, [&](int64_t begin, int64_t end) {
    float g[kSimdBlock] = {}, u[kSimdBlock] = {}, y[kSimdBlock];
    for (int64_t i0 = begin; i0 < end; i0 += kSimdBlock) {
      const int64_t m = std::min(kSimdBlock, end - i0);
      for (int64_t j = 0; j < m; ++j) g[j] = train_load(gate + i0 + j), u[j] = train_load(up + i0 + j);
#pragma omp simd
      for (int64_t j = 0; j < kSimdBlock; ++j) y[j] = g[j] / (1.0f + exp_of(-g[j])) * u[j];
      for (int64_t j = 0; j < m; ++j) train_store(out + i0 + j, y[j]);
    }
  });
}

at::Tensor train_swiglu(const at::Tensor& gate, const at::Tensor& up) {
  check_pair(gate, up, "train_swiglu");
  at::Tensor out = at::empty_like(gate);
  if (gate.scalar_type() == at::kFloat) {
    swiglu_rows(gate.data_ptr<float>(), up.data_ptr<float>(), out.data_ptr<float>(), gate.numel());
  } else {
    swiglu_rows(gate.data_ptr<c10::BFloat16>(), up.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(),
                gate.numel());
  }
  return out;
}

// With s = sigmoid(gate): d/dup = grad * gate * s, d/dgate = grad * up * s * (1 + gate * (1 - s)).
template <typename T>
void swiglu_backward_rows(const T* grad, const T* gate, const T* up, T* grad_gate, T* grad_up, int64_t n) {
  at::parallel_for(0, n, kGrainValues, [&](int64_t begin, int64_t end) {
    float g[kSimdBlock] = {}, u[kSimdBlock] = {}, dy[kSimdBlock] = {}, dg[kSimdBlock], du[kSimdBlock];
    for (int64_t i0 = begin; i0 < end; i0 += kSimdBlock) {
      const int64_t m = std::min(kSimdBlock, end - i0);
      for (int64_t j = 0; j < m; ++j)
        g[j] = train_load(gate + i0 + j), u[j] = train_load(up + i0 + j), dy[j] = train_load(grad + i0 + j);
#pragma omp simd
      for (int64_t j = 0; j < kSimdBlock; ++j) {
        const float s = 1.0f / (1.0f + exp_of(-g[j]));
        du[j] = dy[j] * g[j] * s;
        dg[j] = dy[j] * u[j] * s * (1.0f + g[j] * (1.0f - s));
      }
      for (int64_t j = 0; j < m; ++j) train_store(grad_up + i0 + j, du[j]), train_store(grad_gate + i0 + j, dg[j]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> train_swiglu_backward(const at::Tensor& grad, const at::Tensor& gate,
                                                         const at::Tensor& up) {
  check_pair(gate, up, "train_swiglu_backward");
  check_pair(grad, gate, "train_swiglu_backward");
  at::Tensor grad_gate = at::empty_like(gate), grad_up = at::empty_like(up);
  if (gate.scalar_type() == at::kFloat) {
    swiglu_backward_rows(grad.data_ptr<float>(), gate.data_ptr<float>(), up.data_ptr<float>(),
                         grad_gate.data_ptr<float>(), grad_up.data_ptr<float>(), gate.numel());
  } else {
    using B = c10::BFloat16;
    swiglu_backward_rows(grad.data_ptr<B>(), gate.data_ptr<B>(), up.data_ptr<B>(), grad_gate.data_ptr<B>(),
                         grad_up.data_ptr<B>(), gate.numel());
  }
  return {grad_gate, grad_up};
}

// ----- RoPE on Meta's interleaved pairs: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos) -----
// The backward is the same rotation by the opposite angle (`inverse`).

template <typename T>
void rope_rows(const T* x, const float* rope, T* out, int64_t rows, int64_t heads, int64_t head_dim, float sign) {
  const int64_t pairs = head_dim / 2;
  at::parallel_for(0, rows, grain_rows(heads * head_dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* cs = rope + r * pairs * 2;  // (Dh/2, 2): cos, sin
      for (int64_t h = 0; h < heads; ++h) {
        const T* xr = x + (r * heads + h) * head_dim;
        T* yr = out + (r * heads + h) * head_dim;
        for (int64_t i = 0; i < pairs; ++i) {
          const float c = cs[2 * i], s = sign * cs[2 * i + 1];
          const float x0 = train_load(xr + 2 * i), x1 = train_load(xr + 2 * i + 1);
          train_store(yr + 2 * i, x0 * c - x1 * s);
          train_store(yr + 2 * i + 1, x0 * s + x1 * c);
        }
      }
    }
  });
}

at::Tensor train_rope(const at::Tensor& x, const at::Tensor& rope, bool inverse) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "train_rope: x must be contiguous (rows, heads, head_dim)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "train_rope: float32 or bfloat16 only");
  const int64_t rows = x.size(0), heads = x.size(1), head_dim = x.size(2);
  TORCH_CHECK(head_dim % 2 == 0, "train_rope: head_dim must be even");
  TORCH_CHECK(rope.scalar_type() == at::kFloat && rope.is_contiguous() && rope.numel() == rows * head_dim,
              "train_rope: rope must be a contiguous float32 (rows, head_dim/2, 2) table");
  at::Tensor out = at::empty_like(x);
  const float sign = inverse ? -1.0f : 1.0f;
  if (x.scalar_type() == at::kFloat) {
    rope_rows(x.data_ptr<float>(), rope.data_ptr<float>(), out.data_ptr<float>(), rows, heads, head_dim, sign);
  } else {
    using B = c10::BFloat16;
    rope_rows(x.data_ptr<B>(), rope.data_ptr<float>(), out.data_ptr<B>(), rows, heads, head_dim, sign);
  }
  return out;
}

}  // namespace

LLAMA3_LIBRARY_FRAGMENT(m) {
  m.def("train_rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("train_rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("train_swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("train_swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("train_rope(Tensor x, Tensor rope, bool inverse) -> Tensor");
}

LLAMA3_LIBRARY_IMPL_CPU(m) {
  m.impl("train_rms_norm", &train_rms_norm);
  m.impl("train_rms_norm_backward", &train_rms_norm_backward);
  m.impl("train_swiglu", &train_swiglu);
  m.impl("train_swiglu_backward", &train_swiglu_backward);
  m.impl("train_rope", &train_rope);
}
