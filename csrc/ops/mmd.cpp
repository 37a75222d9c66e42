// MMD²: input checks and CPU / CUDA dispatch (decided once per call, outside the kernels).
#include "ops/mmd.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace neuroadda {
namespace {

void check_view(const MatView& v, const char* name) {
  NEUROADDA_CHECK(v.data != nullptr || v.rows * v.cols == 0, "expected data for " << name << ", got a null pointer");
  NEUROADDA_CHECK(v.rows >= 1, "expected at least 1 sample in " << name << ", got " << v.rows);
  NEUROADDA_CHECK(v.cols >= 1, "expected at least 1 feature in " << name << ", got " << v.cols);
}

void check_pair(const MatView& x, const MatView& y) {
  check_view(x, "x");
  check_view(y, "y");
  NEUROADDA_CHECK(x.cols == y.cols,
                  "expected x and y with the same feature dimension, got " << x.cols << " and " << y.cols);
}

// -1 / (2 sigma²) per bandwidth, validated.
std::vector<float> kernel_coefs(const std::vector<double>& sigmas) {
  NEUROADDA_CHECK(!sigmas.empty() && static_cast<int>(sigmas.size()) <= kMaxSigmas,
                  "expected 1 to " << kMaxSigmas << " bandwidths, got " << sigmas.size());
  std::vector<float> c;
  for (double s : sigmas) {
    NEUROADDA_CHECK(std::isfinite(s) && s > 0.0, "expected sigma > 0 and finite, got " << s);
    const double v = -1.0 / (2.0 * s * s);
    NEUROADDA_CHECK(std::isfinite(v) && v > -3.0e38, "expected sigma representable in float32, got " << s);
    c.push_back(static_cast<float>(v));
  }
  return c;
}

void check_unbiased(const MatView& x, const MatView& y, bool unbiased) {
  if (unbiased)
    NEUROADDA_CHECK(x.rows >= 2 && y.rows >= 2, "expected at least 2 samples in x and y for the unbiased "
                                                "estimator, got n=" << x.rows << ", m=" << y.rows);
}

}  // namespace

MMDSums mmd_sums(const MatView& x, const MatView& y, const std::vector<double>& sigmas, int blocks, Device device) {
  check_pair(x, y);
  const std::vector<float> coef = kernel_coefs(sigmas);
  NEUROADDA_CHECK(blocks >= 1 && blocks <= kBlockAll, "expected a block mask in 1..7, got " << blocks);
  if (device == Device::CUDA) {
#ifdef NEUROADDA_WITH_CUDA
    MMDSums s = mmd_sums_cuda(x, y, coef.data(), static_cast<int>(coef.size()));
    if (!(blocks & kBlockXX)) s.kxx = 0.0;
    if (!(blocks & kBlockYY)) s.kyy = 0.0;
    if (!(blocks & kBlockXY)) s.kxy = 0.0;
    return s;
#else
    NEUROADDA_CHECK(false, "expected a CUDA build for device=cuda, got a CPU-only build");
#endif
  }
  return cpu::mmd_sums_views(x, y, coef.data(), static_cast<int>(coef.size()), blocks);
}

double mmd2(const MatView& x, const MatView& y, const std::vector<double>& sigmas, bool unbiased, Device device) {
  check_pair(x, y);
  check_unbiased(x, y, unbiased);
  const MMDSums s = mmd_sums(x, y, sigmas, kBlockAll, device);
  return mmd2_from_sums(s.kxx, s.kyy, s.kxy, static_cast<double>(x.rows), static_cast<double>(y.rows), unbiased);
}

void gaussian_kernel_matrix(const MatView& x, const MatView& y, const std::vector<double>& sigmas, float* out) {
  check_pair(x, y);
  const std::vector<float> coef = kernel_coefs(sigmas);
  cpu::cross_kernel_matrix(x, y, coef.data(), static_cast<int>(coef.size()), out);
}

