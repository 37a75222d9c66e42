// CPU kernels for MMD²: 16x16 register tiles over 16-row panels, exp fused in the epilogue.
// The hot per-panel functions are SIMD-cloned (AVX-512 / AVX2 / default); OpenMP runs over row
// panels in the non-cloned drivers, each panel writing its own float64 partial so the final
// reduction order is fixed. The cross kernel matrix (x against a reference y) runs over y panels
// instead, so that one x row against a large reference still uses every thread.
// Vector arguments only cross inlined calls within one clone, so the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/simd.h"
#include "ops/mmd.h"

#ifdef NEUROADDA_WITH_OPENMP
#include <omp.h>
#endif

namespace neuroadda {
namespace cpu {
typedef float v16f __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));
}  // namespace cpu

// 16 lanes at a time through the shared arithmetic of ops/mmd.h.
template <>
struct Lanes<cpu::v16f> {
  using F = cpu::v16f;
  using I = cpu::v16i;
  static inline F splat(float v) { return F{} + v; }
  static inline F max(F a, F b) { return a < b ? b : a; }
  static inline I trunc(F v) { return __builtin_convertvector(v, I); }
  static inline F to_float(I v) { return __builtin_convertvector(v, F); }
  static inline F from_bits(I b) { return (F)b; }
};

namespace cpu {
namespace {

constexpr int kT = 16;  // tile edge = panel height = one 512-bit vector of floats

enum class Mode { Sums, Matrix, Dists };

// c[r][lane] = A_r . B_lane, r < R, for two packed panels (each d x 16, k-major; A may start at
// any row of its panel); inlined into the cloned callers so c stays in registers.
template <int R = kT>
__attribute__((always_inline)) inline void tile_dot(const float* __restrict A, const float* __restrict B,
                                                    int64_t d, v16f* c) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) c[r] = v16f{};
  for (int64_t k = 0; k < d; ++k) {
    v16f b;
    std::memcpy(&b, B + k * kT, sizeof(b));
    const float* a = A + k * kT;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) c[r] += a[r] * b;
  }
}

inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

struct PanelJob {
  const float* panels;
  const float* norms;
  const int* valid;       // valid rows per panel
  const int64_t* first;   // first output row of each panel (Matrix/Dists modes)
  int64_t n_panels;
  int64_t split;          // panels < split hold x, the rest y (Sums mode)
  int64_t d;
  const float* coef;      // -1 / (2 sigma²)
  int n_sigma;
  int blocks;
  float* out;             // Matrix: N x N; Dists: upper triangle of s x s
  int64_t out_n;          // Matrix: row stride of out; Dists: s
};

