// Products with weights kept in ggml's quantized block formats, read straight from a GGUF file's bytes.
//
//   llama3::ggml_matmul(x bf16|fp32 (M, K), w uint8 (N, row_bytes), int ggml_type, int K) -> x.dtype (M, N)
//       y[m, n] = Σ_k x[m, k] · w[n, k], w[n] being row n of a ggml tensor of type Q4_0, Q4_1, Q5_0, Q5_1,
//       Q8_0, Q4_K, Q5_K or Q6_K (layouts: llama3/checkpoint/gguf_quants.py)
//   llama3::ggml_matmul_group(x (M, K), ws [uint8 (N_i, row_bytes_i)], int[] ggml_types, int K) -> (M, Σ N_i)
//       [x W_0ᵀ | x W_1ᵀ | ...] for weights that share x (q/k/v, gate/up), each of its own type: x rounded
//       once and one parallel region for all, the weights read where they lie
//
// Every one of these formats stores a weight as scale · code + bias with a small integer code and a scale
// and bias shared by 16 or 32 consecutive weights. So a weight row is first unpacked into one common form
// that keeps every value exactly: the codes as signed bytes, centred (4-bit q - 8, 5-bit q - 16, 6-bit
// q - 32, Q8_0 as stored), and a float scale and bias per 16 weights. The symmetric types (Q4_0, Q5_0, Q8_0,
// Q6_K) have no bias; the affine ones (Q4_1, Q5_1, Q4_K, Q5_K: scale · q + min) get min + scale · centre.
// Centring halves what the rounding of x can cost against uncentred codes (the error multiplies
// scale · code), and the bias meets the exact sums of x. The products then run on bytes, as llama.cpp's do: each row of x is
// rounded to int8 per block of 32 (scale absmax / 127), and per 16 weights
//     Σ w · x  ≈  scale · x_scale · Σ code · x_int8  +  bias · Σ x
// with the integer sum exact and Σ x taken from the unrounded activations.
//
// Two code paths, chosen at compile time from the level's flags (kernels/__init__.py):
// - AVX2: each 32 weights are decoded in registers (nibbles, 5th/6th bits, centring) and multiplied at
//   once with up to 8 rows of x (vpmaddubsw / vpmaddwd), so a weight row is decoded once per 8 rows of x:
//   a decode step reads each block once, a prompt decodes it once per 8 tokens. The K types decode a
//   256-value super-block's scales once and multiply its integer sub-scales into the byte products
//   (vpmaddwd), leaving one float multiply-add per 32 weights and row of x;
// - portable C++: a thread unpacks a tile of weight rows into bytes and floats (a few KB per row) and
//   multiplies it with every row of x.
// Weight rows are split over threads: in runs taken from a shared counter (AVX2; the runs of all the weights
// of a group in one parallel region, on torch's thread pool or, opted in, on SpinPool), in tiles of 16 over
// torch's thread pool (portable).

#include "ops_namespace.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define LLAMA3_GGML_AVX2 1
#endif

namespace {

constexpr int64_t kGroup = 16;   // weights per unpacked scale and bias
constexpr int64_t kXBlock = 32;  // activations per int8 scale
constexpr int64_t kTileRows = 16;  // weight rows unpacked (portable) or multiplied by every pass of x together

inline float f16_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
#ifdef __F16C__
  return _cvtsh_ss(bits);  // one instruction: a block's scale is read for every 32 weights
#else
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
}

// One row unpacked: codes (K bytes), scale and bias per 16 weights.
struct RowView {
  int8_t* codes;
  float* scale;
  float* bias;
};

// ----- unpacking one block of each type into codes[values], scale[values / 16], bias[values / 16] -----

inline void set_groups(float* scale, float* bias, int64_t groups, float s, float b) {
  for (int64_t g = 0; g < groups; ++g) scale[g] = s, bias[g] = b;
}

// 32 codes from 16 bytes of nibbles (value j low, 16 + j high) plus optional 5th bits, minus `offset`
inline void legacy_codes(const uint8_t* qs, const uint8_t* qh, int offset, int8_t* codes) {
  uint32_t high = 0;
  if (qh != nullptr) std::memcpy(&high, qh, sizeof(high));
  for (int j = 0; j < 16; ++j) {
    codes[j] = static_cast<int8_t>(((qs[j] & 0x0F) | (((high >> j) & 1) << 4)) - offset);
    codes[j + 16] = static_cast<int8_t>(((qs[j] >> 4) | (((high >> (j + 16)) & 1) << 4)) - offset);
  }
}

void unpack_q4_0(const uint8_t* b, int8_t* c, float* s, float* z) {
  legacy_codes(b + 2, nullptr, 8, c);
  set_groups(s, z, 2, f16_at(b), 0.f);
}
void unpack_q4_1(const uint8_t* b, int8_t* c, float* s, float* z) {
  const float d = f16_at(b);
  legacy_codes(b + 4, nullptr, 8, c);
  set_groups(s, z, 2, d, f16_at(b + 2) + 8.f * d);
}
void unpack_q5_0(const uint8_t* b, int8_t* c, float* s, float* z) {
  legacy_codes(b + 6, b + 2, 16, c);
  set_groups(s, z, 2, f16_at(b), 0.f);
}
void unpack_q5_1(const uint8_t* b, int8_t* c, float* s, float* z) {
  const float d = f16_at(b);
  legacy_codes(b + 8, b + 4, 16, c);
  set_groups(s, z, 2, d, f16_at(b + 2) + 16.f * d);
}
void unpack_q8_0(const uint8_t* b, int8_t* c, float* s, float* z) {
  std::memcpy(c, b + 2, 32);
  set_groups(s, z, 2, f16_at(b), 0.f);
}

