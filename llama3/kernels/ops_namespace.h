// The operator namespace every kernel source registers into: `llama3` for the library `available()` loads,
// `llama3_<level>` for a library built at another instruction-set level and loaded beside it
// (kernels/__init__.py passes -DLLAMA3_OPS). TORCH_LIBRARY stringizes its namespace argument without
// expanding it, so the macro goes through one more level here to be expanded first.
#pragma once

#include <torch/library.h>

#ifndef LLAMA3_OPS
#define LLAMA3_OPS llama3
#endif

#define LLAMA3_LIBRARY_FRAGMENT_(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define LLAMA3_LIBRARY_IMPL_(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)
// Use these instead of TORCH_LIBRARY_FRAGMENT(llama3, m) / TORCH_LIBRARY_IMPL(llama3, CPU, m).
#define LLAMA3_LIBRARY_FRAGMENT(m) LLAMA3_LIBRARY_FRAGMENT_(LLAMA3_OPS, m)
#define LLAMA3_LIBRARY_IMPL_CPU(m) LLAMA3_LIBRARY_IMPL_(LLAMA3_OPS, m)