// One row panel P against panels Q >= P.
// Sums: partial[0..2] += (kxx, kyy, kxy) off-diagonal ordered-pair sums. Cloned: every call runs
// the best instruction set of this CPU.
template <Mode M>
NEUROADDA_SIMD_CLONES void row_panel(const PanelJob& job, int64_t P, double* partial) {
  using L = Lanes<v16f>;
  v16f c[kT];
  alignas(64) float buf[kT * kT];
  const float inv_s = 1.0f / static_cast<float>(job.n_sigma);
  const float* A = job.panels + P * job.d * kT;
  const float* na = job.norms + P * kT;
  const int va = job.valid[P];
  const bool px = P < job.split;
  v16f lane;
  for (int l = 0; l < kT; ++l) lane[l] = static_cast<float>(l);
  for (int64_t Q = P; Q < job.n_panels; ++Q) {
    int block = 0;  // 0 xx, 1 yy, 2 xy
    if (M == Mode::Sums) {
      const bool qx = Q < job.split;
      block = (px && qx) ? 0 : (!px && !qx) ? 1 : 2;
      if (!(job.blocks & (1 << block))) continue;
    }
    const float* B = job.panels + Q * job.d * kT;
    const v16f nb = load16(job.norms + Q * kT);
    const int vb = job.valid[Q];
    tile_dot(A, B, job.d, c);
    if (M == Mode::Dists) {
#pragma GCC unroll 16
      for (int r = 0; r < kT; ++r) {
        const v16f d2 = sq_dist_from_dot(L::splat(na[r]), nb, c[r]);
        std::memcpy(buf + r * kT, &d2, sizeof(d2));
      }
      for (int r = 0; r < va; ++r) {
        const int64_t i = job.first[P] + r;
        const int c0 = (P == Q) ? r + 1 : 0;
        if (c0 >= vb) continue;
        const int64_t j0 = job.first[Q] + c0;
        float* dst = job.out + i * job.out_n - i * (i + 1) / 2 + (j0 - i - 1);
        std::memcpy(dst, buf + r * kT + c0, sizeof(float) * (vb - c0));
      }
      continue;
    }
    if (M == Mode::Matrix) {
#pragma GCC unroll 16
      for (int r = 0; r < kT; ++r) {
        const v16f k = gaussian_mean_kernel(sq_dist_from_dot(L::splat(na[r]), nb, c[r]), job.coef, job.n_sigma, inv_s);
        std::memcpy(buf + r * kT, &k, sizeof(k));
      }
      for (int r = 0; r < va; ++r) {
        const int64_t i = job.first[P] + r;
        for (int cc = 0; cc < vb; ++cc) {
          const int64_t j = job.first[Q] + cc;
          const float v = (i == j) ? 1.0f : buf[r * kT + cc];
          job.out[i * job.out_n + j] = v;
          job.out[j * job.out_n + i] = v;
        }
      }
      continue;
    }
    // Sums: column sums of the tile in float32 (16 terms), then float64.
    v16f colsum{};
    if (P != Q && va == kT && vb == kT) {
#pragma GCC unroll 16
      for (int r = 0; r < kT; ++r)
        colsum += gaussian_mean_kernel(sq_dist_from_dot(L::splat(na[r]), nb, c[r]), job.coef, job.n_sigma, inv_s);
    } else {
      // Mask padding rows / columns and, on diagonal tiles, all but the strict upper triangle.
      const v16f vbv = L::splat(static_cast<float>(vb));
      for (int r = 0; r < va; ++r) {
        const v16f k = gaussian_mean_kernel(sq_dist_from_dot(L::splat(na[r]), nb, c[r]), job.coef, job.n_sigma, inv_s);
        const v16f lo = L::splat(P == Q ? static_cast<float>(r) : -1.0f);
        colsum += (lane > lo && lane < vbv) ? k : v16f{};
      }
    }
    double t = 0.0;
    for (int l = 0; l < kT; ++l) t += static_cast<double>(colsum[l]);
    partial[block] += t;
  }
}

// a' K a for a block of permutations: for each p, sum_{i in x_p} (1 + 2 sum_{j>i, j in x_p} K_ij).
// Rows of K and of the 0/1 indicators have stride ld (multiple of 16, zero padded). Rows go in
// 16-row blocks: left of column i0 + 16 only the diagonal 16 x 16 tile remains (scalar), right of
// it a rectangle shared by all 16 rows, walked in column chunks so that a chunk of one indicator
// row (L1) serves up to 16 rows of K and the 16 x chunk tile of K (L2) serves every permutation.
// float32 lanes are flushed to float64 after each chunk.
NEUROADDA_SIMD_CLONES void quad_forms_block(const float* K, int64_t N, int64_t ld, const float* ind, int nb,
                                            int64_t n_x, double* out) {
  constexpr int64_t kChunk = 1024;
  std::vector<double> dsum(static_cast<size_t>(nb), 0.0);
  for (int64_t i0 = 0; i0 < N; i0 += kT) {
    const int64_t i1 = std::min(N, i0 + kT);
    const int64_t jr = i0 + kT;  // start of the rectangle (multiple of 16, <= ld)
    for (int p = 0; p < nb; ++p) {
      const float* a = ind + static_cast<int64_t>(p) * ld;
      double h = 0.0;
      for (int64_t i = i0; i < i1; ++i) {
        if (a[i] == 0.0f) continue;
        const float* row = K + i * ld;
        for (int64_t j = i + 1; j < std::min(jr, N); ++j) h += static_cast<double>(row[j] * a[j]);
      }
      dsum[p] += h;
    }
    for (int64_t jb = jr; jb < ld; jb += kChunk) {
      const int64_t je = std::min(ld, jb + kChunk);
      for (int p = 0; p < nb; ++p) {
        const float* a = ind + static_cast<int64_t>(p) * ld;
        v16f s0{}, s1{};
        for (int64_t i = i0; i < i1; ++i) {
          if (a[i] == 0.0f) continue;
          const float* row = K + i * ld;
          int64_t j = jb;
          for (; j + 2 * kT <= je; j += 2 * kT) {
            s0 += load16(row + j) * load16(a + j);
            s1 += load16(row + j + kT) * load16(a + j + kT);
          }
          for (; j < je; j += kT) s0 += load16(row + j) * load16(a + j);
        }
        const v16f sv = s0 + s1;
        double t = 0.0;
        for (int l = 0; l < kT; ++l) t += static_cast<double>(sv[l]);
        dsum[p] += t;
      }
    }
  }
  for (int p = 0; p < nb; ++p) out[p] = static_cast<double>(n_x) + 2.0 * dsum[p];
}