// Q4_K / Q5_K: eight (scale, min) 6-bit pairs packed in 12 bytes
inline void k_scale_min(const uint8_t* q, int j, int& sc, int& mn) {
  if (j < 4) {
    sc = q[j] & 63;
    mn = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
    mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

template <bool kFifthBit>
void unpack_k_affine(const uint8_t* b, int8_t* c, float* s, float* z) {
  constexpr int kCentre = kFifthBit ? 16 : 8;
  const float d = f16_at(b), dmin = f16_at(b + 2);
  const uint8_t* packed = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* qs = kFifthBit ? b + 48 : b + 16;
  for (int chunk = 0; chunk < 4; ++chunk) {  // 64 values from 32 bytes
    for (int l = 0; l < 32; ++l) {
      int lo = qs[32 * chunk + l] & 0x0F, hi = qs[32 * chunk + l] >> 4;
      if (kFifthBit) {
        lo |= ((qh[l] >> (2 * chunk)) & 1) << 4;
        hi |= ((qh[l] >> (2 * chunk + 1)) & 1) << 4;
      }
      c[64 * chunk + l] = static_cast<int8_t>(lo - kCentre);
      c[64 * chunk + 32 + l] = static_cast<int8_t>(hi - kCentre);
    }
  }
  for (int j = 0; j < 8; ++j) {
    int sc, mn;
    k_scale_min(packed, j, sc, mn);
    set_groups(s + 2 * j, z + 2 * j, 2, d * sc, kCentre * (d * sc) - dmin * mn);
  }
}

void unpack_q6_k(const uint8_t* b, int8_t* c, float* s, float* z) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const auto* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16_at(b + 208);
  for (int half = 0; half < 2; ++half) {
    const uint8_t* l4 = ql + 64 * half;
    const uint8_t* h2 = qh + 32 * half;
    int8_t* out = c + 128 * half;
    for (int l = 0; l < 32; ++l) {
      out[l] = static_cast<int8_t>(((l4[l] & 0x0F) | ((h2[l] & 3) << 4)) - 32);
      out[l + 32] = static_cast<int8_t>(((l4[l + 32] & 0x0F) | (((h2[l] >> 2) & 3) << 4)) - 32);
      out[l + 64] = static_cast<int8_t>(((l4[l] >> 4) | (((h2[l] >> 4) & 3) << 4)) - 32);
      out[l + 96] = static_cast<int8_t>(((l4[l + 32] >> 4) | (((h2[l] >> 6) & 3) << 4)) - 32);
    }
  }
  for (int g = 0; g < 16; ++g) s[g] = d * sc[g], z[g] = 0.f;
}

struct Format {
  const char* name;
  int64_t values, bytes;
  bool has_bias;  // the affine types
  void (*unpack)(const uint8_t*, int8_t*, float*, float*);
};

// ggml type numbers, as in a GGUF tensor header
const Format* format_of(int64_t type) {
  static const Format q4_0{"Q4_0", 32, 18, false, unpack_q4_0}, q4_1{"Q4_1", 32, 20, true, unpack_q4_1},
      q5_0{"Q5_0", 32, 22, false, unpack_q5_0}, q5_1{"Q5_1", 32, 24, true, unpack_q5_1},
      q8_0{"Q8_0", 32, 34, false, unpack_q8_0}, q4_k{"Q4_K", 256, 144, true, unpack_k_affine<false>},
      q5_k{"Q5_K", 256, 176, true, unpack_k_affine<true>}, q6_k{"Q6_K", 256, 210, false, unpack_q6_k};
  switch (type) {
    case 2: return &q4_0;
    case 3: return &q4_1;
    case 6: return &q5_0;
    case 7: return &q5_1;
    case 8: return &q8_0;
    case 12: return &q4_k;
    case 13: return &q5_k;
    case 14: return &q6_k;
    default: return nullptr;
  }
}

// The portable path's tile unpacker; AVX2 builds decode blocks in registers instead (hence maybe_unused).
[[maybe_unused]] void unpack_row(const Format& f, const uint8_t* w, int64_t K, RowView out) {
  const int64_t blocks = K / f.values, groups = f.values / kGroup;
  for (int64_t i = 0; i < blocks; ++i)
    f.unpack(w + i * f.bytes, out.codes + i * f.values, out.scale + i * groups, out.bias + i * groups);
}

// ----- repacked weights: 8 rows interleaved, so one byte of x meets 8 weight rows in one instruction -----
//
// `ggml_repack` rewrites a matrix of any of the block types at load, 8 rows at a time, into a layout where a
// 32-byte load holds, in 32-bit lane r, 4 bytes of row r (Q4: 8 codes, 4 consecutive positions in the low
// nibbles, 4 in the high ones) and the 8 rows' scales lie side by side. A broadcast of 4 int8 activations then meets 8
// rows at once: vpmaddubsw takes the codes as they are stored (unsigned 0..15), the 8 products of a block
// add up in int16 (each pair sum is at most 2·15·127 = 3810, eight of them 30480 < 32767), one vpmaddwd
// makes them int32 per row (with the K types' sub-scale in the same instruction), and the centring of
// the codes (q - 8) becomes one correction per block, 8 · Σ x_int8 (the integers stay exact). The float
// work is one multiply-add per block for 8 rows, with no horizontal sums and no scalar fp16 conversions.
// The values are today's: the same integer sums times the same float scales, summed in another order.
//
//   Q4_0, per 8 rows and block of 32 (144 bytes, as 8 file blocks): 8 fp16 d, then 4 × 32 bytes, load i
//     byte 4r + j = row r's nibble byte 4i + j (low nibble: position 4i + j, high: 16 + 4i + j).
//   Q4_K, per 8 rows and super-block of 256 (1184 bytes, 8 file blocks are 1152): 8 fp16 d, 8 fp16 dmin,
//     the 6-bit sub-scales as bytes [sub-block j][row r], the mins likewise, then for each 64-value chunk
//     c 8 × 32 bytes, load i byte 4r + j = row r's byte 4i + j of chunk c (low nibble: sub-block 2c,
//     high: 2c + 1, position 4i + j).
//   Q5_K, per 8 rows and super-block (1440 bytes, 8 file blocks are 1408): Q4_K's layout for the low 4 bits,
//     then per sub-block j 32 bytes H_j, byte 4r + u bit i = the 5th bit of the u-th byte of code vector i.
//   Q6_K, per 8 rows and super-block (1680 bytes, as 8 file blocks): 8 fp16 d, the int8 sub-scales
//     [group of 16 g][row r], then per 32-value chunk two times 3 × 32 bytes A, B, C that carry 4 code
//     vectors (the first three for positions 4k + u, the second three for 16 + 4k + u, k = 0..3, u the
//     byte of lane r): byte 4r + u of A, B, C holds, in its low 6 bits, the code of vector k = 0, 1, 2,
//     and in its top 2 bits bits 0-1, 2-3, 4-5 of the code of vector 3: three vectors take one AND each,
//     the fourth three shifts, three ANDs and two ORs (the file's 4 + 2 bit split takes twice the work).
//     Codes 0..63: only 2 products add in int16 (2 · 2 · 63 · 127 = 32004), then vpmaddwd with the
//     group's sub-scale; the centring (q - 32) takes 32 · (scale_A · Σ x_int8 + scale_B · Σ x_int8) over
//     the chunk's two 16-value groups.
//   Q4_1, Q5_0, Q5_1, per 8 rows and block of 32 (as 8 file blocks: 160, 176, 192 bytes): 8 fp16 d, (Q4_1,
//     Q5_1) 8 fp16 m, Q4_0's 4 × 32 bytes of nibbles, (Q5_0, Q5_1) 32 bytes H, byte 4r + u bit i = the 5th
//     bit of the u-th byte of code vector i (position 4i + u).
//   Q8_0, per 8 rows and block of 32 (272 bytes, as 8 file blocks): 8 fp16 d, then 8 × 32 bytes, load i
//     byte 4r + j = row r's code 4i + j. The codes are signed: vpmaddubsw takes |code| against x carrying
//     the code's sign, and each pair sum (up to 2 · 128 · 127 = 32512) goes to int32 at once (vpmaddwd).
constexpr int64_t kRepackedFlag = 256;  // ggml type | this = the type repacked
constexpr int64_t kRepackRows = 8;
constexpr int64_t kQ4_0GroupBytes = 144, kQ4_KGroupBytes = 1184, kQ6_KGroupBytes = 1680, kQ8_0GroupBytes = 272,
                  kQ5_KGroupBytes = 1440;

inline uint32_t word_at(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Q4_0, Q4_1, Q5_0, Q5_1: the 8 rows' d, (their m,) the nibbles 4 bytes a row at a time, (the 5th bits)
template <int kLegacyType>
void repack_legacy(const uint8_t* src, int64_t row_bytes, int64_t blocks, uint8_t* dst) {
  constexpr bool kMin = kLegacyType == 3 || kLegacyType == 7, kFifthBit = kLegacyType == 6 || kLegacyType == 7;
  constexpr int64_t kBlockBytes = 18 + (kMin ? 2 : 0) + (kFifthBit ? 4 : 0), kGroupBytes = 8 * kBlockBytes;
  constexpr int64_t kNibbles = kMin ? 32 : 16;  // in the group
  for (int64_t b = 0; b < blocks; ++b, dst += kGroupBytes)
    for (int64_t r = 0; r < kRepackRows; ++r) {
      const uint8_t* block = src + r * row_bytes + b * kBlockBytes;
      const uint8_t* qs = block + kBlockBytes - 16;  // the file's nibbles close every one of these blocks
      std::memcpy(dst + 2 * r, block, 2);
      if (kMin) std::memcpy(dst + 16 + 2 * r, block + 2, 2);
      for (int i = 0; i < 4; ++i) std::memcpy(dst + kNibbles + 32 * i + 4 * r, qs + 4 * i, 4);
      if (kFifthBit) {
        uint32_t qh;  // bit p: the 5th bit of value p
        std::memcpy(&qh, block + (kMin ? 4 : 2), sizeof(qh));
        uint32_t bits = 0;  // byte u bit i = bit 4i + u of qh
        for (int i = 0; i < 8; ++i) {
          const uint32_t four = (qh >> (4 * i)) & 0x0F;  // bits u = 0..3 to the low bit of byte u
          bits |= ((four & 1) | ((four & 2) << 7) | ((four & 4) << 14) | ((four & 8) << 21)) << i;
        }
        std::memcpy(dst + kNibbles + 128 + 4 * r, &bits, 4);
      }
    }
}

void repack_q8_0(const uint8_t* src, int64_t row_bytes, int64_t blocks, uint8_t* dst) {
  for (int64_t b = 0; b < blocks; ++b, dst += kQ8_0GroupBytes)
    for (int64_t r = 0; r < kRepackRows; ++r) {
      const uint8_t* block = src + r * row_bytes + b * 34;
      std::memcpy(dst + 2 * r, block, 2);
      for (int i = 0; i < 8; ++i) std::memcpy(dst + 16 + 32 * i + 4 * r, block + 2 + 4 * i, 4);
    }
}

// Q4_K, and Q5_K with its 5th bits after the nibbles: H_j (32 bytes per sub-block j) byte 4r + u, bit i =
// the 5th bit of row r's position 4i + u of sub-block j (the u-th byte of code vector i)
template <bool kFifthBit>
void repack_k_affine(const uint8_t* src, int64_t row_bytes, int64_t supers, uint8_t* dst) {
  constexpr int64_t kBlockBytes = kFifthBit ? 176 : 144, kGroupBytes = kFifthBit ? kQ5_KGroupBytes : kQ4_KGroupBytes;
  for (int64_t s = 0; s < supers; ++s, dst += kGroupBytes)
    for (int64_t r = 0; r < kRepackRows; ++r) {
      const uint8_t* block = src + r * row_bytes + s * kBlockBytes;
      const uint8_t* nibbles = block + (kFifthBit ? 48 : 16);
      std::memcpy(dst + 2 * r, block, 2);
      std::memcpy(dst + 16 + 2 * r, block + 2, 2);
      for (int j = 0; j < 8; ++j) {
        int sc, mn;
        k_scale_min(block + 4, j, sc, mn);
        dst[32 + 8 * j + r] = static_cast<uint8_t>(sc);
        dst[96 + 8 * j + r] = static_cast<uint8_t>(mn);
      }
      for (int c = 0; c < 4; ++c)
        for (int i = 0; i < 8; ++i) std::memcpy(dst + 160 + 256 * c + 32 * i + 4 * r, nibbles + 32 * c + 4 * i, 4);
      if (kFifthBit) {
        const uint8_t* qh = block + 16;  // bit j of qh[l]: the 5th bit of value 32j + l
        for (int j = 0; j < 8; ++j) {  // the 4 bytes u of lane r at once
          uint32_t bits = 0;
          for (int i = 0; i < 8; ++i) bits |= ((word_at(qh + 4 * i) >> j) & 0x01010101u) << i;
          std::memcpy(dst + kQ4_KGroupBytes + 32 * j + 4 * r, &bits, 4);
        }
      }
    }
}

// 4 bytes at a time in 32-bit words: a shift moves bits across bytes, but the masks keep each byte's own
void repack_q6_k(const uint8_t* src, int64_t row_bytes, int64_t supers, uint8_t* dst) {
  constexpr uint32_t kTwo = 0x03030303u;
  for (int64_t s = 0; s < supers; ++s, dst += kQ6_KGroupBytes)
    for (int64_t r = 0; r < kRepackRows; ++r) {
      const uint8_t* block = src + r * row_bytes + s * 210;
      std::memcpy(dst + 2 * r, block + 208, 2);
      for (int g = 0; g < 16; ++g) dst[16 + 8 * g + r] = block[192 + g];
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {  // chunk j: values 128 · half + 32t + l (unpack_q6_k's order)
        const int half = j / 4, t = j % 4, low_shift = t >= 2 ? 4 : 0, high_shift = 2 * t;
        const uint8_t* low = block + 64 * half + 32 * (t & 1);  // the low 4 bits of position l: low[l]
        const uint8_t* high = block + 128 + 32 * half;          // the high 2 bits: high[l] >> high_shift
        uint32_t codes[8];  // positions 4m .. 4m + 3, 0..63 each
        for (int m = 0; m < 8; ++m)
          codes[m] = ((word_at(low + 4 * m) >> low_shift) & 0x0F0F0F0Fu) |
                     (((word_at(high + 4 * m) >> high_shift) & kTwo) << 4);
        for (int h = 0; h < 2; ++h) {  // code vectors 4h .. 4h + 3 = codes[4h + k]
          const uint32_t fourth = codes[4 * h + 3];
          const uint32_t abc[3] = {codes[4 * h] | ((fourth & kTwo) << 6),
                                   codes[4 * h + 1] | (((fourth >> 2) & kTwo) << 6),
                                   codes[4 * h + 2] | (((fourth >> 4) & kTwo) << 6)};
          for (int v = 0; v < 3; ++v) std::memcpy(dst + 144 + 192 * j + 96 * h + 32 * v + 4 * r, &abc[v], 4);
        }
      }
    }
}

// ----- the inverse: 8 repacked rows back to the file's layout (prompts dequantize slices of it) -----
// Each writes the 8 rows' blocks of one group run in full (the K types' 6-bit sub-scales packed again; every
// bit of the file's blocks comes back, so unrepack(repack(w)) == w byte for byte).

template <int kLegacyType>
void unrepack_legacy(const uint8_t* src, int64_t row_bytes, int64_t blocks, uint8_t* dst) {
  constexpr bool kMin = kLegacyType == 3 || kLegacyType == 7, kFifthBit = kLegacyType == 6 || kLegacyType == 7;
  constexpr int64_t kBlockBytes = 18 + (kMin ? 2 : 0) + (kFifthBit ? 4 : 0), kGroupBytes = 8 * kBlockBytes;
  constexpr int64_t kNibbles = kMin ? 32 : 16;
  for (int64_t b = 0; b < blocks; ++b, src += kGroupBytes)
    for (int64_t r = 0; r < kRepackRows; ++r) {
      uint8_t* block = dst + r * row_bytes + b * kBlockBytes;
      uint8_t* qs = block + kBlockBytes - 16;
      std::memcpy(block, src + 2 * r, 2);
      if (kMin) std::memcpy(block + 2, src + 16 + 2 * r, 2);
      for (int i = 0; i < 4; ++i) std::memcpy(qs + 4 * i, src + kNibbles + 32 * i + 4 * r, 4);
      if (kFifthBit) {
        const uint32_t bits = word_at(src + kNibbles + 128 + 4 * r);  // byte u bit i = bit 4i + u of qh
        uint32_t qh = 0;
        for (int i = 0; i < 8; ++i)
          for (int u = 0; u < 4; ++u) qh |= ((bits >> (8 * u + i)) & 1u) << (4 * i + u);
        std::memcpy(block + (kMin ? 4 : 2), &qh, sizeof(qh));
      }
    }
}

void unrepack_q8_0(const uint8_t* src, int64_t row_bytes, int64_t blocks, uint8_t* dst) {
  for (int64_t b = 0; b < blocks; ++b, src += kQ8_0GroupBytes)
    for (int64_t r = 0; r < kRepackRows; ++r) {
      uint8_t* block = dst + r * row_bytes + b * 34;
      std::memcpy(block, src + 2 * r, 2);
      for (int i = 0; i < 8; ++i) std::memcpy(block + 2 + 4 * i, src + 16 + 32 * i + 4 * r, 4);
    }
}

// the 12 bytes of 6-bit sub-scales and mins that `k_scale_min` reads
inline void pack_k_scales(const uint8_t* sc, const uint8_t* mn, uint8_t* q) {
  for (int j = 0; j < 4; ++j) {
    q[j] = static_cast<uint8_t>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    q[j + 4] = static_cast<uint8_t>((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
    q[j + 8] = static_cast<uint8_t>((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4));
  }
}

template <bool kFifthBit>
void unrepack_k_affine(const uint8_t* src, int64_t row_bytes, int64_t supers, uint8_t* dst) {
  constexpr int64_t kBlockBytes = kFifthBit ? 176 : 144, kGroupBytes = kFifthBit ? kQ5_KGroupBytes : kQ4_KGroupBytes;
  for (int64_t s = 0; s < supers; ++s, src += kGroupBytes)
    for (int64_t r = 0; r < kRepackRows; ++r) {
      uint8_t* block = dst + r * row_bytes + s * kBlockBytes;
      uint8_t* nibbles = block + (kFifthBit ? 48 : 16);
      std::memcpy(block, src + 2 * r, 2);
      std::memcpy(block + 2, src + 16 + 2 * r, 2);
      uint8_t sc[8], mn[8];
      for (int j = 0; j < 8; ++j) sc[j] = src[32 + 8 * j + r], mn[j] = src[96 + 8 * j + r];
      pack_k_scales(sc, mn, block + 4);
      for (int c = 0; c < 4; ++c)
        for (int i = 0; i < 8; ++i) std::memcpy(nibbles + 32 * c + 4 * i, src + 160 + 256 * c + 32 * i + 4 * r, 4);
      if (kFifthBit) {
        uint8_t* qh = block + 16;  // bit j of qh[l]: the 5th bit of value 32j + l
        std::memset(qh, 0, 32);
        for (int j = 0; j < 8; ++j) {
          const uint32_t bits = word_at(src + kQ4_KGroupBytes + 32 * j + 4 * r);  // byte u bit i: qh[4i + u] bit j
          for (int i = 0; i < 8; ++i)
            for (int u = 0; u < 4; ++u) qh[4 * i + u] |= static_cast<uint8_t>(((bits >> (8 * u + i)) & 1u) << j);
        }
      }
    }
}

void unrepack_q6_k(const uint8_t* src, int64_t row_bytes, int64_t supers, uint8_t* dst) {
  constexpr uint32_t kTwo = 0x03030303u, kSix = 0x3F3F3F3Fu;
  for (int64_t s = 0; s < supers; ++s, src += kQ6_KGroupBytes)
    for (int64_t r = 0; r < kRepackRows; ++r) {
      uint8_t* block = dst + r * row_bytes + s * 210;
      std::memset(block, 0, 192);  // the code bits are ORed in below
      std::memcpy(block + 208, src + 2 * r, 2);
      for (int g = 0; g < 16; ++g) block[192 + g] = src[16 + 8 * g + r];
      for (int j = 0; j < 8; ++j) {
        const int half = j / 4, t = j % 4, low_shift = t >= 2 ? 4 : 0, high_shift = 2 * t;
        uint8_t* low = block + 64 * half + 32 * (t & 1);
        uint8_t* high = block + 128 + 32 * half;
        uint32_t codes[8];
        for (int h = 0; h < 2; ++h) {
          uint32_t abc[3], fourth = 0;
          for (int v = 0; v < 3; ++v) {
            abc[v] = word_at(src + 144 + 192 * j + 96 * h + 32 * v + 4 * r);
            codes[4 * h + v] = abc[v] & kSix;
            fourth |= ((abc[v] >> 6) & kTwo) << (2 * v);
          }
          codes[4 * h + 3] = fourth;
        }
        for (int m = 0; m < 8; ++m) {
          const uint32_t lo = (codes[m] & 0x0F0F0F0Fu) << low_shift, hi = ((codes[m] >> 4) & kTwo) << high_shift;
          uint32_t w = word_at(low + 4 * m) | lo;
          std::memcpy(low + 4 * m, &w, 4);
          w = word_at(high + 4 * m) | hi;
          std::memcpy(high + 4 * m, &w, 4);
        }
      }
    }
}

// bytes per 8 rows and block (super-block) of the repacked type, 0 for a type this build does not repack
int64_t repacked_group_bytes(int64_t type) {
#ifdef LLAMA3_GGML_AVX2
  switch (type) {
    case 2: return kQ4_0GroupBytes;
    case 3: return 160;  // Q4_1, Q5_0, Q5_1: 8 file blocks
    case 6: return 176;
    case 7: return 192;
    case 8: return kQ8_0GroupBytes;
    case 12: return kQ4_KGroupBytes;
    case 13: return kQ5_KGroupBytes;
    case 14: return kQ6_KGroupBytes;
    default: return 0;
  }
#else
  (void)type;
  return 0;  // the portable products read the file's own layout
#endif
}

// ----- activations: int8 per block of 32, plus exact sums per 16 -----

struct QuantizedX {
  std::vector<int8_t> q;        // (M, K)
  std::vector<float> scale;     // (M, K / 32)
  std::vector<float> group_sum;  // (M, K / 16)
  std::vector<float> block_sum;  // (M, K / 32): the two group sums of each block added
  std::vector<int32_t> q_sum;    // (M, K / 32): Σ of each block's int8 values (the repacked products' centring)
  std::vector<int32_t> q_pair;   // (M, K / 32): the Σ of its two halves as int16 pairs (low: values 0-15)
  std::vector<int32_t> q_mod4;   // (M, K / 32): 8 · Σ over positions 4i, 4i + 1 (low int16) and 4i + 2, 4i + 3
                                 // (high): the centring of a repacked Q4_K vpmaddubsw sum, taken off in int16
};

// One weight of a group multiplied with the same x: its bytes, type and the first column it writes in y
struct GroupPart {
  const uint8_t* data;
  int64_t type, rows, row_bytes, column;
};

QuantizedX quantize_x(const float* x, int64_t M, int64_t K) {
  QuantizedX out;
  out.q.resize(M * K);
  out.scale.resize(M * K / kXBlock);
  out.group_sum.resize(M * K / kGroup);
  out.block_sum.resize(M * K / kXBlock);
  out.q_sum.resize(M * K / kXBlock);
  out.q_pair.resize(M * K / kXBlock);
  out.q_mod4.resize(M * K / kXBlock);
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t b = 0; b < K / kXBlock; ++b) {
        const float* xb = x + m * K + b * kXBlock;
        float amax = 0.f;
        for (int k = 0; k < kXBlock; ++k) amax = std::max(amax, std::fabs(xb[k]));
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        int32_t halves[2] = {0, 0}, mod4[2] = {0, 0};  // |Σ| <= 16 · 127 (mod4: · 8): an int16 each
        for (int k = 0; k < kXBlock; ++k) {
          const int8_t q = static_cast<int8_t>(std::nearbyint(xb[k] * inv));
          out.q[m * K + b * kXBlock + k] = q;
          halves[k / kGroup] += q;
          mod4[(k % 4) / 2] += 8 * q;
        }
        out.q_mod4[m * K / kXBlock + b] =
            static_cast<int32_t>((static_cast<uint32_t>(mod4[1]) << 16) | (static_cast<uint32_t>(mod4[0]) & 0xFFFF));
        out.q_sum[m * K / kXBlock + b] = halves[0] + halves[1];
        out.q_pair[m * K / kXBlock + b] =
            static_cast<int32_t>((static_cast<uint32_t>(halves[1]) << 16) | (static_cast<uint32_t>(halves[0]) & 0xFFFF));
        out.scale[m * K / kXBlock + b] = amax / 127.f;
        for (int h = 0; h < 2; ++h) {
          float s = 0.f;
          for (int k = 0; k < kGroup; ++k) s += xb[h * kGroup + k];
          out.group_sum[m * K / kGroup + 2 * b + h] = s;
        }
        out.block_sum[m * K / kXBlock + b] = out.group_sum[m * K / kGroup + 2 * b] +
                                              out.group_sum[m * K / kGroup + 2 * b + 1];
      }
  });
  return out;
}

#ifdef LLAMA3_GGML_AVX2
// ----- AVX2: blocks decoded in registers, 32 codes at a time, each used for up to 8 rows of x -----
//
// A decoder turns chunk c (values 32c .. 32c + 31) of a weight row into 32 centred signed codes, the scales
// of its two halves and, for the affine types, one bias for the 32 (all their biases are per 32).

// 32 bytes, 0xFF where bit j of `bits` is set: byte j takes byte j / 8 of the word, then its bit j % 8
inline __m256i bits_to_bytes(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
  const __m256i select = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  return _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
}

// value j: the low nibble of p[j] for j < 16, the high nibble of p[j - 16] above
inline __m256i nibbles_16(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0F));
}

