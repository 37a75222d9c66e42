// What this build contains and what the machine offers at run time.
#pragma once
#include <string>
#include <vector>

namespace neuroadda {

// SIMD instruction sets the kernels were cloned for (compile time).
std::vector<std::string> compiled_simd_levels();
// The best of those the running CPU supports (run time), e.g. "avx512f", "avx2" or "default".
std::string active_simd_level();
bool built_with_openmp();
int openmp_max_threads();
bool built_with_cuda();
std::string cuda_version();        // nvcc version used, "" without CUDA
std::string cuda_architectures();  // e.g. "75-real;80-real;...", "" without CUDA
// Number of usable CUDA devices now; 0 without CUDA, without a driver or without a GPU.
int cuda_device_count();
std::string cuda_device_name(int device);

}  // namespace neuroadda