// R rows of x (broadcast, from a packed x panel at row r0) against one packed y panel (lanes):
// out[r * ld + lane] = k(x_r, y_lane) for lane < vb.
template <int R>
__attribute__((always_inline)) inline void cross_rows(const float* A, const float* na, const float* B, const v16f& nb,
                                                      int64_t d, const float* coef, int n_sigma, float inv_s, int vb,
                                                      float* out, int64_t ld) {
  using L = Lanes<v16f>;
  v16f c[R];
  tile_dot<R>(A, B, d, c);
  // One (not R) inlined copy of the epilogue: unrolled, the exp code no longer inlines and the
  // vectors go through the stack.
  alignas(64) float buf[R * kT];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) std::memcpy(buf + r * kT, &c[r], sizeof(v16f));
#pragma GCC unroll 1
  for (int r = 0; r < R; ++r) {
    const v16f k = gaussian_mean_kernel(sq_dist_from_dot(L::splat(na[r]), nb, load16(buf + r * kT)), coef, n_sigma,
                                        inv_s);
    std::memcpy(out + r * ld, &k, sizeof(float) * vb);
  }
}

// x panels [p0, p1) against one packed y panel (vb valid rows), writing columns out[:, 0:vb]
// (out: row stride ld, row 0 = x row 0). Only the valid x rows are computed, in blocks of 16
// (wide: 32 vector registers, AVX-512) or 4 rows (16 registers: 16 x 2 accumulators would
// spill), then 2 and 1, so a single x row costs one row of multiply-adds, not a 16-row tile.
NEUROADDA_SIMD_CLONES void cross_panel(const PackedSet& xs, int64_t p0, int64_t p1, const float* B, const float* bn,
                                       int vb, const float* coef, int n_sigma, bool wide, float* out, int64_t ld) {
  const float inv_s = 1.0f / static_cast<float>(n_sigma);
  const int64_t d = xs.d;
  const v16f nb = load16(bn);
  for (int64_t P = p0; P < p1; ++P) {
    const float* A = xs.panels.data() + P * d * kT;
    const float* na = xs.norms.data() + P * kT;
    const int va = static_cast<int>(std::min<int64_t>(kT, xs.rows - P * kT));
    float* o = out + P * kT * ld;
    int r = 0;
    if (wide && va == kT) {
      cross_rows<kT>(A, na, B, nb, d, coef, n_sigma, inv_s, vb, o, ld);
      continue;
    }
    for (; r + 4 <= va; r += 4) cross_rows<4>(A + r, na + r, B, nb, d, coef, n_sigma, inv_s, vb, o + r * ld, ld);
    if (r + 2 <= va) {
      cross_rows<2>(A + r, na + r, B, nb, d, coef, n_sigma, inv_s, vb, o + r * ld, ld);
      r += 2;
    }
    if (r < va) cross_rows<1>(A + r, na + r, B, nb, d, coef, n_sigma, inv_s, vb, o + r * ld, ld);
  }
}