// the low (high = false) or high nibbles of 32 bytes
inline __m256i nibbles_32(const uint8_t* p, bool high) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if (high) v = _mm256_srli_epi16(v, 4);
  return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

// The legacy types (32-value blocks): chunk c is block c, one scale for its 32 codes
struct Chunk {
  __m256i codes;
  float scale, bias;
};

template <int kLegacyType>  // 2 Q4_0, 3 Q4_1, 6 Q5_0, 7 Q5_1, 8 Q8_0
struct LegacyDecoder {
  static constexpr int64_t kBytes = kLegacyType == 2 ? 18 : kLegacyType == 3 ? 20 : kLegacyType == 6 ? 22
                                    : kLegacyType == 7 ? 24 : 34;
  static constexpr bool kBias = kLegacyType == 3 || kLegacyType == 7;
  static Chunk chunk(const uint8_t* row, int64_t c) {
    const uint8_t* b = row + c * kBytes;
    const float d = f16_at(b);
    if (kLegacyType == 8) return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2)), d, 0.f};
    constexpr bool kFive = kLegacyType == 6 || kLegacyType == 7;
    constexpr int kCentre = kFive ? 16 : 8;
    __m256i q = nibbles_16(b + (kFive ? (kBias ? 8 : 6) : (kBias ? 4 : 2)));
    if (kFive) {
      uint32_t qh;
      std::memcpy(&qh, b + (kBias ? 4 : 2), sizeof(qh));
      q = _mm256_or_si256(q, _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10)));
    }
    q = _mm256_sub_epi8(q, _mm256_set1_epi8(kCentre));
    return {q, d, kBias ? f16_at(b + 2) + kCentre * d : 0.f};
  }
};

