// CPU uncertainty reductions: OpenMP over fixed (tile, channel, chunk) work items, SIMD inside
// each item through target_clones + `omp simd` reductions (no -ffast-math needed).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/simd.h"
#include "ops/uncertainty.h"

#define NA_ALWAYS_INLINE inline __attribute__((always_inline))

namespace neuroadda {
namespace cpu {
namespace {

constexpr int64_t kChunk = 32768;  // voxels per work item: the unit of parallelism and of order
constexpr int64_t kSub = 1024;     // voxels per float32 partial sum (bounds float rounding)

struct Partial {
  double sum = 0.0;
  int64_t count = 0;
  uint32_t bad = 0;
};

template <int M, bool Masked>
NA_ALWAYS_INLINE void single_span(const float* __restrict x, const uint8_t* __restrict m, int64_t len,
                                  Partial& out) {
  for (int64_t s = 0; s < len; s += kSub) {
    const int64_t e = std::min(len, s + kSub);
    float acc = 0.0f;
    int32_t cnt = 0;
    uint32_t b = 0;
#pragma omp simd reduction(+ : acc, cnt) reduction(| : b)
    for (int64_t i = s; i < e; ++i) {
      const float p = x[i];
      const float v = M == 0 ? binary_entropy_f(p) : margin_f(p);
      if (Masked) {
        const bool keep = m[i] != 0;
        acc += keep ? v : 0.0f;
        cnt += keep ? 1 : 0;
        b |= static_cast<uint32_t>(keep & !prob_valid(p));
      } else {
        acc += v;
        b |= prob_valid(p) ? 0u : 1u;
      }
    }
    out.sum += static_cast<double>(acc);
    out.count += Masked ? cnt : (e - s);
    out.bad |= b;
  }
}

template <int M, bool Masked>
NA_ALWAYS_INLINE void mc_span(const float* __restrict x, int64_t stride_t, int64_t T, const uint8_t* __restrict m,
                              int64_t len, Partial& out) {
  alignas(64) float mean[kSub];
  alignas(64) float aux[kSub];
  const float tf = static_cast<float>(T);
  const float inv_t = 1.0f / tf;
  for (int64_t s = 0; s < len; s += kSub) {
    const int64_t L = std::min(len, s + kSub) - s;
    const uint8_t* ms = Masked ? m + s : nullptr;
    for (int64_t i = 0; i < L; ++i) mean[i] = aux[i] = 0.0f;
    uint32_t b = 0;
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * stride_t + s;
#pragma omp simd reduction(| : b)
      for (int64_t i = 0; i < L; ++i) {
        const float p = xt[i];
        mean[i] += p;
        if (M == 2) aux[i] += binary_entropy_f(p);
        const bool keep = Masked ? ms[i] != 0 : true;
        b |= static_cast<uint32_t>(keep & !prob_valid(p));
      }
    }
    // Division (not * 1/T) keeps mean <= 1 when every sample is <= 1.
#pragma omp simd
    for (int64_t i = 0; i < L; ++i) mean[i] = mean[i] / tf;
    if (M == 3) {
      for (int64_t t = 0; t < T; ++t) {
        const float* xt = x + t * stride_t + s;
#pragma omp simd
        for (int64_t i = 0; i < L; ++i) {
          const float d = xt[i] - mean[i];
          aux[i] += d * d;
        }
      }
    }
    float acc = 0.0f;
    int32_t cnt = 0;
#pragma omp simd reduction(+ : acc, cnt)
    for (int64_t i = 0; i < L; ++i) {
      float v;
      if (M == 0) v = binary_entropy_f(mean[i]);
      else if (M == 1) v = margin_f(mean[i]);
      else if (M == 2) v = binary_entropy_f(mean[i]) - aux[i] * inv_t;
      else v = aux[i] * inv_t;
      const bool keep = Masked ? ms[i] != 0 : true;
      acc += keep ? v : 0.0f;
      cnt += keep ? 1 : 0;
    }
    out.sum += static_cast<double>(acc);
    out.count += cnt;
    out.bad |= b;
  }
}

// One dispatch per work item: the clone (AVX-512 / AVX2 / default) is chosen once at load time.
NEUROADDA_SIMD_CLONES
void reduce_item(const float* x, int64_t stride_t, int64_t T, const uint8_t* m, int64_t len, int measure,
                 Partial* out) {
  Partial& p = *out;
  if (T == 1 && measure <= 1) {
    if (measure == 0) {
      if (m) single_span<0, true>(x, m, len, p); else single_span<0, false>(x, m, len, p);
    } else {
      if (m) single_span<1, true>(x, m, len, p); else single_span<1, false>(x, m, len, p);
    }
    return;
  }
  switch (measure) {
    case 0: if (m) mc_span<0, true>(x, stride_t, T, m, len, p); else mc_span<0, false>(x, stride_t, T, m, len, p); break;
    case 1: if (m) mc_span<1, true>(x, stride_t, T, m, len, p); else mc_span<1, false>(x, stride_t, T, m, len, p); break;
    case 2: if (m) mc_span<2, true>(x, stride_t, T, m, len, p); else mc_span<2, false>(x, stride_t, T, m, len, p); break;
    default: if (m) mc_span<3, true>(x, stride_t, T, m, len, p); else mc_span<3, false>(x, stride_t, T, m, len, p); break;
  }
}

}  // namespace

UncertaintyResult tile_uncertainty_kernel(const UncertaintyInput& in, UncertaintyMeasure measure, double* out) {
  const int64_t n_chunks = (in.V + kChunk - 1) / kChunk;
  const int64_t per_tile = in.C * n_chunks;
  const int64_t n_items = in.N * per_tile;
  std::vector<Partial> parts(static_cast<size_t>(n_items));
  const int meas = static_cast<int>(measure);

#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t item = 0; item < n_items; ++item) {
    const int64_t n = item / per_tile;
    const int64_t c = (item % per_tile) / n_chunks;
    const int64_t v0 = (item % n_chunks) * kChunk;
    const int64_t len = std::min(kChunk, in.V - v0);
    const float* x = in.probs + n * in.stride_n + c * in.stride_c + v0;
    const uint8_t* m = in.mask ? in.mask + n * in.mask_stride_n + c * in.mask_stride_c + v0 : nullptr;
    reduce_item(x, in.stride_t, in.T, m, len, meas, &parts[static_cast<size_t>(item)]);
  }

  UncertaintyResult res;
  for (int64_t n = 0; n < in.N; ++n) {
    double sum = 0.0;
    int64_t count = 0;
    uint32_t bad = 0;
    for (int64_t k = 0; k < per_tile; ++k) {  // fixed order: independent of the thread count
      const Partial& p = parts[static_cast<size_t>(n * per_tile + k)];
      sum += p.sum;
      count += p.count;
      bad |= p.bad;
    }
    if (bad && res.first_bad_tile < 0) res.first_bad_tile = n;
    out[n] = count > 0 ? sum / static_cast<double>(count) : std::numeric_limits<double>::quiet_NaN();
  }
  return res;
}

}  // namespace cpu
}  // namespace neuroadda