inline int num_threads_for(int64_t work_items) {
#ifdef NEUROADDA_WITH_OPENMP
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), work_items)));
#else
  (void)work_items;
  return 1;
#endif
}

template <Mode M>
void run_panels(const PanelJob& job, std::vector<double>* partials) {
  const int64_t NP = job.n_panels;
  if (partials) partials->assign(static_cast<size_t>(NP) * 3, 0.0);
  double* part = partials ? partials->data() : nullptr;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads_for(NP))
  for (int64_t P = 0; P < NP; ++P) {
    double local[3] = {0.0, 0.0, 0.0};
    row_panel<M>(job, P, local);
    if (part) {
      part[P * 3 + 0] = local[0];
      part[P * 3 + 1] = local[1];
      part[P * 3 + 2] = local[2];
    }
  }
}

}  // namespace

// Row `row` of v into lane r of a k-major panel (dst = panel + r); returns the number of
// non-finite values. The squared norm is accumulated in float64 in k order, then rounded.
inline int64_t pack_row(const MatView& v, int64_t row, float* dst, float* norm) {
  const float* src = v.data + row * v.row_stride;
  int64_t bad = 0;
  double nrm = 0.0;
  for (int64_t k = 0; k < v.cols; ++k) {
    const float val = src[k * v.col_stride];
    bad += !std::isfinite(val);
    dst[k * kT] = val;
    nrm += static_cast<double>(val) * val;
  }
  *norm = static_cast<float>(nrm);
  return bad;
}

// Packs rows (given by a row mapper) into 16-row k-major panels with float32 norms computed in
// float64; counts non-finite values. Padding rows are zero (the panels come zeroed).
template <class RowAt>
static void pack_into(PackedSet& ps, int64_t rows, int64_t d, int64_t panel0, RowAt row_at, int64_t* n_bad) {
  const int64_t np = (rows + kT - 1) / kT;
  int64_t bad = 0;
  // a thread per ~1M values at most (fewer, a thread costs more than it saves)
#pragma omp parallel for schedule(static) reduction(+ : bad) num_threads(num_threads_for(rows * d >> 20))
  for (int64_t p = 0; p < np; ++p) {
    float* dst = ps.panels.data() + (panel0 + p) * d * kT;
    const int va = static_cast<int>(std::min<int64_t>(kT, rows - p * kT));
    for (int r = 0; r < va; ++r) {
      const auto ref = row_at(p * kT + r);  // (view, row)
      bad += pack_row(*ref.first, ref.second, dst + r, &ps.norms[(panel0 + p) * kT + r]);
    }
  }
  *n_bad += bad;
}

PackedSet pack_rows(const MatView& v, const int64_t* row_index, int64_t n_index) {
  PackedSet ps;
  ps.rows = row_index ? n_index : v.rows;
  ps.d = v.cols;
  ps.n_panels = (ps.rows + kT - 1) / kT;
  ps.panels.assign(static_cast<size_t>(ps.n_panels * ps.d * kT), 0.0f);
  ps.norms.assign(static_cast<size_t>(ps.n_panels * kT), 0.0f);
  int64_t bad = 0;
  pack_into(ps, ps.rows, ps.d, 0,
            [&](int64_t i) { return std::make_pair(&v, row_index ? row_index[i] : i); }, &bad);
  NEUROADDA_CHECK(bad == 0, "expected finite features, got " << bad << " NaN or inf values");
  return ps;
}