// Σ code · x over 32 bytes, per int32 lane (4 values each; lanes 0-3 hold values 0-15, lanes 4-7 values
// 16-31), each 16-bit pair sum multiplied by its lane of `scale16` (1 when there is no integer sub-scale).
// vpmaddubsw takes unsigned × signed bytes: |code| against x carrying the code's sign (x is never -128).
// Its pair sums stay far from int16 saturation: |code| <= 32 and |x| <= 127 give at most 8128.
inline __m256i dot_32(__m256i codes, __m256i abs_codes, const int8_t* x, __m256i scale16) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(abs_codes, _mm256_sign_epi8(xv, codes)), scale16);
}

// Accumulators per row of x: two chains of multiply-adds for one or two rows (the latency of one chain
// would bound the loop), one above (registers: AVX2 has 16).
template <int M>
constexpr int accumulators_for() { return M <= 2 ? 2 : 1; }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int A, int M>
inline void sum_rows(__m256 (&acc)[A][M], const float (&bias)[M], float* out) {
  for (int m = 0; m < M; ++m) {
    __m256 sum = acc[0][m];
    for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[a][m]);
    out[m] = hsum(sum) + bias[m];
  }
}

// out[m] = row w · row m0 + m of x, for M rows of x, each block of w decoded once (legacy types)
template <class D, int M>
inline void fused_row(const uint8_t* w, int64_t K, const QuantizedX& qx, int64_t m0, float* out) {
  constexpr int A = accumulators_for<M>();
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[A][M];
  float bias_acc[M];
  for (int m = 0; m < M; ++m) {
    for (int a = 0; a < A; ++a) acc[a][m] = _mm256_setzero_ps();
    bias_acc[m] = 0.f;
  }
  auto chunk = [&](int a, int64_t c) {
    const Chunk ch = D::chunk(w, c);
    const __m256i w_abs = _mm256_sign_epi8(ch.codes, ch.codes);
    for (int m = 0; m < M; ++m) {
      const int64_t row = m0 + m;
      const __m256i dot = dot_32(ch.codes, w_abs, qx.q.data() + row * K + c * kXBlock, ones);
      const __m256 scale = _mm256_set1_ps(ch.scale * qx.scale[row * K / kXBlock + c]);
      acc[a][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[a][m]);
      if (D::kBias) bias_acc[m] += ch.bias * qx.block_sum[row * K / kXBlock + c];
    }
  };
  const int64_t chunks = K / kXBlock;
  int64_t c = 0;
  for (; c + A <= chunks; c += A)  // the accumulator index a compile-time constant: they stay in registers
    for (int a = 0; a < A; ++a) chunk(a, c + a);
  for (; c < chunks; ++c) chunk(0, c);
  sum_rows(acc, bias_acc, out);
}

// ----- the K types: super-blocks of 256 values (8 chunks of 32) with one fp16 scale (and min) and 8 or 16
// integer sub-scales. A super-block's shared part is decoded once; the sub-scales multiply the byte
// products in integers (vpmaddwd), so each chunk costs one float multiply-add per row of x. -----

// the 8 6-bit sub-scales (mins = false) or mins (mins = true) of Q4_K / Q5_K as bytes 0-7 (k_scale_min's
// packing: entries 0-3 are the low 6 bits of bytes 0-3 / 4-7, entries 4-7 take their low 4 bits from bytes
// 8-11 and their top 2 bits from the top of bytes 0-3 / 4-7)
inline uint64_t k_six_bit(const uint8_t* packed, bool mins) {
  uint32_t first, second, third;
  std::memcpy(&first, packed, 4);
  std::memcpy(&second, packed + 4, 4);
  std::memcpy(&third, packed + 8, 4);
  const uint32_t own = mins ? second : first;
  const uint32_t low = own & 0x3F3F3F3Fu;
  const uint32_t high = ((mins ? third >> 4 : third) & 0x0F0F0F0Fu) | (((own >> 6) & 0x03030303u) << 4);
  return uint64_t(low) | (uint64_t(high) << 32);
}

template <bool kFifthBit>  // Q4_K, Q5_K
struct KAffineDecoder {
  static constexpr int64_t kBytes = kFifthBit ? 176 : 144;
  static constexpr int kCentre = kFifthBit ? 16 : 8;
  struct Super {
    float d;
    __m256 bias;      // lane j: chunk j's bias, kCentre · d · scale_j - dmin · min_j
    __m128i scales;   // byte j: chunk j's 6-bit scale
    __m256i high;     // Q5_K: the 5th bits (bit j of byte l: value 32j + l)
  };
  static Super super(const uint8_t* b) {
    Super s;
    s.d = f16_at(b);
    s.scales = _mm_cvtsi64_si128(static_cast<int64_t>(k_six_bit(b + 4, false)));
    const __m256 scales = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(s.scales));
    const __m256 mins =
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(k_six_bit(b + 4, true)))));
    s.bias = _mm256_fmsub_ps(_mm256_set1_ps(kCentre * s.d), scales, _mm256_mul_ps(_mm256_set1_ps(f16_at(b + 2)), mins));
    s.high = kFifthBit ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16)) : _mm256_setzero_si256();
    return s;
  }
  static __m256i codes(const Super& s, const uint8_t* b, int j) {
    __m256i q = nibbles_32(b + (kFifthBit ? 48 : 16) + 32 * (j / 2), j % 2 == 1);
    if (kFifthBit) {
      const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(s.high, _mm_cvtsi32_si128(j)), _mm256_set1_epi8(1));
      q = _mm256_or_si256(q, _mm256_slli_epi16(bit, 4));
    }
    return _mm256_sub_epi8(q, _mm256_set1_epi8(kCentre));
  }
  // every 16-bit lane: scale j (byte j, the byte above it zero)
  static __m256i scale16(const Super& s, int j) {
    const __m128i v = _mm_shuffle_epi8(s.scales, _mm_set1_epi16(static_cast<int16_t>(0x8000 | j)));
    return _mm256_broadcastsi128_si256(v);
  }
};

struct Q6KDecoder {
  static constexpr int64_t kBytes = 210;
  struct Super {
    float d;
    __m256 bias;     // unused (symmetric)
    __m128i scales;  // the 16 signed 8-bit sub-scales, one per 16 values
    __m256i high;    // unused (the 2 high bits are read per half below)
  };
  static Super super(const uint8_t* b) {
    return {f16_at(b + 208), _mm256_setzero_ps(), _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192)),
            _mm256_setzero_si256()};
  }
  static __m256i codes(const Super&, const uint8_t* b, int j) {
    const int half = j / 4, t = j % 4;  // values 128·half + 32t + l
    const __m256i low = nibbles_32(b + 64 * half + 32 * (t & 1), t >= 2);
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * half));
    const __m256i high = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * t)), _mm256_set1_epi8(3));
    return _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)), _mm256_set1_epi8(32));
  }
  // 16-bit lanes 0-7: sub-scale 2j (values 0-15 of the chunk), lanes 8-15: sub-scale 2j + 1
  static __m256i scale16(const Super& s, int j) {
    const __m128i pick = _mm_set_epi64x(static_cast<int64_t>(0x0101010101010101ULL * uint64_t(2 * j + 1)),
                                        static_cast<int64_t>(0x0101010101010101ULL * uint64_t(2 * j)));
    return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(s.scales, pick));
  }
};

template <class D>
constexpr bool has_bias() { return !std::is_same_v<D, Q6KDecoder>; }

// out[m] = row w · row m0 + m of x for a K type: per super-block the scales once, then per chunk of 32
// one integer dot product (sub-scales included) and one multiply-add by d · (x's block scale) per row
template <class D, int M>
inline void k_row(const uint8_t* w, int64_t K, const QuantizedX& qx, int64_t m0, float* out) {
  constexpr int A = accumulators_for<M>();
  __m256 acc[A][M];
  const float no_bias[M] = {};
  for (int m = 0; m < M; ++m)
    for (int a = 0; a < A; ++a) acc[a][m] = _mm256_setzero_ps();
  alignas(32) float dx[M][8];  // d · x's block scale, per row of x and chunk of the super-block
  for (int64_t sb = 0; sb < K / 256; ++sb) {
    const uint8_t* b = w + sb * D::kBytes;
    const typename D::Super s = D::super(b);
    for (int m = 0; m < M; ++m) {
      const int64_t blocks = (m0 + m) * K / kXBlock + sb * 8;
      _mm256_store_ps(dx[m], _mm256_mul_ps(_mm256_set1_ps(s.d), _mm256_loadu_ps(qx.scale.data() + blocks)));
      if (has_bias<D>())  // Σ_j bias_j · (exact sum of x over chunk j), into the same accumulator
        acc[0][m] = _mm256_fmadd_ps(s.bias, _mm256_loadu_ps(qx.block_sum.data() + blocks), acc[0][m]);
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m256i codes = D::codes(s, b, j);
      const __m256i w_abs = _mm256_sign_epi8(codes, codes);
      const __m256i scale16 = D::scale16(s, j);
      for (int m = 0; m < M; ++m) {
        const __m256i dot = dot_32(codes, w_abs, qx.q.data() + (m0 + m) * K + sb * 256 + 32 * j, scale16);
        acc[j % A][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(&dx[m][j]), acc[j % A][m]);
      }
    }
  }
  sum_rows(acc, no_bias, out);
}

template <class D>
struct IsK : std::false_type {};
template <bool kFifthBit>
struct IsK<KAffineDecoder<kFifthBit>> : std::true_type {};
template <>
struct IsK<Q6KDecoder> : std::true_type {};

template <class D, int M>
inline void any_row(const uint8_t* w, int64_t K, const QuantizedX& qx, int64_t m0, float* out) {
  if constexpr (IsK<D>::value) {
    k_row<D, M>(w, K, qx, m0, out);
  } else {
    fused_row<D, M>(w, K, qx, m0, out);
  }
}

// ----- products on repacked weights (see ggml_repack above): 8 weight rows per vector, M rows of x -----

inline __m256i broadcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, sizeof(v));
  return _mm256_set1_epi32(v);
}

