// CPU vectorization helpers shared by the CPU kernels.
#pragma once

// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64; the loader picks one at run time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTMETA_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTMETA_SIMD_CLONES
#endif
