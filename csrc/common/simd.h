// Runtime SIMD dispatch for portable builds: GCC/Clang function multi-versioning picks the
// best clone once at load time (ifunc), so hot loops carry no dispatch cost. Never -march=native.
#pragma once
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__) && \
    !defined(NEUROADDA_NO_TARGET_CLONES)
#define NEUROADDA_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define NEUROADDA_SIMD_LEVELS {"avx512f", "avx2", "default"}
#else
#define NEUROADDA_SIMD_CLONES
#define NEUROADDA_SIMD_LEVELS {"default"}
#endif
