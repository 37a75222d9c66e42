#include "common/build_info.h"

#include "common/simd.h"
#include "neuroadda_build_config.h"
#ifdef NEUROADDA_WITH_OPENMP
#include <omp.h>
#endif

namespace neuroadda {

#ifdef NEUROADDA_WITH_CUDA
int cuda_device_count_impl();
std::string cuda_device_name_impl(int device);
#endif

std::vector<std::string> compiled_simd_levels() { return NEUROADDA_SIMD_LEVELS; }

std::string active_simd_level() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512f";
  if (__builtin_cpu_supports("avx2")) return "avx2";
#endif
  return "default";
}

bool built_with_openmp() {
#ifdef NEUROADDA_WITH_OPENMP
  return true;
#else
  return false;
#endif
}

int openmp_max_threads() {
#ifdef NEUROADDA_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

bool built_with_cuda() {
#ifdef NEUROADDA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cuda_version() {
  return NEUROADDA_CUDA_VERSION;
}

std::string cuda_architectures() {
  return NEUROADDA_CUDA_ARCHS;
}

int cuda_device_count() {
#ifdef NEUROADDA_WITH_CUDA
  return cuda_device_count_impl();
#else
  return 0;
#endif
}

std::string cuda_device_name(int device) {
#ifdef NEUROADDA_WITH_CUDA
  return cuda_device_name_impl(device);
#else
  (void)device;
  return "";
#endif
}

}  // namespace neuroadda