// Σ over 8 code vectors of codes · (4 x bytes broadcast) in int16 (see the bound above), x at 4-byte steps
// given by `offset(i)`
template <class Offset>
inline __m256i codes_dot_16(const __m256i (&codes)[8], const int8_t* x, Offset offset) {
  __m256i s = _mm256_maddubs_epi16(codes[0], broadcast4(x + offset(0)));
  for (int i = 1; i < 8; ++i) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(codes[i], broadcast4(x + offset(i))));
  return s;
}

// Decode (one row of x) streams each weight byte once, and one core's hardware prefetcher alone keeps too
// few cache lines in flight: asking for the lines 4 KB ahead of the ones being multiplied made the
// repacked products of matrices larger than L3 1.5-1.6x faster on one Zen 3 core (Q4_0 21 -> 32, Q4_K
// 18 -> 29, Q6_K 11 -> 19 GMAC/s; 2 KB and 8 KB measured alike). A prefetch never faults, so the lines
// past the end of the weight cost nothing but the request.
constexpr int64_t kPrefetchAhead = 4096;

inline void prefetch_ahead(const uint8_t* p, int64_t bytes) {
  for (int64_t l = 0; l < bytes; l += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchAhead + l), _MM_HINT_T0);
}

// y[m0 + m, n .. n + 7] for one group of 8 Q4_0 rows, M rows of x
template <int M>
void q4_0x8(const uint8_t* g, int64_t K, const QuantizedX& qx, int64_t m0, float* y, int64_t ldy) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  const int64_t blocks = K / kXBlock;
  for (int64_t b = 0; b < blocks; ++b, g += kQ4_0GroupBytes) {
    if (M == 1 && b % 4 == 0) prefetch_ahead(g, 4 * kQ4_0GroupBytes);
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g)));
    __m256i codes[8];  // 0-3: positions 4i .. 4i + 3 of each row; 4-7: 16 + 4i ..
    for (int i = 0; i < 4; ++i) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + 16 + 32 * i));
      codes[i] = _mm256_and_si256(v, low);
      codes[4 + i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
    for (int m = 0; m < M; ++m) {
      const int64_t block = (m0 + m) * blocks + b;
      const int8_t* xb = qx.q.data() + block * kXBlock;
      const __m256i s = codes_dot_16(codes, xb, [](int i) { return i < 4 ? 4 * i : 16 + 4 * (i - 4); });
      const __m256i dot = _mm256_sub_epi32(_mm256_madd_epi16(s, ones), _mm256_set1_epi32(8 * qx.q_sum[block]));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, _mm256_set1_ps(qx.scale[block])), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) _mm256_storeu_ps(y + m * ldy, acc[m]);
}

// the same for Q4_1, Q5_0, Q5_1: the 5th bits ORed into the codes (Q5_K's way), the centring (8 or 16 ·
// Σ x_int8 over the same positions) taken off in int16 as Q4_K's, and (Q4_1, Q5_1) the bias m + centre · d
// times x's exact block sum, as the file-layout kernel forms it
template <int kLegacyType, int M>
void legacy_x8(const uint8_t* g, int64_t K, const QuantizedX& qx, int64_t m0, float* y, int64_t ldy) {
  constexpr bool kMin = kLegacyType != 6, kFifthBit = kLegacyType != 3;
  constexpr int64_t kGroupBytes = 8 * (18 + (kMin ? 2 : 0) + (kFifthBit ? 4 : 0)), kNibbles = kMin ? 32 : 16;
  const __m256i low = _mm256_set1_epi8(0x0F), fifth = _mm256_set1_epi8(0x10), ones = _mm256_set1_epi16(1);
  const __m256 centre = _mm256_set1_ps(kFifthBit ? 16.f : 8.f);
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  const int64_t blocks = K / kXBlock;
  for (int64_t b = 0; b < blocks; ++b, g += kGroupBytes) {
    if (M == 1 && b % 4 == 0) prefetch_ahead(g, 4 * kGroupBytes);
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g)));
    __m256 bias = _mm256_setzero_ps();
    if constexpr (kMin)
      bias = _mm256_fmadd_ps(centre, d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + 16))));
    __m256i codes[8];  // vector i: positions 4i .. 4i + 3 of each row
    for (int i = 0; i < 4; ++i) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + kNibbles + 32 * i));
      codes[i] = _mm256_and_si256(v, low);
      codes[4 + i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
    if constexpr (kFifthBit) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + kNibbles + 128));
      for (int i = 0; i < 8; ++i) {
        const __m256i at4 = i < 4 ? _mm256_slli_epi16(h, 4 - i) : i == 4 ? h : _mm256_srli_epi16(h, i - 4);
        codes[i] = _mm256_or_si256(codes[i], _mm256_and_si256(at4, fifth));
      }
    }
    for (int m = 0; m < M; ++m) {
      const int64_t block = (m0 + m) * blocks + b;
      const __m256i s = codes_dot_16(codes, qx.q.data() + block * kXBlock, [](int i) { return 4 * i; });
      __m256i centring = _mm256_set1_epi32(qx.q_mod4[block]);  // 8 · Σ x_int8 per position pair
      if (kFifthBit) centring = _mm256_add_epi16(centring, centring);
      const __m256i dot = _mm256_madd_epi16(_mm256_sub_epi16(s, centring), ones);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, _mm256_set1_ps(qx.scale[block])), acc[m]);
      if (kMin) acc[m] = _mm256_fmadd_ps(bias, _mm256_set1_ps(qx.block_sum[block]), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) _mm256_storeu_ps(y + m * ldy, acc[m]);
}

// the same for Q8_0: signed codes, |code| against x with the code's sign, each vector's pair sums to int32
template <int M>
void q8_0x8(const uint8_t* g, int64_t K, const QuantizedX& qx, int64_t m0, float* y, int64_t ldy) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  const int64_t blocks = K / kXBlock;
  for (int64_t b = 0; b < blocks; ++b, g += kQ8_0GroupBytes) {
    if (M == 1) prefetch_ahead(g, kQ8_0GroupBytes);
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g)));
    __m256i codes[8];
    for (int i = 0; i < 8; ++i) codes[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + 16 + 32 * i));
    for (int m = 0; m < M; ++m) {
      const int64_t block = (m0 + m) * blocks + b;
      const int8_t* xb = qx.q.data() + block * kXBlock;
      __m256i sum = _mm256_setzero_si256();
      for (int i = 0; i < 8; ++i) {
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(codes[i], codes[i]),
                                                   _mm256_sign_epi8(broadcast4(xb + 4 * i), codes[i]));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, ones));
      }
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(d, _mm256_set1_ps(qx.scale[block])), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) _mm256_storeu_ps(y + m * ldy, acc[m]);
}

// the same for Q4_K and Q5_K: per sub-block j the int16 sums with their centring (centre · Σ x_int8 over the
// same positions, from qx.q_mod4) taken off in int16, times the sub-scale in the same vpmaddwd; the bias
// (centre · d · scale - dmin · min, as the file-layout kernel forms it) times x's exact block sum. The
// int16 sums may wrap (Q5_K: 8 products of up to 2 · 31 · 127 each), but the centred sum over 16 values
// fits (|q - centre| <= 8 or 16: <= 16 · 16 · 127 = 32512), so the wrapping adds leave it exact. One and two
// rows of x sum a super-block's chunks in float before one multiply by d (registers allow it there).
template <bool kFifthBit, int M>
void k_affine_x8(const uint8_t* g, int64_t K, const QuantizedX& qx, int64_t m0, float* y, int64_t ldy) {
  constexpr bool kSuperSum = M <= 2;
  constexpr int64_t kGroupBytes = kFifthBit ? kQ5_KGroupBytes : kQ4_KGroupBytes;
  const __m256i low = _mm256_set1_epi8(0x0F), fifth = _mm256_set1_epi8(0x10);
  // byte r of 8 broadcast to both int16 halves of 32-bit lane r (the high bytes zero): rows 0-3 in the
  // low 128-bit lane, 4-7 in the high one
  const __m256i spread = _mm256_set_epi8(-128, 7, -128, 7, -128, 6, -128, 6, -128, 5, -128, 5, -128, 4, -128, 4,
                                         -128, 3, -128, 3, -128, 2, -128, 2, -128, 1, -128, 1, -128, 0, -128, 0);
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  const int64_t blocks = K / kXBlock;
  for (int64_t sb = 0; sb < K / 256; ++sb, g += kGroupBytes) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g)));
    const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + 16)));
    const __m256 d_centre = _mm256_mul_ps(d, _mm256_set1_ps(kFifthBit ? 16.f : 8.f));
    if (M == 1) prefetch_ahead(g, kGroupBytes);
    __m256 part[M];  // kSuperSum: Σ over the super-block's chunks of the integer sums times x's block scale
    for (int m = 0; m < M; ++m) part[m] = _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const uint8_t* packed = g + 160 + 256 * (j / 2);
      __m256i codes[8];
      for (int i = 0; i < 8; ++i) {
        __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + 32 * i));
        if (j % 2) v = _mm256_srli_epi16(v, 4);
        codes[i] = _mm256_and_si256(v, low);
      }
      if constexpr (kFifthBit) {  // bit i of H_j to bit 4 of code vector i (16-bit shifts, masked per byte)
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + kQ4_KGroupBytes + 32 * j));
        for (int i = 0; i < 8; ++i) {
          const __m256i at4 = i < 4 ? _mm256_slli_epi16(h, 4 - i) : i == 4 ? h : _mm256_srli_epi16(h, i - 4);
          codes[i] = _mm256_or_si256(codes[i], _mm256_and_si256(at4, fifth));
        }
      }
      int64_t sc_bytes;
      std::memcpy(&sc_bytes, g + 32 + 8 * j, sizeof(sc_bytes));
      const __m256i sc16 = _mm256_shuffle_epi8(_mm256_set1_epi64x(sc_bytes), spread);
      const __m256 scales = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(sc_bytes)));
      const __m256 mins = _mm256_cvtepi32_ps(
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(g + 96 + 8 * j))));
      const __m256 bias = _mm256_fmsub_ps(d_centre, scales, _mm256_mul_ps(dmin, mins));
      for (int m = 0; m < M; ++m) {
        const int64_t block = (m0 + m) * blocks + sb * 8 + j;
        const __m256i s = codes_dot_16(codes, qx.q.data() + block * kXBlock, [](int i) { return 4 * i; });
        __m256i centring = _mm256_set1_epi32(qx.q_mod4[block]);  // 8 · Σ x_int8 per position pair
        if (kFifthBit) centring = _mm256_add_epi16(centring, centring);
        const __m256i centred = _mm256_sub_epi16(s, centring);
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(centred, sc16));
        if constexpr (kSuperSum) {
          part[m] = _mm256_fmadd_ps(dot, _mm256_set1_ps(qx.scale[block]), part[m]);
        } else {
          acc[m] = _mm256_fmadd_ps(dot, _mm256_mul_ps(d, _mm256_set1_ps(qx.scale[block])), acc[m]);
        }
        acc[m] = _mm256_fmadd_ps(bias, _mm256_set1_ps(qx.block_sum[block]), acc[m]);
      }
    }
    if constexpr (kSuperSum)
      for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(d, part[m], acc[m]);
  }
  for (int m = 0; m < M; ++m) _mm256_storeu_ps(y + m * ldy, acc[m]);
}

