// Input checks that survive -O / NDEBUG. Throws std::invalid_argument, which pybind11
// turns into ValueError, so a bad input never aborts the interpreter.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

#define NEUROADDA_CHECK(cond, msg)                                              \
  do {                                                                          \
    if (!(cond)) {                                                              \
      std::ostringstream neuroadda_check_os_;                                   \
      neuroadda_check_os_ << msg;                                               \
      throw std::invalid_argument(neuroadda_check_os_.str());                   \
    }                                                                           \
  } while (0)

#if defined(__CUDACC__)
#define NEUROADDA_HD __host__ __device__ __forceinline__
#else
#define NEUROADDA_HD inline
#endif

#ifdef NEUROADDA_WITH_CUDA
#define NEUROADDA_CUDA_CHECK(expr)                                              \
  do {                                                                          \
    cudaError_t neuroadda_err_ = (expr);                                        \
    if (neuroadda_err_ != cudaSuccess) {                                        \
      throw std::runtime_error(std::string("CUDA error in ") + #expr + ": " +   \
                               cudaGetErrorString(neuroadda_err_));             \
    }                                                                           \
  } while (0)
#endif
