// Weights in ggml's quantized block formats turned back into floats, a slice of rows at a time.
//
//   llama3::ggml_dequantize(w uint8 (N, row_bytes), int ggml_type, int K, ScalarType dtype) -> dtype (N, K)
//       row n of a ggml tensor of type Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K as float32 or
//       bfloat16 (float32 rounded to nearest even)
//
// Prompts use it (llama3/inference/ggml_quant.py): a few hundred rows of activations meet each weight, so
// decoding a bounded slice of weight rows to float32 and handing it to torch's GEMM beats the byte products
// of ggml_matmul, and the embedding lookups read their rows through it.
//
// Values equal the `gguf` package's dequantization bit for bit. Every type's weight is a · q + b per 16 or
// 32 values, with a = d (an f16) or d · sub-scale (a 6- or 8-bit integer) and q a code of at most 8 bits:
// a · q then has at most 11 + 7 + 6 significant bits, fewer than float32's 24, so it is exact whatever the
// order of the products, and the one rounding is that of the add (d · q + m for Q4_1 / Q5_1, d · q - dmin · m
// for Q4_K / Q5_K; dmin · m is exact too). A fused multiply-add rounds once as well, so the compiler may
// contract freely. The symmetric types add nothing (adding +0 would turn a product's -0 into +0).
//
// This file is included after ggml_blocks.cpp in kernels.cpp and reuses its helpers. Two code paths:
// - AVX2: ggml_blocks.cpp's register decoders (32 centred codes per step) widened 8 at a time to floats
//   (about 2-3 G weights/s per core on Zen 3, under load: benchmarks/ggml_prefill.py);
// - portable C++: its block unpackers (`Format::unpack`: centred integer codes and the scale per 16 values,
//   exactly `a` above) and a float loop the compiler vectorizes.
// Rows are split over torch's thread pool.

#include "ops_namespace.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// The additive term per 16 values of the affine types, in gguf's sign convention (w = a · q + offset), and
// the centre their unpacked codes were shifted by (q = code + centre).
struct AffineTerms {
  int centre;
  void (*offsets)(const uint8_t* block, float* offset);  // block_values / 16 entries
};

void legacy_offsets(const uint8_t* b, float* offset) { offset[0] = offset[1] = f16_at(b + 2); }

void k_offsets(const uint8_t* b, float* offset) {
  const float dmin = f16_at(b + 2);
  for (int j = 0; j < 8; ++j) {
    int sc, mn;
    k_scale_min(b + 4, j, sc, mn);
    offset[2 * j] = offset[2 * j + 1] = -(dmin * static_cast<float>(mn));
  }
}

// nullptr for the symmetric types (Q4_0, Q5_0, Q8_0, Q6_K)
[[maybe_unused]] const AffineTerms* affine_terms(int64_t type) {
  static const AffineTerms q4_1{8, legacy_offsets}, q5_1{16, legacy_offsets}, q4_k{8, k_offsets},
      q5_k{16, k_offsets};
  switch (type) {
    case 3: return &q4_1;
    case 7: return &q5_1;
    case 12: return &q4_k;
    case 13: return &q5_k;
    default: return nullptr;
  }
}

// One weight row (K values) to float32: per 16 values w = scale · code (symmetric) or
// scale · (code + centre) + offset (affine). `codes`, `scale`, `bias` and `offset` are scratch for one block
// (its values, and one entry per 16 of them).
template <bool kAffine>
[[maybe_unused]] void dequantize_row(const Format& f, const AffineTerms* affine, const uint8_t* w, int64_t K, float* out,
                    int8_t* codes, float* scale, float* bias, float* offset) {
  const int64_t blocks = K / f.values, groups = f.values / kGroup;
  for (int64_t i = 0; i < blocks; ++i) {
    const uint8_t* block = w + i * f.bytes;
    f.unpack(block, codes, scale, bias);  // bias (the centred form's) is not used: it was rounded
    if constexpr (kAffine) affine->offsets(block, offset);
    float* o = out + i * f.values;
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* c = codes + g * kGroup;
      const float a = scale[g];
      if constexpr (kAffine) {
        const float b = offset[g];
        const int centre = affine->centre;
        for (int k = 0; k < kGroup; ++k) o[g * kGroup + k] = a * static_cast<float>(c[k] + centre) + b;
      } else {
        for (int k = 0; k < kGroup; ++k) o[g * kGroup + k] = a * static_cast<float>(c[k]);
      }
    }
  }
}


