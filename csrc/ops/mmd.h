// MMD² between two feature sets with a Gaussian kernel, and its permutation test.
//
// Algorithm. k(a, b) = mean_s exp(-|a-b|² / (2 sigma_s²)) over one or more bandwidths. The
//   estimators (Gretton, Borgwardt, Rasch, Schölkopf & Smola, "A Kernel Two-Sample Test",
//   JMLR 13:723-773, 2012, eqs. 3 and 5) are built from three pair sums over the pooled sample
//   z = [x; y]: kxx = sum_{i != j in x} k, kyy = sum_{i != j in y} k, kxy = sum_{i in x, j in y} k.
//   |a-b|² = |a|² + |b|² - 2 a.b with per-row squared norms and float32 dot products computed in
//   16x16 register tiles over rows packed into 16-row panels; only tiles on or above the diagonal
//   of the pooled matrix are visited (the xx and yy blocks are symmetric), the exp is applied in
//   the tile epilogue and the tile sums are added in float64.
// Permutation test. The pooled kernel matrix K (float32, N x N, N = n + m) is filled once; with
//   row sums r = K 1 and total T, a permutation whose x-part has indicator a gives
//   s_xx = a'Ka, s_xy = a'r - s_xx, s_yy = T - 2 s_xy - s_xx, and the diagonal k(a, a) = 1 is
//   known, so each permutation only needs a'Ka = sum_{i in x} (1 + 2 sum_{j > i, j in x} K_ij),
//   evaluated for blocks of permutations per pass over K.
// Invariants. Inputs are finite float32 (checked by the caller); k(a, a) = 1 exactly (used
//   instead of the rounded diagonal); squared distances are clamped at 0; every float64 sum is
//   reduced in a fixed order, so results do not depend on the number of threads.
// Memory. mmd_sums: O((n + m) d) for the packed panels plus O(#panels) partial sums; the n x m
//   kernel matrix is never materialised. median heuristic: O(s²/2) floats for s <= 2048
//   subsampled points (<= 8.4 MB). Permutation test: the N x N float32 matrix K (4 N² bytes).
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/check.h"

#ifdef NEUROADDA_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace neuroadda {

// A read-only (rows, cols) float32 matrix with element strides (C order: (cols, 1); F order:
// (1, rows)). Arbitrary strides are packed, so no caller-side copy is needed.
struct MatView {
  const float* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;
  int64_t col_stride = 1;
  float at(int64_t i, int64_t j) const { return data[i * row_stride + j * col_stride]; }
};

// Off-diagonal pair sums over the pooled sample (see the header block).
struct MMDSums {
  double kxx = 0.0;  // sum over ordered pairs i != j, both in x
  double kyy = 0.0;  // sum over ordered pairs i != j, both in y
  double kxy = 0.0;  // sum over i in x, j in y
};

// Which blocks mmd_sums computes (skipping a block skips its tiles).
enum MMDBlocks : int { kBlockXX = 1, kBlockYY = 2, kBlockXY = 4, kBlockAll = 7 };

// Maximum number of bandwidths (a fixed-size parameter block for the CUDA kernels).
constexpr int kMaxSigmas = 16;

// ---- arithmetic shared by the CPU and CUDA kernels -------------------------------------------

// Lane operations for the shared arithmetic below: float here (CPU scalar paths and CUDA
// threads); the CPU kernels add a specialisation for 16-float GCC vectors, so the same source
// runs 16 lanes at a time in the tile epilogues.
template <class F>
struct Lanes;
template <>
struct Lanes<float> {
  using I = int;
  static NEUROADDA_HD float splat(float v) { return v; }
  static NEUROADDA_HD float max(float a, float b) { return a < b ? b : a; }
  static NEUROADDA_HD int trunc(float v) { return static_cast<int>(v); }
  static NEUROADDA_HD float to_float(int v) { return static_cast<float>(v); }
  static NEUROADDA_HD float from_bits(int b) {
#if defined(__CUDA_ARCH__)
    return __int_as_float(b);
#else
    float f;
    __builtin_memcpy(&f, &b, sizeof(f));
    return f;
#endif
  }
};

