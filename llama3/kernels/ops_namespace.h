// The operator namespace every kernel source registers into: `llama3` for the library `available()` loads,
// `llama3_<level>` for a library built at another instruction-set level and loaded beside it
// (kernels/__init__.py passes -DLLAMA3_OPS). TORCH_LIBRARY stringizes its namespace argument without
// expanding it, so the macro goes through one more level here to be expanded first.
#pragma once

// Every source includes this header first, so torch's headers (which include <immintrin.h>) come in here.
// GCC 12's AVX-512 intrinsic headers initialize their "undefined" vectors from themselves and then report
// them as uninitialized wherever an intrinsic is inlined; the pragmas cover those header lines only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // before torch's headers include it, so that its lines fall inside the pragmas
#endif
#include <torch/library.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#ifndef LLAMA3_OPS
#define LLAMA3_OPS llama3
#endif

#define LLAMA3_LIBRARY_FRAGMENT_(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define LLAMA3_LIBRARY_IMPL_(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)
// Use these instead of TORCH_LIBRARY_FRAGMENT(llama3, m) / TORCH_LIBRARY_IMPL(llama3, CPU, m).
#define LLAMA3_LIBRARY_FRAGMENT(m) LLAMA3_LIBRARY_FRAGMENT_(LLAMA3_OPS, m)
#define LLAMA3_LIBRARY_IMPL_CPU(m) LLAMA3_LIBRARY_IMPL_(LLAMA3_OPS, m)