#ifdef LLAMA3_GGML_AVX2
// ----- AVX2: ggml_blocks.cpp's register decoders give 32 centred codes at a time; 8 floats per step -----

// 32 codes (bytes in value order) to floats: a_lo · (code + centre) + b for values 0-15, a_hi for 16-31;
// the symmetric types (kAffine false) a · code alone
template <bool kAffine>
inline void codes_to_floats(__m256i codes, __m256 a_lo, __m256 a_hi, __m256 centre, __m256 b, float* out) {
  const __m128i halves[2] = {_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1)};
  for (int i = 0; i < 4; ++i) {
    const __m128i bytes = i % 2 == 0 ? halves[i / 2] : _mm_srli_si128(halves[i / 2], 8);
    __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
    const __m256 a = i < 2 ? a_lo : a_hi;
    if constexpr (kAffine) {
      _mm256_storeu_ps(out + 8 * i, _mm256_fmadd_ps(a, _mm256_add_ps(q, centre), b));  // a · q exact: one rounding
    } else {
      _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(a, q));
    }
  }
}

template <int kLegacyType>
void legacy_row_avx2(const uint8_t* w, int64_t K, float* out) {
  using D = LegacyDecoder<kLegacyType>;
  constexpr float kCentre = (kLegacyType == 6 || kLegacyType == 7) ? 16.f : 8.f;
  for (int64_t c = 0; c < K / kXBlock; ++c) {
    const Chunk ch = D::chunk(w, c);
    const __m256 a = _mm256_set1_ps(ch.scale);
    // Chunk::bias folds the centre in (rounded); the affine offset is the block's own m
    const __m256 b = _mm256_set1_ps(D::kBias ? f16_at(w + c * D::kBytes + 2) : 0.f);
    codes_to_floats<D::kBias>(ch.codes, a, a, _mm256_set1_ps(kCentre), b, out + c * kXBlock);
  }
}

template <bool kFifthBit>
void k_affine_row_avx2(const uint8_t* w, int64_t K, float* out) {
  using D = KAffineDecoder<kFifthBit>;
  const __m256 centre = _mm256_set1_ps(static_cast<float>(D::kCentre));
  for (int64_t sb = 0; sb < K / 256; ++sb) {
    const uint8_t* b = w + sb * D::kBytes;
    const typename D::Super s = D::super(b);
    const float dmin = f16_at(b + 2);
    for (int j = 0; j < 8; ++j) {
      int sc, mn;
      k_scale_min(b + 4, j, sc, mn);
      const __m256 a = _mm256_set1_ps(s.d * static_cast<float>(sc));
      codes_to_floats<true>(D::codes(s, b, j), a, a, centre, _mm256_set1_ps(-(dmin * static_cast<float>(mn))),
                            out + sb * 256 + 32 * j);
    }
  }
}

void q6_k_row_avx2(const uint8_t* w, int64_t K, float* out) {
  for (int64_t sb = 0; sb < K / 256; ++sb) {
    const uint8_t* b = w + sb * Q6KDecoder::kBytes;
    const Q6KDecoder::Super s = Q6KDecoder::super(b);
    const auto* sub = reinterpret_cast<const int8_t*>(b + 192);
    for (int j = 0; j < 8; ++j)
      codes_to_floats<false>(Q6KDecoder::codes(s, b, j), _mm256_set1_ps(s.d * static_cast<float>(sub[2 * j])),
                             _mm256_set1_ps(s.d * static_cast<float>(sub[2 * j + 1])), _mm256_setzero_ps(),
                             _mm256_setzero_ps(), out + sb * 256 + 32 * j);
  }
}

using RowDecoder = void (*)(const uint8_t*, int64_t, float*);

RowDecoder avx2_row_decoder(int64_t type) {
  switch (type) {
    case 2: return legacy_row_avx2<2>;
    case 3: return legacy_row_avx2<3>;
    case 6: return legacy_row_avx2<6>;
    case 7: return legacy_row_avx2<7>;
    case 8: return legacy_row_avx2<8>;
    case 12: return k_affine_row_avx2<false>;
    case 13: return k_affine_row_avx2<true>;
    default: return q6_k_row_avx2;
  }
}

