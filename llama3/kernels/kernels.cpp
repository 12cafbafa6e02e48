// The one translation unit the kernels are compiled as: torch's headers, which cost most of the compile
// time (about 10 s of the 15-20 s each source takes alone), are parsed once per instruction-set level instead
// of once per source. Each source keeps its own anonymous namespace and names that do not collide.
#include "gemv.cpp"
#include "gemm16.cpp"
#include "xent.cpp"
#include "ggml_blocks.cpp"
#include "ggml_dequant.cpp"
#include "attend.cpp"
#include "train_ops.cpp"
#include "norm_rope.cpp"