// the same for Q6_K: 6-bit codes from the A, B, C vectors (see ggml_repack), sub-scales per 16 values
// sign-extended from a byte shuffle (the byte to the high half of each int16, then an arithmetic shift)
template <int M>
void q6_kx8(const uint8_t* g, int64_t K, const QuantizedX& qx, int64_t m0, float* y, int64_t ldy) {
  const __m256i six = _mm256_set1_epi8(0x3F), b01 = _mm256_set1_epi8(0x03), b23 = _mm256_set1_epi8(0x0C),
                b45 = _mm256_set1_epi8(0x30);
  // from the 16 sub-scale bytes (A: rows 0-7, then B: rows 0-7) in both 128-bit lanes, 32-bit lane r (row r,
  // or 4 + r in the high 128 bits) gets (A_r, A_r), (B_r, B_r) or (A_r, B_r) as int16 · 256
  auto pick = [](int first, int second) {
    return _mm256_set_epi8(second + 7, -128, first + 7, -128, second + 6, -128, first + 6, -128, second + 5, -128,
                           first + 5, -128, second + 4, -128, first + 4, -128, second + 3, -128, first + 3, -128,
                           second + 2, -128, first + 2, -128, second + 1, -128, first + 1, -128, second, -128, first,
                           -128);
  };
  const __m256i pick_a = pick(0, 0), pick_b = pick(8, 8), pick_ab = pick(0, 8);
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  const int64_t blocks = K / kXBlock;
  for (int64_t sb = 0; sb < K / 256; ++sb, g += kQ6_KGroupBytes) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g)));
    if (M == 1) prefetch_ahead(g, kQ6_KGroupBytes);
    for (int j = 0; j < 8; ++j) {
      const uint8_t* chunk = g + 144 + 192 * j;
      __m256i codes[8];
      for (int h = 0; h < 2; ++h) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 96 * h));
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 96 * h + 32));
        const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 96 * h + 64));
        codes[4 * h] = _mm256_and_si256(a, six);
        codes[4 * h + 1] = _mm256_and_si256(b, six);
        codes[4 * h + 2] = _mm256_and_si256(c, six);
        // 16-bit shifts: what moves across bytes is masked off
        const __m256i bits01 = _mm256_and_si256(_mm256_srli_epi16(a, 6), b01);
        const __m256i bits23 = _mm256_and_si256(_mm256_srli_epi16(b, 4), b23);
        const __m256i bits45 = _mm256_and_si256(_mm256_srli_epi16(c, 2), b45);
        codes[4 * h + 3] = _mm256_or_si256(_mm256_or_si256(bits01, bits23), bits45);
      }
      const __m256i sub =
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + 16 + 16 * j)));
      const __m256i sa = _mm256_srai_epi16(_mm256_shuffle_epi8(sub, pick_a), 8);
      const __m256i sb16 = _mm256_srai_epi16(_mm256_shuffle_epi8(sub, pick_b), 8);
      // (A_r, B_r) · 32 for the centring: |32 · s| <= 4096
      const __m256i pair32 = _mm256_slli_epi16(_mm256_srai_epi16(_mm256_shuffle_epi8(sub, pick_ab), 8), 5);
      for (int m = 0; m < M; ++m) {
        const int64_t block = (m0 + m) * blocks + sb * 8 + j;
        const int8_t* xb = qx.q.data() + block * kXBlock;
        auto two = [&](int v, int offset) {  // code vectors v, v + 1 against x at offset, offset + 4
          return _mm256_add_epi16(_mm256_maddubs_epi16(codes[v], broadcast4(xb + offset)),
                                  _mm256_maddubs_epi16(codes[v + 1], broadcast4(xb + offset + 4)));
        };
        const __m256i sum = _mm256_add_epi32(
            _mm256_add_epi32(_mm256_madd_epi16(two(0, 0), sa), _mm256_madd_epi16(two(2, 8), sa)),
            _mm256_add_epi32(_mm256_madd_epi16(two(4, 16), sb16), _mm256_madd_epi16(two(6, 24), sb16)));
        const __m256i dot = _mm256_sub_epi32(sum, _mm256_madd_epi16(pair32, _mm256_set1_epi32(qx.q_pair[block])));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, _mm256_set1_ps(qx.scale[block])), acc[m]);
      }
    }
  }
  for (int m = 0; m < M; ++m) _mm256_storeu_ps(y + m * ldy, acc[m]);
}

// Rows x passes of the repacked layout: M rows of x at a time (4 keep the codes, 4 accumulators and the
// int16 sums in the 16 registers), over tiles of 16 weight rows (two groups, ~18 KB per 1024 values)
template <int kType>
void run_repacked(const uint8_t* wp, int64_t row_bytes, int64_t n0, int64_t n1, int64_t K, const QuantizedX& qx,
                  int64_t M, float* yp, int64_t ldy) {
  const int64_t group_bytes = kRepackRows * row_bytes;
  for (int64_t t0 = n0; t0 < n1; t0 += kTileRows) {
    const int64_t t1 = std::min(n1, t0 + kTileRows);
    for (int64_t m0 = 0; m0 < M;) {
      const int64_t step = std::min<int64_t>(M - m0, 4);
      for (int64_t n = t0; n < t1; n += kRepackRows) {
        const uint8_t* g = wp + n / kRepackRows * group_bytes;
        float* y = yp + m0 * ldy + n;
        auto fn = [&]<int S>() {
          if constexpr (kType == 2) q4_0x8<S>(g, K, qx, m0, y, ldy);
          else if constexpr (kType == 3 || kType == 6 || kType == 7) legacy_x8<kType, S>(g, K, qx, m0, y, ldy);
          else if constexpr (kType == 8) q8_0x8<S>(g, K, qx, m0, y, ldy);
          else if constexpr (kType == 12) k_affine_x8<false, S>(g, K, qx, m0, y, ldy);
          else if constexpr (kType == 13) k_affine_x8<true, S>(g, K, qx, m0, y, ldy);
          else q6_kx8<S>(g, K, qx, m0, y, ldy);
        };
        switch (step) {
          case 4: fn.template operator()<4>(); break;
          case 3: fn.template operator()<3>(); break;
          case 2: fn.template operator()<2>(); break;
          default: fn.template operator()<1>(); break;
        }
      }
      m0 += step;
    }
  }
}

// Bytes of weight rows per run handed to a thread (AVX2 path), as in gemv.cpp: long runs stream fastest, and
// a small matrix still needs several runs per thread to share the work out.
constexpr int64_t kMinRunBytes = 64 * 1024;
constexpr int64_t kMaxRunBytes = 1024 * 1024;
constexpr int64_t kRunsPerThread = 8;

// rows [n0, n1) of one weight against all M rows of x, in tiles of 16 rows against x in passes of 8, 4, 2, 1
// rows; row n of w lands in column n of y, whose rows are `ldy` floats apart
template <class D>
void run_rows(const uint8_t* wp, int64_t row_bytes, int64_t n0, int64_t n1, int64_t K, const QuantizedX& qx,
              int64_t M, float* yp, int64_t ldy) {
  float out[8];
  for (int64_t t0 = n0; t0 < n1; t0 += kTileRows) {
    const int64_t t1 = std::min(n1, t0 + kTileRows);
    for (int64_t m0 = 0; m0 < M;) {
      const int64_t left = M - m0, step = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
      for (int64_t n = t0; n < t1; ++n) {
        const uint8_t* w = wp + n * row_bytes;
        switch (step) {
          case 8: any_row<D, 8>(w, K, qx, m0, out); break;
          case 4: any_row<D, 4>(w, K, qx, m0, out); break;
          case 2: any_row<D, 2>(w, K, qx, m0, out); break;
          default: any_row<D, 1>(w, K, qx, m0, out); break;
        }
        for (int64_t i = 0; i < step; ++i) yp[(m0 + i) * ldy + n] = out[i];
      }
      m0 += step;
    }
  }
}

using RunFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, int64_t, const QuantizedX&, int64_t, float*,
                       int64_t);

RunFn run_fn(int64_t type) {
  switch (type) {
    case 2 | kRepackedFlag: return run_repacked<2>;
    case 3 | kRepackedFlag: return run_repacked<3>;
    case 6 | kRepackedFlag: return run_repacked<6>;
    case 7 | kRepackedFlag: return run_repacked<7>;
    case 8 | kRepackedFlag: return run_repacked<8>;
    case 12 | kRepackedFlag: return run_repacked<12>;
    case 13 | kRepackedFlag: return run_repacked<13>;
    case 14 | kRepackedFlag: return run_repacked<14>;
    case 2: return run_rows<LegacyDecoder<2>>;
    case 3: return run_rows<LegacyDecoder<3>>;
    case 6: return run_rows<LegacyDecoder<6>>;
    case 7: return run_rows<LegacyDecoder<7>>;
    case 8: return run_rows<LegacyDecoder<8>>;
    case 12: return run_rows<KAffineDecoder<false>>;
    case 13: return run_rows<KAffineDecoder<true>>;
    default: return run_rows<Q6KDecoder>;
  }
}

// ----- the products' own thread pool: workers that spin a bounded time before they sleep -----
//
// A decode step is ~7 products per layer, back to back with a little work between them. Torch's OpenMP pool
// under OMP_WAIT_POLICY=PASSIVE (what the commands set, because spinning OpenMP threads collapse a busy
// machine) puts its threads to sleep at the end of every parallel region, and waking them costs ~0.3-0.5 ms
// per product on the VMs measured, against 0.1-1 ms of work. These workers instead spin (with pause) for
// LLAMA3_GGML_SPIN_US microseconds after a product, so the next one finds them awake, then sleep on a futex
// (opt-in: see spin_us_setting).
// And unlike an OpenMP region the caller never waits for a worker that has not started: the work is runs
// taken from a shared counter, a worker joins a product only while it is open, and the caller closes it
// once its own share is done and the runs that workers took are finished. A worker the OS does not
// schedule (a busy machine) costs nothing but its share, which the caller takes.