// exp(x) for x <= 0 in float32 (Cephes expf polynomial, ~1 ulp); inputs below -87 give
// exp(-87) ~ 1.6e-38 instead of going through denormals.
template <class F>
NEUROADDA_HD F exp_nonpositive(F x) {
  using L = Lanes<F>;
  x = L::max(x, L::splat(-87.0f));
  // round to nearest for t <= 0: truncation toward zero of t - 0.5
  const F t = x * 1.44269504088896341f;
  const auto n = L::trunc(t - 0.5f);
  const F fn = L::to_float(n);
  F r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  F p = L::splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * L::from_bits((n + 127) << 23);  // times 2^n, n in [-126, 0]
}

// |a - b|² from squared norms and the dot product, clamped at 0 against rounding.
template <class F>
NEUROADDA_HD F sq_dist_from_dot(F na, F nb, F dot) {
  return Lanes<F>::max(na + nb - 2.0f * dot, Lanes<F>::splat(0.0f));
}

// Mean Gaussian kernel over bandwidths; neg_inv_2s2[s] = -1 / (2 sigma_s²).
template <class F>
NEUROADDA_HD F gaussian_mean_kernel(F d2, const float* neg_inv_2s2, int n_sigma, float inv_n_sigma) {
  F k = exp_nonpositive(d2 * neg_inv_2s2[0]);
  for (int s = 1; s < n_sigma; ++s) k += exp_nonpositive(d2 * neg_inv_2s2[s]);
  return k * inv_n_sigma;
}

// MMD² from off-diagonal pair sums (Gretton et al. 2012 eq. 3 for the unbiased U-statistic,
// eq. 5 for the biased V-statistic, whose diagonal terms k(a, a) = 1 add n and m).
NEUROADDA_HD double mmd2_from_sums(double kxx, double kyy, double kxy, double n, double m, bool unbiased) {
  if (unbiased) return kxx / (n * (n - 1.0)) + kyy / (m * (m - 1.0)) - 2.0 * kxy / (n * m);
  return (kxx + n) / (n * n) + (kyy + m) / (m * m) - 2.0 * kxy / (n * m);
}

// MMD² of one permutation from s_xx = a'Ka (diagonal included), a'r and T (see header block).
NEUROADDA_HD double mmd2_from_quadratic_form(double s_xx, double a_r, double total, double n, double m,
                                             bool unbiased) {
  const double s_xy = a_r - s_xx;
  const double s_yy = total - 2.0 * s_xy - s_xx;
  return mmd2_from_sums(s_xx - n, s_yy - m, s_xy, n, m, unbiased);
}

// ---- C++ API (validates its inputs; checks throw std::invalid_argument) ---------------------

enum class Device { CPU, CUDA };

// sigmas: 1..kMaxSigmas bandwidths, finite and > 0. Sums of the requested blocks (others 0).
MMDSums mmd_sums(const MatView& x, const MatView& y, const std::vector<double>& sigmas, int blocks = kBlockAll,
                 Device device = Device::CPU);

double mmd2(const MatView& x, const MatView& y, const std::vector<double>& sigmas, bool unbiased,
            Device device = Device::CPU);

// Median heuristic: sigma = sqrt(median_{i<j} |z_i - z_j|² / 2) over the pooled sample z, using
// the deterministic subsample z[floor(t N / s)], t = 0..s-1, s = min(N, max_points); the median
// of an even count is the mean of the two middle values. Returns 0 when that median is 0.
// Always on the CPU (s <= 2048 keeps it at a few milliseconds).
double median_sigma(const MatView& x, const MatView& y, int64_t max_points = 2048);

// Permutation test: fills null_out[P] and returns the observed statistic, both from the same
// pooled kernel matrix (so that null >= observed compares like with like). x_index (P x n,
// row-major) lists for each permutation the pooled rows (0..n+m-1) drawn as x.
double mmd2_permutation(const MatView& x, const MatView& y, const std::vector<double>& sigmas,
                        const int64_t* x_index, int64_t P, bool unbiased, double* null_out,
                        Device device = Device::CPU);