// 8 floats to bf16, rounding to nearest even (NaN stays a quiet NaN, as c10::BFloat16 makes it)
inline __m128i bf16_8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

#endif

// float32 → bfloat16, rounding to nearest even (as torch's .to(torch.bfloat16) does)
void to_bf16(const float* in, c10::BFloat16* out, int64_t n) {
  int64_t k = 0;
#ifdef LLAMA3_GGML_AVX2
  for (; k + 8 <= n; k += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), bf16_8(_mm256_loadu_ps(in + k)));
#endif
  for (; k < n; ++k) out[k] = c10::BFloat16(in[k]);
}

// The portable path's per-block scratch (the AVX2 path decodes in registers and leaves it empty)
struct Scratch {
  std::vector<int8_t> codes;
  std::vector<float> scale, bias, offset;
  explicit Scratch([[maybe_unused]] const Format& f) {
#ifndef LLAMA3_GGML_AVX2
    codes.resize(f.values);
    scale.resize(f.values / kGroup), bias.resize(f.values / kGroup), offset.resize(f.values / kGroup);
#endif
  }
};

// One weight row of type `type` (format `f`) to K floats
inline void decode_row([[maybe_unused]] const Format& f, int64_t type, const uint8_t* w, int64_t K, float* out,
                       [[maybe_unused]] Scratch& scratch) {
#ifdef LLAMA3_GGML_AVX2
  avx2_row_decoder(type)(w, K, out);
#else
  const AffineTerms* affine = affine_terms(type);
  if (affine != nullptr)
    dequantize_row<true>(f, affine, w, K, out, scratch.codes.data(), scratch.scale.data(), scratch.bias.data(),
                         scratch.offset.data());
  else
    dequantize_row<false>(f, affine, w, K, out, scratch.codes.data(), scratch.scale.data(), scratch.bias.data(),
                          scratch.offset.data());
#endif
}

constexpr int64_t kGrainRows = 8;  // rows per task of the thread pool: a few KB to a few tens of KB each

at::Tensor ggml_dequantize(const at::Tensor& w, int64_t type, int64_t K, at::ScalarType dtype) {
  const char* op = "llama3::ggml_dequantize";
  const Format* f = format_of(type);
  TORCH_CHECK(f != nullptr, op, ": ggml type ", type, " is not one of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K");
  TORCH_CHECK(w.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(K > 0 && K % f->values == 0, op, ": ", f->name, " rows need a positive multiple of ", f->values,
              " values, got ", K);
  const int64_t row_bytes = K / f->values * f->bytes;
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.size(1) == row_bytes && w.stride(1) == 1 &&
                  (w.size(0) <= 1 || w.stride(0) == row_bytes),
              op, ": w must be contiguous uint8 (N, ", row_bytes, ") for ", K, " ", f->name, " values per row, got ",
              w.sizes());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, op, ": dtype must be float32 or bfloat16, got ", dtype);
  const int64_t N = w.size(0);
  at::Tensor out = at::empty({N, K}, w.options().dtype(dtype));
  const auto* wp = w.const_data_ptr<uint8_t>();
  at::parallel_for(0, N, kGrainRows, [&](int64_t n0, int64_t n1) {
    Scratch scratch(*f);
    std::vector<float> row(dtype == at::kFloat ? 0 : K);  // bf16: each row in float32 first
    for (int64_t n = n0; n < n1; ++n) {
      float* dst = dtype == at::kFloat ? out.mutable_data_ptr<float>() + n * K : row.data();
      decode_row(*f, type, wp + n * row_bytes, K, dst, scratch);
      if (dtype == at::kBFloat16) to_bf16(row.data(), out.mutable_data_ptr<c10::BFloat16>() + n * K, K);
    }
  });
  return out;
}

}  // namespace

LLAMA3_LIBRARY_FRAGMENT(m) {
  m.def("ggml_dequantize(Tensor w, int ggml_type, int in_features, ScalarType dtype) -> Tensor");
}

LLAMA3_LIBRARY_IMPL_CPU(m) { m.impl("ggml_dequantize", &ggml_dequantize); }