class SpinPool {
 public:
  // Run fn(ctx) on the calling thread and on up to `helpers` workers at once; fn must take its work from
  // a shared counter (so any number of callers, the caller alone included, finish it). A second caller
  // while one product runs (two Python threads) runs its own alone.
  void run(void (*fn)(void*), void* ctx, int64_t helpers, int64_t spin_us) {
    std::unique_lock<std::mutex> busy(running_, std::try_to_lock);
    if (!busy.owns_lock()) return fn(ctx);
    ensure_workers(helpers, spin_us);
    fn_ = fn, ctx_ = ctx;
    helpers_.store(helpers, std::memory_order_relaxed);
    const uint32_t gen = gen_.load(std::memory_order_relaxed) + 1;
    state_.store(uint64_t(gen) << 32, std::memory_order_release);  // open, nobody joined
    gen_.store(gen, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) gen_.notify_all();
    fn(ctx);
    for (int i = 1;; ++i) {  // close: once no worker is inside, none may join any more
      uint64_t s = state_.load(std::memory_order_acquire);
      if ((s & kActive) == 0 && state_.compare_exchange_weak(s, s | kClosed, std::memory_order_acq_rel)) break;
      if (i % 1024 == 0) std::this_thread::yield();  // a worker inside was descheduled: let it finish
      _mm_pause();
    }
  }

 private:
  static constexpr uint64_t kClosed = 1ull << 31, kActive = kClosed - 1;

  void ensure_workers(int64_t helpers, int64_t spin_us) {
    spin_us_.store(spin_us, std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(grow_);
    while (static_cast<int64_t>(workers_) < helpers) {
      std::thread([this] { work(); }).detach();  // lives as long as the process (the pool is never freed)
      ++workers_;
    }
  }

  bool join(uint32_t gen) {
    uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      if (uint32_t(s >> 32) != gen || (s & kClosed) || int64_t(s & kActive) >= helpers_.load(std::memory_order_relaxed))
        return false;
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) return true;
    }
  }

  void work() {
    uint32_t seen = gen_.load(std::memory_order_acquire);
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_.load());
      for (int i = 0; gen_.load(std::memory_order_acquire) == seen; ++i) {
        if ((i & 63) == 63 && std::chrono::steady_clock::now() >= until) {
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          gen_.wait(seen, std::memory_order_seq_cst);
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        } else {
          _mm_pause();
        }
      }
      seen = gen_.load(std::memory_order_acquire);
      if (join(seen)) {
        fn_(ctx_);
        state_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::atomic<uint32_t> gen_{0};
  std::atomic<uint64_t> state_{uint64_t(0) | kClosed};  // generation << 32 | closed | workers inside
  std::atomic<int> sleepers_{0};
  std::atomic<int64_t> spin_us_{0};
  void (*fn_)(void*) = nullptr;
  void* ctx_ = nullptr;
  std::atomic<int64_t> helpers_{0};
  std::mutex running_, grow_;
  size_t workers_ = 0;
};

// LLAMA3_GGML_SPIN_US=N runs the products on this pool, its workers spinning N microseconds for the next
// product before they sleep (default 200); "off" runs them on torch's own thread pool. Measured on the 2-core
// machine (BENCHMARKS.md), spinning 200 us made a 1B Q4_0 decode 12% faster when quiet and 5% faster beside
// one busy process, but 1.2-2.3x slower on a machine already loaded ~3x over its cores. Read once.
constexpr int64_t kTorchPool = -1;
constexpr int64_t kDefaultSpinUs = 200;

int64_t spin_us_setting() {
  static const int64_t value = [] {
    const char* text = std::getenv("LLAMA3_GGML_SPIN_US");
    if (text == nullptr || *text == '\0') return kDefaultSpinUs;
    if (std::string(text) == "off") return kTorchPool;
    char* end = nullptr;
    const long long us = std::strtoll(text, &end, 10);
    TORCH_CHECK(*end == '\0' && us >= 0 && us <= 1000000, "LLAMA3_GGML_SPIN_US=", text,
                " is not a number of microseconds from 0 to 1000000 or 'off'; unset it for the default (200)");
    return static_cast<int64_t>(us);
  }();
  return value;
}

SpinPool& spin_pool() {
  static SpinPool* pool = new SpinPool();  // never destroyed: its detached workers may outlive static teardown
  return *pool;
}

// One run of consecutive rows of one of the group's weights
struct Run {
  int64_t part, n0, n1;
};

// y (M, ΣN) = x · [W_0 | W_1 | ...]ᵀ: the runs of every weight of the group dealt to the threads as they come
// free from one shared counter (on a shared machine one core is often slower than the other for a while, and
// a fixed split would make the fast one wait), all in ONE parallel region: waking the pool costs more than a
// small product's work when its threads sleep between products
void fused_matmul(const std::vector<GroupPart>& parts, int64_t K, const QuantizedX& qx, int64_t M, float* yp,
                  int64_t ldy) {
  const int64_t threads = at::get_num_threads();
  std::vector<Run> runs;
  for (int64_t p = 0; p < static_cast<int64_t>(parts.size()); ++p) {
    const GroupPart& g = parts[p];
    const int64_t run_bytes = std::clamp(g.rows * g.row_bytes / (threads * kRunsPerThread), kMinRunBytes,
                                         kMaxRunBytes);
    const int64_t run_rows = std::max<int64_t>(1, run_bytes / g.row_bytes / kTileRows) * kTileRows;
    for (int64_t n0 = 0; n0 < g.rows; n0 += run_rows) runs.push_back({p, n0, std::min(g.rows, n0 + run_rows)});
  }
  const int64_t count = static_cast<int64_t>(runs.size());
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t r = next.fetch_add(1); r < count; r = next.fetch_add(1)) {
      const GroupPart& g = parts[runs[r].part];
      run_fn(g.type)(g.data, g.row_bytes, runs[r].n0, runs[r].n1, K, qx, M, yp + g.column, ldy);
    }
  };
  const int64_t spin_us = spin_us_setting();
  const int64_t helpers = std::min(threads, count) - 1;
  if (helpers <= 0 || at::in_parallel_region()) {
    work();
  } else if (spin_us == kTorchPool) {
    at::parallel_for(0, helpers + 1, 1, [&](int64_t, int64_t) { work(); });
  } else {
    using Work = decltype(work);
    spin_pool().run([](void* ctx) { (*static_cast<Work*>(ctx))(); }, &work, helpers, spin_us);
  }
}
#endif

// ----- portable: one dot product: an unpacked weight row against one quantized row of x -----

// Σ_g bias[g] · group_sum[g]
inline float bias_term(const float* bias, const float* sums, int64_t groups) {
  float s = 0.f;
  for (int64_t g = 0; g < groups; ++g) s += bias[g] * sums[g];
  return s;
}

#ifndef LLAMA3_GGML_AVX2
template <bool kBias>
inline float dot_row(const RowView& w, const int8_t* xq, const float* xs, const float* sums, int64_t K) {
  float s = 0.f;
  for (int64_t g = 0; g < K / kGroup; ++g) {
    int32_t dot = 0;
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; ++k) dot += int32_t(w.codes[k]) * int32_t(xq[k]);
    s += static_cast<float>(dot) * w.scale[g] * xs[g / 2];
  }
  return kBias ? s + bias_term(w.bias, sums, K / kGroup) : s;
}
#endif

// w checked against its type and K: returns the part it makes of a group, writing from column `column`
GroupPart check_part(const char* op, const at::Tensor& w, int64_t type, int64_t K, int64_t column) {
  const bool repacked = (type & kRepackedFlag) != 0;
  const int64_t base = type & ~kRepackedFlag;
  const Format* f = format_of(base);
  TORCH_CHECK(f != nullptr, op, ": ggml type ", type, " is not one of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K");
  TORCH_CHECK(!repacked || repacked_group_bytes(base) > 0, op, ": ", f->name,
              " is not repacked by this build's kernels (ggml_repack_block_bytes says which types are)");
  TORCH_CHECK(w.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(K % f->values == 0, op, ": ", f->name, " rows need a multiple of ", f->values, " values, got ", K);
  if (repacked) {  // (N / 8, group bytes): 8 rows per tensor row
    const int64_t group_bytes = K / f->values * repacked_group_bytes(base);
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.size(1) == group_bytes && w.is_contiguous(), op,
                ": a repacked ", f->name, " w must be contiguous uint8 (N / 8, ", group_bytes, ") for ", K,
                " values per row, got ", w.sizes());
    return {w.const_data_ptr<uint8_t>(), type, w.size(0) * kRepackRows, group_bytes / kRepackRows, column};
  }
  const int64_t row_bytes = K / f->values * f->bytes;
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.size(1) == row_bytes && w.stride(1) == 1 &&
                  w.stride(0) == row_bytes,
              op, ": w must be contiguous uint8 (N, ", row_bytes, ") for ", K, " ", f->name, " values per row, got ",
              w.sizes());
  return {w.const_data_ptr<uint8_t>(), type, w.size(0), row_bytes, column};
}

#ifndef LLAMA3_GGML_AVX2
// the portable path: each part in tiles of 16 weight rows, unpacked, against every row of x
void portable_part(const GroupPart& g, int64_t K, const QuantizedX& qx, int64_t M, float* yp, int64_t ldy) {
  const Format& f = *format_of(g.type);
  const int64_t tiles = (g.rows + kTileRows - 1) / kTileRows;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int8_t> codes(kTileRows * K);
    std::vector<float> scale(kTileRows * K / kGroup), bias(kTileRows * K / kGroup);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTileRows, rows = std::min(kTileRows, g.rows - n0);
      RowView views[kTileRows];
      for (int64_t r = 0; r < rows; ++r) {
        views[r] = {codes.data() + r * K, scale.data() + r * K / kGroup, bias.data() + r * K / kGroup};
        unpack_row(f, g.data + (n0 + r) * g.row_bytes, K, views[r]);
      }
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xq = qx.q.data() + m * K;
        const float* xs = qx.scale.data() + m * K / kXBlock;
        const float* sums = qx.group_sum.data() + m * K / kGroup;
        for (int64_t r = 0; r < rows; ++r)
          yp[m * ldy + g.column + n0 + r] = f.has_bias ? dot_row<true>(views[r], xq, xs, sums, K)
                                                       : dot_row<false>(views[r], xq, xs, sums, K);
      }
    }
  });
}
#endif

// y (M, ΣN) = x · [W_0 | W_1 | ...]ᵀ with x rounded once for all the parts
at::Tensor matmul_parts(const char* op, const at::Tensor& x_in, const std::vector<GroupPart>& parts, int64_t K,
                        int64_t total) {
  TORCH_CHECK(x_in.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, op, ": x must be (M, ", K, "), got ", x_in.sizes());
  const auto out_dtype = x_in.scalar_type();
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16, op, ": x must be float32 or bfloat16");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0);
  at::Tensor y32 = at::empty({M, total}, x.options());
  const QuantizedX qx = quantize_x(x.const_data_ptr<float>(), M, K);
  float* yp = y32.mutable_data_ptr<float>();
#ifdef LLAMA3_GGML_AVX2
  fused_matmul(parts, K, qx, M, yp, total);
#else
  for (const GroupPart& g : parts) portable_part(g, K, qx, M, yp, total);
#endif
  return out_dtype == at::kFloat ? y32 : y32.to(out_dtype);
}

at::Tensor ggml_matmul(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t K) {
  const char* op = "llama3::ggml_matmul";
  const GroupPart part = check_part(op, w, type, K, 0);
  return matmul_parts(op, x, {part}, K, part.rows);
}