namespace {
// x and y packed into one panel array; split = number of x panels.
struct Pooled {
  PackedSet ps;
  int64_t split = 0;
  std::vector<int> valid;
  std::vector<int64_t> first;
};

Pooled pack_pooled(const MatView& x, const MatView& y, bool pad_between) {
  Pooled out;
  const int64_t d = x.cols;
  const int64_t N = x.rows + y.rows;
  PackedSet& ps = out.ps;
  ps.d = d;
  ps.rows = N;
  int64_t bad = 0;
  if (pad_between) {
    const int64_t px = (x.rows + kT - 1) / kT, py = (y.rows + kT - 1) / kT;
    ps.n_panels = px + py;
    out.split = px;
    ps.panels.assign(static_cast<size_t>(ps.n_panels * d * kT), 0.0f);
    ps.norms.assign(static_cast<size_t>(ps.n_panels * kT), 0.0f);
    pack_into(ps, x.rows, d, 0, [&](int64_t i) { return std::make_pair(&x, i); }, &bad);
    NEUROADDA_CHECK(bad == 0, "expected finite features, got " << bad << " NaN or inf values in x");
    pack_into(ps, y.rows, d, px, [&](int64_t i) { return std::make_pair(&y, i); }, &bad);
    NEUROADDA_CHECK(bad == 0, "expected finite features, got " << bad << " NaN or inf values in y");
    for (int64_t p = 0; p < px; ++p) {
      out.valid.push_back(static_cast<int>(std::min<int64_t>(kT, x.rows - p * kT)));
      out.first.push_back(p * kT);
    }
    for (int64_t p = 0; p < py; ++p) {
      out.valid.push_back(static_cast<int>(std::min<int64_t>(kT, y.rows - p * kT)));
      out.first.push_back(x.rows + p * kT);
    }
  } else {
    ps.n_panels = (N + kT - 1) / kT;
    out.split = ps.n_panels;
    ps.panels.assign(static_cast<size_t>(ps.n_panels * d * kT), 0.0f);
    ps.norms.assign(static_cast<size_t>(ps.n_panels * kT), 0.0f);
    pack_into(ps, N, d, 0,
              [&](int64_t i) { return i < x.rows ? std::make_pair(&x, i) : std::make_pair(&y, i - x.rows); },
              &bad);
    NEUROADDA_CHECK(bad == 0, "expected finite features, got " << bad << " NaN or inf values");
    for (int64_t p = 0; p < ps.n_panels; ++p) {
      out.valid.push_back(static_cast<int>(std::min<int64_t>(kT, N - p * kT)));
      out.first.push_back(p * kT);
    }
  }
  return out;
}
}  // namespace

MMDSums mmd_sums_views(const MatView& x, const MatView& y, const float* coef, int n_sigma, int blocks) {
  Pooled pooled = pack_pooled(x, y, /*pad_between=*/true);
  PanelJob job{pooled.ps.panels.data(), pooled.ps.norms.data(), pooled.valid.data(), pooled.first.data(),
               pooled.ps.n_panels, pooled.split, pooled.ps.d, coef, n_sigma, blocks, nullptr, 0};
  std::vector<double> part;
  run_panels<Mode::Sums>(job, &part);
  MMDSums s;
  for (int64_t P = 0; P < job.n_panels; ++P) {  // fixed order: thread-count independent
    s.kxx += part[P * 3 + 0];
    s.kyy += part[P * 3 + 1];
    s.kxy += part[P * 3 + 2];
  }
  s.kxx *= 2.0;  // ordered pairs: the upper triangle counted twice
  s.kyy *= 2.0;
  return s;
}

void pairwise_sq_dists_upper(const PackedSet& z, float* out) {
  std::vector<int> valid;
  std::vector<int64_t> first;
  for (int64_t p = 0; p < z.n_panels; ++p) {
    valid.push_back(static_cast<int>(std::min<int64_t>(kT, z.rows - p * kT)));
    first.push_back(p * kT);
  }
  PanelJob job{z.panels.data(), z.norms.data(), valid.data(), first.data(), z.n_panels, z.n_panels, z.d,
               nullptr, 1, kBlockAll, out, z.rows};
  run_panels<Mode::Dists>(job, nullptr);
}

void kernel_matrix(const PackedSet& z, const float* neg_inv_2s2, int n_sigma, float* out, int64_t ld) {
  std::vector<int> valid;
  std::vector<int64_t> first;
  for (int64_t p = 0; p < z.n_panels; ++p) {
    valid.push_back(static_cast<int>(std::min<int64_t>(kT, z.rows - p * kT)));
    first.push_back(p * kT);
  }
  PanelJob job{z.panels.data(), z.norms.data(), valid.data(), first.data(), z.n_panels, z.n_panels, z.d,
               neg_inv_2s2, n_sigma, kBlockAll, out, ld};
  run_panels<Mode::Matrix>(job, nullptr);
}

