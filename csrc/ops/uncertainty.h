// Per-tile uncertainty reductions over Bernoulli probability maps.
//
// Algorithm: one streaming pass over probs laid out as (T, N, C, V) -- T Monte-Carlo samples
// (T = 1 without MC), N tiles, C channels (each an independent Bernoulli: boundary or affinity),
// V voxels per channel (the spatial block, contiguous). Per element (or per voxel over T) a
// per-element value is computed in float32 and accumulated per tile in float64:
//   entropy   h(p) = -p ln p - (1-p) ln(1-p) (nats); with MC of the mean p_bar over T
//   margin    1 - |2p - 1|;                          with MC of p_bar
//   bald      h(p_bar) - mean_t h(p_t)  (mutual information between label and model, Houlsby
//             et al. 2011, "Bayesian Active Learning for Classification and Preference Learning")
//   variance  mean_t (p_t - p_bar)^2 (population variance over the T samples, ddof = 0)
// The tile value is the mean over the included (channel, voxel) elements.
// ln is a branch-free float32 polynomial (Cephes logf coefficients, ~1 ulp) so that the loop
// vectorises; float32 per element (absolute error ~1e-7 nats), float64 across elements.
//
// Invariants: the result for tile n depends only on tile n's data (work is split into fixed
// chunks and summed in a fixed order, so it is independent of the thread count); a value outside
// [0, 1] or NaN at an included element is reported (first offending tile) instead of being used.
// Excluded (mask = 0) elements are neither used nor validated.
// Memory: O(N * ceil(C*V / chunk)) doubles of partial sums; no (N, C, V)-sized temporaries.
#pragma once
#include <cstdint>
#include <cmath>
#include <cstddef>
#include <cstring>

#include "common/check.h"

#if defined(__CUDACC__)
#define NEUROADDA_UNC_HD NEUROADDA_HD
#elif defined(__GNUC__)
// Forced so that the helpers are inlined into every target_clones clone (AVX-512/AVX2/default).
#define NEUROADDA_UNC_HD inline __attribute__((always_inline))
#else
#define NEUROADDA_UNC_HD inline
#endif

namespace neuroadda {

enum class UncertaintyMeasure : int { Entropy = 0, Margin = 1, Bald = 2, Variance = 3 };

// A strided view of probabilities (T, N, C, V): element (t, n, c, v) lives at
// probs[t*stride_t + n*stride_n + c*stride_c + v]. mask (optional, 1 = include) is (N, C, V)
// with strides mask_stride_n / mask_stride_c (0 to broadcast) and a contiguous spatial block.
struct UncertaintyInput {
  const float* probs = nullptr;
  int64_t T = 1, N = 0, C = 0, V = 0;
  int64_t stride_t = 0, stride_n = 0, stride_c = 0;
  const uint8_t* mask = nullptr;
  int64_t mask_stride_n = 0, mask_stride_c = 0;
};

struct UncertaintyResult {
  int64_t first_bad_tile = -1;  // >= 0: a probability outside [0, 1] or NaN in that tile
};

// ---- shared arithmetic (CPU and CUDA) -------------------------------------------------------

NEUROADDA_UNC_HD float unc_bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#elif defined(__GNUC__)
  return __builtin_bit_cast(float, u);  // memcpy would block the vectoriser under `omp simd`
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

NEUROADDA_UNC_HD uint32_t unc_float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#elif defined(__GNUC__)
  return __builtin_bit_cast(uint32_t, f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// ln(x) for finite x >= FLT_MIN (finite, inexact, for 0 <= x < FLT_MIN). Range reduction x = m * 2^k with m in [sqrt(1/2), sqrt(2))
// by integer arithmetic (no frexp, no branches), then the Cephes logf polynomial in f = m - 1.
NEUROADDA_UNC_HD float fast_logf(float x) {
  uint32_t ix = unc_float_to_bits(x) + (0x3f800000u - 0x3f3504f3u);
  const float k = static_cast<float>(static_cast<int32_t>(ix >> 23) - 0x7f);
  const float f = unc_bits_to_float((ix & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * k;  // ln 2 split into 0.693359375 + (-2.12194440e-4) for accuracy
  y += -0.5f * z;
  return (f + y) + 0.693359375f * k;
}

// p ln p with 0 ln 0 = 0 and no clamp (a select here is turned into a branch that blocks
// vectorisation): for p = 0 the bit-level reduction of fast_logf yields a finite -127 ln 2, and
// for subnormal p a finite value within a factor 2, so p ln p stays exact at 0 and < 1e-36 off
// below FLT_MIN.
NEUROADDA_UNC_HD float xlogx_f(float p) { return p * fast_logf(p); }

NEUROADDA_UNC_HD float binary_entropy_f(float p) { return -(xlogx_f(p) + xlogx_f(1.0f - p)); }

NEUROADDA_UNC_HD float margin_f(float p) {
  return 1.0f - fabsf(2.0f * p - 1.0f);
}

// NaN fails both comparisons.
NEUROADDA_UNC_HD bool prob_valid(float p) { return (p >= 0.0f) & (p <= 1.0f); }  // & keeps it branch-free

// ---- API ----------------------------------------------------------------------------------

// Per-tile mean of the measure into out[N] (NaN for a tile with no included element).
// Throws std::invalid_argument on inconsistent sizes; never throws on bad values (see result).
UncertaintyResult tile_uncertainty(const UncertaintyInput& in, UncertaintyMeasure measure, double* out,
                                   bool use_cuda);

// Same for probs already in GPU memory (e.g. a torch CUDA tensor); `stream` is a cudaStream_t
// value (0, 1 = legacy default, 2 = per-thread default, or a handle). Throws without CUDA.
UncertaintyResult tile_uncertainty_gpu_resident(const UncertaintyInput& in, UncertaintyMeasure measure, double* out,
                                                uintptr_t stream);

namespace cpu {
UncertaintyResult tile_uncertainty_kernel(const UncertaintyInput& in, UncertaintyMeasure measure, double* out);
}

#ifdef NEUROADDA_WITH_CUDA
}  // namespace neuroadda
struct CUstream_st;  // cudaStream_t without pulling cuda_runtime.h into CPU translation units
namespace neuroadda {
namespace cuda {
// Work items (entries of part_sum / part_cnt) for an input.
size_t workspace_items(const UncertaintyInput& in);
// `in` holds device pointers; tile_bad (N entries) must be zeroed; writes out[N] on the device.
// Enqueues two kernels on `stream` and returns without synchronising.
void launch_tile_uncertainty(const UncertaintyInput& in, UncertaintyMeasure measure, double* part_sum,
                             long long* part_cnt, unsigned* tile_bad, double* out, CUstream_st* stream);
// Host-memory wrapper: copies the touched span to the GPU, launches, copies back, synchronises.
UncertaintyResult tile_uncertainty_host(const UncertaintyInput& in, UncertaintyMeasure measure, double* out);
// probs already in GPU memory (checked with cudaPointerGetAttributes), mask (optional) in host
// memory; runs on the caller's stream, then synchronises it to return out[N] in host memory.
UncertaintyResult tile_uncertainty_device(const UncertaintyInput& in, UncertaintyMeasure measure, double* out,
                                          CUstream_st* stream);
}  // namespace cuda
#endif

}  // namespace neuroadda
