// Inference-time RMSNorm and RoPE, each one operator instead of a dozen.
//
// An eager decode step of the model's PyTorch form spends most of its operators, not its time, on two small
// things per layer: RMSNorm (to float, pow, mean, add, rsqrt, mul, back to the model's dtype, mul: twice
// per layer) and RoPE on q and k (to float, reshape, four selects, four multiplies, a subtraction, an
// addition, stack, flatten, back: twice per layer). Each operator costs a few microseconds of dispatch
// whatever its size, ~3 ms a token at the 1B shape's 16 layers, a tenth of a quantized decode step there.
// These compute the same values in one pass (llama3/inference/attention.py installs them for inference;
// training has its own fused operators with backwards, train_ops.cpp):
//
//   rms_norm(x (..., D), weight (D,), eps) -> (x · rsqrt(mean(x²) + eps)) rounded to x's dtype, · weight
//       x and weight float32, bfloat16 or float16, one dtype; the sum of squares and the scaling in float32,
//       the normalised value rounded to the dtype before the weight multiplies it, as the PyTorch form does
//       (only the order of the sum of squares differs).
//   rope_(x (B, T, H, Dh), rope (T, Dh/2, 2) or (B, T, Dh/2, 2)) -> x, rotated in place
//       Meta's interleaved pairs: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), in float32 with each
//       product rounded on its own (no fused multiply-add), so the values equal the PyTorch form's bit for
//       bit. x may be a strided view (q or k of a fused projection's output); its last dimension is
//       contiguous.

#include "ops_namespace.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

// rows per parallel task: at least ~32K values (a decode step's few rows stay on the calling thread)
inline int64_t norm_rope_grain(int64_t values_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, values_per_row));
}

template <class T>
void rms_norm_rows(const T* x, const T* w, T* y, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, norm_rope_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * D;
      T* yr = y + r * D;
      float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
      for (int64_t d = 0; d < D; ++d) {
        const float v = static_cast<float>(xr[d]);
        squares += v * v;
      }
      const float scale = 1.0f / std::sqrt(squares / static_cast<float>(D) + eps);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const T normed = static_cast<T>(static_cast<float>(xr[d]) * scale);  // rounded as `.type_as(x)` does
        yr[d] = static_cast<T>(static_cast<float>(normed) * static_cast<float>(w[d]));
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  const char* op = "llama3::rms_norm";
  TORCH_CHECK(x_in.dim() >= 1 && weight_in.dim() == 1 && x_in.size(-1) == weight_in.size(0), op,
              ": weight must be (D,) with D the last dimension of x, got x ", x_in.sizes(), " and weight ",
              weight_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == weight_in.scalar_type(), op, ": x and weight must have one dtype, got ",
              x_in.scalar_type(), " and ", weight_in.scalar_type());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t D = weight.size(0), rows = D ? x.numel() / D : 0;
  const float e = static_cast<float>(eps);
  switch (x.scalar_type()) {
    case at::kFloat:
      rms_norm_rows(x.const_data_ptr<float>(), weight.const_data_ptr<float>(), y.mutable_data_ptr<float>(), rows, D, e);
      break;
    case at::kBFloat16: {
      using B = c10::BFloat16;
      rms_norm_rows(x.const_data_ptr<B>(), weight.const_data_ptr<B>(), y.mutable_data_ptr<B>(), rows, D, e);
      break;
    }
    case at::kHalf: {
      using H = c10::Half;
      rms_norm_rows(x.const_data_ptr<H>(), weight.const_data_ptr<H>(), y.mutable_data_ptr<H>(), rows, D, e);
      break;
    }
    default:
      TORCH_CHECK(false, op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return y;
}

// x0 c - x1 s and x0 s + x1 c with every product rounded to float32 before the sum, as PyTorch's
// element-wise operators round them: a contracted multiply-add would differ in the last bit. The empty asm
// makes the rounded product a value the compiler must have in a register, which it then cannot fuse.
inline float rounded_product(float a, float b) {
  float p = a * b;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+x"(p));
#elif defined(__GNUC__) && defined(__aarch64__)
  asm("" : "+w"(p));
#else
  volatile float kept = p;
  p = kept;
#endif
  return p;
}

template <class T, class R>
void rope_rows_(T* x, const R* rope, int64_t B, int64_t T_, int64_t H, int64_t Dh, int64_t sb, int64_t st,
                int64_t sh, int64_t rope_b) {
  const int64_t pairs = Dh / 2;
  at::parallel_for(0, B * T_, norm_rope_grain(H * Dh), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / T_, t = p % T_;
      const R* cs = rope + (b * rope_b + t) * pairs * 2;  // (Dh/2, 2): cos, sin
      for (int64_t h = 0; h < H; ++h) {
        T* xr = x + b * sb + t * st + h * sh;
        for (int64_t i = 0; i < pairs; ++i) {
          const float c = static_cast<float>(cs[2 * i]), s = static_cast<float>(cs[2 * i + 1]);
          const float x0 = static_cast<float>(xr[2 * i]), x1 = static_cast<float>(xr[2 * i + 1]);
          xr[2 * i] = static_cast<T>(rounded_product(x0, c) - rounded_product(x1, s));
          xr[2 * i + 1] = static_cast<T>(rounded_product(x0, s) + rounded_product(x1, c));
        }
      }
    }
  });
}

at::Tensor rope_(at::Tensor x, const at::Tensor& rope) {
  const char* op = "llama3::rope_";
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0, op,
              ": x must be (B, T, H, head_dim) with contiguous rows of an even head_dim, got ", x.sizes(),
              " strides ", x.strides());
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), Dh = x.size(3);
  TORCH_CHECK(rope.is_contiguous() && rope.size(-1) == 2 && rope.size(-2) == Dh / 2 &&
                  ((rope.dim() == 3 && rope.size(0) == T) ||
                   (rope.dim() == 4 && rope.size(1) == T && (rope.size(0) == B || rope.size(0) == 1))),
              op, ": rope must be a contiguous (T, head_dim/2, 2) or (B, T, head_dim/2, 2) table for x ", x.sizes(),
              ", got ", rope.sizes());
  const int64_t rope_b = (rope.dim() == 4 && rope.size(0) == B && B > 1) ? T : 0;  // rows per sequence
  const int64_t sb = x.stride(0), st = x.stride(1), sh = x.stride(2);
  auto rotate = [&](auto* xp) {
    switch (rope.scalar_type()) {  // a model cast to 16 bits holds its table in that type too
      case at::kFloat: rope_rows_(xp, rope.const_data_ptr<float>(), B, T, H, Dh, sb, st, sh, rope_b); break;
      case at::kBFloat16: rope_rows_(xp, rope.const_data_ptr<c10::BFloat16>(), B, T, H, Dh, sb, st, sh, rope_b); break;
      case at::kHalf: rope_rows_(xp, rope.const_data_ptr<c10::Half>(), B, T, H, Dh, sb, st, sh, rope_b); break;
      default: TORCH_CHECK(false, op, ": rope must be float32, bfloat16 or float16, got ", rope.scalar_type());
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat: rotate(x.mutable_data_ptr<float>()); break;
    case at::kBFloat16: rotate(x.mutable_data_ptr<c10::BFloat16>()); break;
    case at::kHalf: rotate(x.mutable_data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return x;
}

}  // namespace

LLAMA3_LIBRARY_FRAGMENT(m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor rope) -> Tensor(a!)");
}

LLAMA3_LIBRARY_IMPL_CPU(m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rope_", &rope_);
}