void cross_kernel_matrix(const MatView& x, const MatView& y, const float* neg_inv_2s2, int n_sigma, float* out) {
  // x (typically a few rows) is packed once; each work item packs one 16-row y panel into a
  // per-thread buffer (L1-sized) and runs a chunk of x panels against it, so the reference is
  // read once per call and never copied whole. Work items: y panels, times x chunks when there
  // are too few y panels for the threads.
  const PackedSet xs = pack_rows(x);  // throws on NaN / inf in x
  const int64_t d = x.cols, m = y.rows;
  const int64_t ny = (m + kT - 1) / kT, nx = xs.n_panels;
  // A thread per ~4M multiply-adds at most: below that, starting and joining threads costs more
  // than it saves, above all on a loaded machine (the QC monitor shares it with the encoder).
  constexpr int64_t kGrain = int64_t{1} << 22;
  const int threads = num_threads_for((x.rows + 1) * m * d / kGrain);
  const int64_t x_chunks = std::min<int64_t>(nx, std::max<int64_t>(1, (2 * threads + ny - 1) / ny));
  const int64_t per_chunk = (nx + x_chunks - 1) / x_chunks;
  const int64_t items = ny * x_chunks;
  const bool wide = __builtin_cpu_supports("avx512f");
  int64_t bad = 0;
#pragma omp parallel num_threads(threads) reduction(+ : bad)
  {
    std::vector<float> bp(static_cast<size_t>(d * kT), 0.0f);
    alignas(64) float bn[kT] = {};
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t Q = it / x_chunks, c = it % x_chunks;
      const int vb = static_cast<int>(std::min<int64_t>(kT, m - Q * kT));
      int64_t b = 0;
      for (int r = 0; r < vb; ++r) b += pack_row(y, Q * kT + r, bp.data() + r, bn + r);
      if (vb < kT) {  // the last panel: zero the lanes a previous panel left behind
        for (int64_t k = 0; k < d; ++k) std::fill(bp.data() + k * kT + vb, bp.data() + (k + 1) * kT, 0.0f);
        std::fill(bn + vb, bn + kT, 0.0f);
      }
      bad += b;
      if (b == 0)
        cross_panel(xs, c * per_chunk, std::min(nx, (c + 1) * per_chunk), bp.data(), bn, vb, neg_inv_2s2, n_sigma,
                    wide, out + Q * kT, m);
    }
  }
  NEUROADDA_CHECK(bad == 0, "expected finite features, got " << bad << " NaN or inf values in y");
}

PackedSet pack_pooled_contiguous(const MatView& x, const MatView& y) {
  return pack_pooled(x, y, /*pad_between=*/false).ps;
}

void permutation_quadratic_forms(const float* K, int64_t N, int64_t ld, const int64_t* x_index, int64_t P, int64_t n,
                                 double* s_xx) {
  // Blocks of permutations share each pass over K (K is streamed from memory once per block).
  const int64_t threads = num_threads_for(P);
  const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(64, (P + threads - 1) / threads));
  const int64_t n_blocks = (P + nb - 1) / nb;
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    std::vector<float> ind(static_cast<size_t>(nb * ld));
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t p0 = b * nb;
      const int cnt = static_cast<int>(std::min<int64_t>(nb, P - p0));
      std::fill(ind.begin(), ind.end(), 0.0f);
      for (int p = 0; p < cnt; ++p) {
        const int64_t* idx = x_index + (p0 + p) * n;
        float* a = ind.data() + static_cast<int64_t>(p) * ld;
        for (int64_t t = 0; t < n; ++t) a[idx[t]] = 1.0f;
      }
      quad_forms_block(K, N, ld, ind.data(), cnt, n, s_xx + p0);
    }
  }
}

}  // namespace cpu
}  // namespace neuroadda