// Gaussian kernel matrix between two sets: out[i * y.rows + j] = k(x_i, y_j), the very kernel the
// sums above are made of (float32 distances and exp). out: x.rows * y.rows floats, row-major.
// Always on the CPU.
void gaussian_kernel_matrix(const MatView& x, const MatView& y, const std::vector<double>& sigmas, float* out);

// ---- CPU kernels (csrc/ops/cpu/mmd_kernel.cpp) ----------------------------------------------
namespace cpu {
// x, y packed: panels of 16 rows, each stored k-major (d x 16), zero-padded; norms per row.
struct PackedSet {
  std::vector<float> panels;  // n_panels * d * 16
  std::vector<float> norms;   // n_panels * 16
  int64_t rows = 0;
  int64_t n_panels = 0;
  int64_t d = 0;
};
// row_index (optional, n_index entries) selects and orders the rows. Throws on NaN / inf.
PackedSet pack_rows(const MatView& v, const int64_t* row_index = nullptr, int64_t n_index = -1);
// [x; y] packed contiguously (no padding between them), for the pooled kernel matrix.
PackedSet pack_pooled_contiguous(const MatView& x, const MatView& y);
// neg_inv_2s2[s] = -1 / (2 sigma_s²); blocks: MMDBlocks mask.
MMDSums mmd_sums_views(const MatView& x, const MatView& y, const float* neg_inv_2s2, int n_sigma, int blocks);
// d2 of all pairs i < j of one packed set, in row-major upper-triangle order (s(s-1)/2 floats).
void pairwise_sq_dists_upper(const PackedSet& z, float* out);
// out: N x N with row stride ld >= N (padding columns left untouched).
void kernel_matrix(const PackedSet& z, const float* neg_inv_2s2, int n_sigma, float* out, int64_t ld);
// out: x.rows x y.rows, row-major: k(x_i, y_j) (also on the diagonal when x and y share rows).
void cross_kernel_matrix(const MatView& x, const MatView& y, const float* neg_inv_2s2, int n_sigma, float* out);
// K: N x N, row stride ld (a multiple of 16), zero in the padding columns.
void permutation_quadratic_forms(const float* K, int64_t N, int64_t ld, const int64_t* x_index, int64_t P, int64_t n,
                                 double* s_xx);
}  // namespace cpu

// ---- CUDA kernels (csrc/ops/cuda/mmd_kernel.cu); launches never synchronise ------------------
#ifdef NEUROADDA_WITH_CUDA
namespace cuda {
// z: N x d row-major on the device (x rows first, then y); norms: N floats; sums: 3 doubles
// (kxx, kyy, kxy, zeroed by the caller; off-diagonal ordered-pair sums as in MMDSums).
void launch_mmd_sums(const float* z, const float* norms, int64_t N, int64_t n, int64_t d,
                     const float* neg_inv_2s2, int n_sigma, double* sums, cudaStream_t stream);
void launch_row_norms(const float* z, int64_t N, int64_t d, float* norms, cudaStream_t stream);
// Full symmetric N x N kernel matrix (diagonal 1).
void launch_kernel_matrix(const float* z, const float* norms, int64_t N, int64_t d, const float* neg_inv_2s2,
                          int n_sigma, float* K, cudaStream_t stream);
// r[i] = sum_j K_ij in float64.
void launch_row_sums(const float* K, int64_t N, double* r, cudaStream_t stream);
// s_xx[p] = a_p' K a_p (s_xx zeroed by the caller); x_index P x n; indicator: P x N floats scratch.
void launch_permutation_quadratic_forms(const float* K, int64_t N, const int64_t* x_index, int64_t P, int64_t n,
                                        float* indicator, double* s_xx, cudaStream_t stream);
}  // namespace cuda

// Host sides of the CUDA path (mmd.cpp validates first): copy in, launch on a private stream,
// synchronise once, copy out.
MMDSums mmd_sums_cuda(const MatView& x, const MatView& y, const float* neg_inv_2s2, int n_sigma);
double mmd2_permutation_cuda(const MatView& x, const MatView& y, const float* neg_inv_2s2, int n_sigma,
                             const int64_t* x_index, int64_t P, bool unbiased, double* null_out);
#endif

}  // namespace neuroadda