// The products of several weights that share their input (q/k/v, gate/up), each in its own ggml type, as one
// call: x rounded once, one parallel region, the outputs side by side; the weights stay where they are (views
// of the file's pages), nothing is copied
at::Tensor ggml_matmul_group(const at::Tensor& x, at::TensorList ws, at::IntArrayRef types, int64_t K) {
  const char* op = "llama3::ggml_matmul_group";
  TORCH_CHECK(!ws.empty() && ws.size() == types.size(), op, ": needs one ggml type per weight, got ", ws.size(),
              " weights and ", types.size(), " types");
  std::vector<GroupPart> parts;
  int64_t total = 0;
  for (size_t i = 0; i < ws.size(); ++i) {
    parts.push_back(check_part(op, ws[i], types[i], K, total));
    total += parts.back().rows;
  }
  return matmul_parts(op, x, parts, K, total);
}

// ----- the scale check: a NaN or inf fp16 scale makes every product with its block NaN -----
//
// A GGUF's weights are checked once at load, in the pass that repacks them (`ggml_repack`) or, for weights
// used in the file's layout, by `ggml_check_scales`: both report the first block (row-major over the whole
// matrix) whose fp16 scale fields (d; and dmin / m for the affine types) are NaN or infinite, or -1. A test
// of the exponent bits, no float conversion: the check costs the reading of the bytes, no more.

// The byte offsets of a block's fp16 scale fields, by ggml type (gguf_quants.QUANT_TYPES lists the same)
struct ScaleFields {
  int count;
  int offsets[2];
};

ScaleFields scale_fields(int64_t type) {
  switch (type) {
    case 3: case 7: case 12: case 13: return {2, {0, 2}};  // Q4_1, Q5_1, Q4_K, Q5_K: d, then m / dmin
    case 14: return {1, {208, 0}};                          // Q6_K: d after the codes and sub-scales
    default: return {1, {0, 0}};                            // Q4_0, Q5_0, Q8_0: d first
  }
}

// The index of the first of `count` consecutive blocks whose scales are not all finite, counted from
// `first`; -1 when every one is finite
int64_t first_bad_block(const uint8_t* blocks, int64_t count, int64_t block_bytes, ScaleFields s, int64_t first) {
  for (int64_t i = 0; i < count; ++i) {
    const uint8_t* b = blocks + i * block_bytes;
    bool bad = false;
    for (int k = 0; k < s.count; ++k) {
      uint16_t h;
      std::memcpy(&h, b + s.offsets[k], sizeof(h));
      bad |= (h & 0x7C00) == 0x7C00;  // fp16 NaN and inf: every exponent bit set
    }
    if (bad) return first + i;
  }
  return -1;
}

// The smallest of the bad blocks the threads report (-1: none)
class FirstBad {
 public:
  void note(int64_t block) {
    if (block < 0) return;
    int64_t seen = first_.load(std::memory_order_relaxed);
    while (block < seen && !first_.compare_exchange_weak(seen, block, std::memory_order_relaxed)) {
    }
  }
  int64_t get() const {
    const int64_t v = first_.load();
    return v == kNone ? -1 : v;
  }

 private:
  static constexpr int64_t kNone = INT64_MAX;
  std::atomic<int64_t> first_{kNone};
};

// Rows per run over the threads: ~4 MB of bytes each, and a small matrix on the calling thread
int64_t rows_per_run(int64_t row_bytes) { return std::max<int64_t>(1, (int64_t{4} << 20) / std::max<int64_t>(1, row_bytes)); }

// Rewrite the rows of a Q4_0 ... Q6_K matrix w (N, row_bytes), N a multiple of 8, into `out`
// (N / 8, K / values · ggml_repack_block_bytes(type)) in the 8-row layout the products read (see above):
// the same bytes moved (and Q4_K's 6-bit sub-scales unpacked to bytes), so every weight keeps its value.
// The scales are checked in the same pass (each group of 8 rows while its bytes are in the cache): returns
// the first block with a NaN or inf scale (the caller refuses the file), or -1.
int64_t ggml_repack(const at::Tensor& w, int64_t type, int64_t K, at::Tensor& out) {
  const char* op = "llama3::ggml_repack";
  TORCH_CHECK((type & kRepackedFlag) == 0, op, ": w is already repacked");
  const GroupPart src = check_part(op, w, type, K, 0);
  const int64_t group_bytes = repacked_group_bytes(type);
  TORCH_CHECK(group_bytes > 0, op, ": ", format_of(type)->name, " is not repacked by this build's kernels");
  TORCH_CHECK(src.rows % kRepackRows == 0, op, ": repacks groups of 8 rows, got ", src.rows,
              " (multiply the rest with the file's layout)");
  const Format& f = *format_of(type);
  const int64_t blocks = K / f.values, groups = src.rows / kRepackRows;
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kByte && out.is_contiguous() && out.dim() == 2 &&
                  out.size(0) == groups && out.size(1) == blocks * group_bytes,
              op, ": out must be contiguous uint8 (", groups, ", ", blocks * group_bytes, "), got ", out.sizes());
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  const ScaleFields scales = scale_fields(type);
  FirstBad bad;
  // Over the threads in runs of ~4 MB of output: the work is page faults (the file's pages, the new
  // memory's) and byte shuffles, and both scale with cores (1B Q4_0 on 2 quiet Zen 3 cores: 1.0 s -> 0.x s);
  // a small matrix stays on the calling thread.
  at::parallel_for(0, groups, rows_per_run(blocks * group_bytes), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* rows = src.data + g * kRepackRows * src.row_bytes;
      uint8_t* out_group = dst + g * blocks * group_bytes;
      if (type == 2) repack_legacy<2>(rows, src.row_bytes, blocks, out_group);
      else if (type == 3) repack_legacy<3>(rows, src.row_bytes, blocks, out_group);
      else if (type == 6) repack_legacy<6>(rows, src.row_bytes, blocks, out_group);
      else if (type == 7) repack_legacy<7>(rows, src.row_bytes, blocks, out_group);
      else if (type == 8) repack_q8_0(rows, src.row_bytes, blocks, out_group);
      else if (type == 12) repack_k_affine<false>(rows, src.row_bytes, blocks, out_group);
      else if (type == 13) repack_k_affine<true>(rows, src.row_bytes, blocks, out_group);
      else repack_q6_k(rows, src.row_bytes, blocks, out_group);
      bad.note(first_bad_block(rows, kRepackRows * blocks, f.bytes, scales, g * kRepackRows * blocks));
    }
  });
  return bad.get();
}

// The first block of w (N, row_bytes), a matrix in the file's layout, with a NaN or inf scale, or -1
int64_t ggml_check_scales(const at::Tensor& w, int64_t type, int64_t K) {
  const GroupPart src = check_part("llama3::ggml_check_scales", w, type, K, 0);
  const Format& f = *format_of(type);
  const int64_t blocks = K / f.values;
  const ScaleFields scales = scale_fields(type);
  FirstBad bad;
  at::parallel_for(0, src.rows, rows_per_run(src.row_bytes), [&](int64_t r0, int64_t r1) {
    bad.note(first_bad_block(src.data + r0 * src.row_bytes, (r1 - r0) * blocks, f.bytes, scales, r0 * blocks));
  });
  return bad.get();
}

int64_t ggml_repack_block_bytes(int64_t type) { return repacked_group_bytes(type); }

// The inverse of `ggml_repack`: w (G, K / values · ggml_repack_block_bytes(type)), groups of 8 repacked rows,
// -> (8 G, row_bytes) in the file's layout, byte for byte what was repacked (a prompt's slices of a repacked
// weight are dequantized from it; the file's own pages stay released).
at::Tensor ggml_unrepack(const at::Tensor& w, int64_t type, int64_t K) {
  const char* op = "llama3::ggml_unrepack";
  TORCH_CHECK((type & kRepackedFlag) == 0, op, ": give the file's type (the number without the repacked flag)");
  const Format* f = format_of(type);
  TORCH_CHECK(f != nullptr, op, ": unknown ggml type ", type);
  const int64_t group_bytes = repacked_group_bytes(type);
  TORCH_CHECK(group_bytes > 0, op, ": ", f->name, " is not repacked by this build's kernels");
  TORCH_CHECK(K > 0 && K % f->values == 0, op, ": in_features ", K, " is not a multiple of ", f->name, "'s ",
              f->values, " values per block");
  const int64_t blocks = K / f->values, row_bytes = blocks * f->bytes;
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 2 &&
                  w.size(1) == blocks * group_bytes,
              op, ": w must be contiguous uint8 (groups, ", blocks * group_bytes, "), got ", w.sizes());
  const int64_t groups = w.size(0);
  at::Tensor out = at::empty({groups * kRepackRows, row_bytes}, w.options());
  const uint8_t* src = w.const_data_ptr<uint8_t>();
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, groups, rows_per_run(blocks * group_bytes), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* group = src + g * blocks * group_bytes;
      uint8_t* rows = dst + g * kRepackRows * row_bytes;
      if (type == 2) unrepack_legacy<2>(group, row_bytes, blocks, rows);
      else if (type == 3) unrepack_legacy<3>(group, row_bytes, blocks, rows);
      else if (type == 6) unrepack_legacy<6>(group, row_bytes, blocks, rows);
      else if (type == 7) unrepack_legacy<7>(group, row_bytes, blocks, rows);
      else if (type == 8) unrepack_q8_0(group, row_bytes, blocks, rows);
      else if (type == 12) unrepack_k_affine<false>(group, row_bytes, blocks, rows);
      else if (type == 13) unrepack_k_affine<true>(group, row_bytes, blocks, rows);
      else unrepack_q6_k(group, row_bytes, blocks, rows);
    }
  });
  return out;
}

}  // namespace

LLAMA3_LIBRARY_FRAGMENT(m) {
  m.def("ggml_repack(Tensor w, int ggml_type, int in_features, Tensor(a!) out) -> int");
  m.def("ggml_check_scales(Tensor w, int ggml_type, int in_features) -> int");
  m.def("ggml_unrepack(Tensor w, int ggml_type, int in_features) -> Tensor");
  // no tensor argument to dispatch on: defined with its one (catch-all) kernel
  m.def("ggml_repack_block_bytes(int ggml_type) -> int", &ggml_repack_block_bytes);
  m.def("ggml_matmul(Tensor x, Tensor w, int ggml_type, int in_features) -> Tensor");
  m.def("ggml_matmul_group(Tensor x, Tensor[] ws, int[] ggml_types, int in_features) -> Tensor");
}

LLAMA3_LIBRARY_IMPL_CPU(m) {
  m.impl("ggml_matmul", &ggml_matmul);
  m.impl("ggml_matmul_group", &ggml_matmul_group);
  m.impl("ggml_repack", &ggml_repack);
  m.impl("ggml_check_scales", &ggml_check_scales);
  m.impl("ggml_unrepack", &ggml_unrepack);
}