double median_sigma(const MatView& x, const MatView& y, int64_t max_points) {
  check_pair(x, y);
  NEUROADDA_CHECK(max_points >= 2, "expected max_points >= 2, got " << max_points);
  const int64_t N = x.rows + y.rows;
  const int64_t s = std::min(N, max_points);
  // Deterministic, evenly spread subsample of the pooled rows (no RNG, keeps the x/y ratio).
  std::vector<int64_t> pooled(static_cast<size_t>(s));
  for (int64_t t = 0; t < s; ++t) pooled[t] = static_cast<int64_t>((static_cast<__int128>(t) * N) / s);
  // Every row is checked (not only the sampled ones) so that the heuristic never hides a NaN.
  for (const MatView* v : {&x, &y}) {
    int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad)
    for (int64_t i = 0; i < v->rows; ++i)
      for (int64_t k = 0; k < v->cols; ++k) bad += !std::isfinite(v->at(i, k));
    NEUROADDA_CHECK(bad == 0, "expected finite features, got " << bad << " NaN or inf values in "
                                                                << (v == &x ? "x" : "y"));
  }
  std::vector<float> dense(static_cast<size_t>(s * x.cols));
  for (int64_t t = 0; t < s; ++t) {
    const int64_t i = pooled[t];
    const MatView& v = i < x.rows ? x : y;
    const int64_t row = i < x.rows ? i : i - x.rows;
    for (int64_t k = 0; k < x.cols; ++k) dense[t * x.cols + k] = v.at(row, k);
  }
  const cpu::PackedSet z = cpu::pack_rows(MatView{dense.data(), s, x.cols, x.cols, 1});
  dense = std::vector<float>();
  const int64_t M = s * (s - 1) / 2;
  std::vector<float> d2(static_cast<size_t>(M));
  cpu::pairwise_sq_dists_upper(z, d2.data());
  const int64_t mid = M / 2;
  std::nth_element(d2.begin(), d2.begin() + mid, d2.end());
  double med = d2[mid];
  if (M % 2 == 0) {
    const float lower = *std::max_element(d2.begin(), d2.begin() + mid);
    med = 0.5 * (med + static_cast<double>(lower));
  }
  return std::sqrt(med / 2.0);
}

double mmd2_permutation(const MatView& x, const MatView& y, const std::vector<double>& sigmas,
                        const int64_t* x_index, int64_t P, bool unbiased, double* null_out, Device device) {
  check_pair(x, y);
  check_unbiased(x, y, unbiased);
  const std::vector<float> coef = kernel_coefs(sigmas);
  const int64_t n = x.rows, m = y.rows, N = n + m;
  NEUROADDA_CHECK(P >= 0, "expected n_permutations >= 0, got " << P);
  NEUROADDA_CHECK(P == 0 || x_index != nullptr, "expected permutation indices, got a null pointer");
  {
    // Out-of-range or repeated indices would corrupt memory or the statistic: refuse them.
    std::vector<unsigned char> seen(static_cast<size_t>(N));
    for (int64_t p = 0; p < P; ++p) {
      const int64_t* idx = x_index + p * n;
      for (int64_t t = 0; t < n; ++t) {
        NEUROADDA_CHECK(idx[t] >= 0 && idx[t] < N,
                        "expected permutation indices in [0, " << N << "), got " << idx[t]);
        NEUROADDA_CHECK(seen[idx[t]] != static_cast<unsigned char>(p % 255 + 1),
                        "expected distinct permutation indices, got " << idx[t] << " twice in permutation " << p);
        seen[idx[t]] = static_cast<unsigned char>(p % 255 + 1);
      }
      if (p % 255 == 254) std::fill(seen.begin(), seen.end(), 0);
    }
  }
  if (device == Device::CUDA) {
#ifdef NEUROADDA_WITH_CUDA
    return mmd2_permutation_cuda(x, y, coef.data(), static_cast<int>(coef.size()), x_index, P, unbiased, null_out);
#else
    NEUROADDA_CHECK(false, "expected a CUDA build for device=cuda, got a CPU-only build");
#endif
  }
  const cpu::PackedSet z = cpu::pack_pooled_contiguous(x, y);
  const int64_t ld = (N + 15) / 16 * 16;  // padded rows: whole 16-float vectors, no scalar tails
  std::vector<float> K(static_cast<size_t>(N * ld));
  cpu::kernel_matrix(z, coef.data(), static_cast<int>(coef.size()), K.data(), ld);
  std::vector<double> r(static_cast<size_t>(N));
  double total = 0.0;
  {
    const float* Kp = K.data();
    double* rp = r.data();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; ++i) {
      double acc = 0.0;
      const float* row = Kp + i * ld;
      for (int64_t j = 0; j < N; ++j) acc += row[j];
      rp[i] = acc;
    }
    for (int64_t i = 0; i < N; ++i) total += r[i];
  }
  std::vector<int64_t> identity(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) identity[i] = i;
  double s_obs = 0.0;
  cpu::permutation_quadratic_forms(K.data(), N, ld, identity.data(), 1, n, &s_obs);
  std::vector<double> s_xx(static_cast<size_t>(P));
  if (P > 0) cpu::permutation_quadratic_forms(K.data(), N, ld, x_index, P, n, s_xx.data());
  const double dn = static_cast<double>(n), dm = static_cast<double>(m);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t* idx = x_index + p * n;
    double a_r = 0.0;
    for (int64_t t = 0; t < n; ++t) a_r += r[idx[t]];
    null_out[p] = mmd2_from_quadratic_form(s_xx[p], a_r, total, dn, dm, unbiased);
  }
  double a_r = 0.0;
  for (int64_t t = 0; t < n; ++t) a_r += r[t];
  return mmd2_from_quadratic_form(s_obs, a_r, total, dn, dm, unbiased);
}

}  // namespace neuroadda
