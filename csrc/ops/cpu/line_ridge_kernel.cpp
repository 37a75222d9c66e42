// CPU kernel of line_ridge (see ops/line_ridge.h): tiles in parallel, the column loop vectorised.
#include <algorithm>
#include <limits>
#include <vector>

#include "common/check.h"
#include "ops/line_ridge.h"

namespace neuroadda {

namespace {

void check_input(const LineRidgeInput& in) {
  NEUROADDA_CHECK(in.tiles != nullptr && in.offs != nullptr && in.lens != nullptr && in.offsets != nullptr,
                  "expected tile, shear, length and offset buffers, got a null pointer");
  NEUROADDA_CHECK(in.n >= 0 && in.h >= 1 && in.w >= 1 && in.wp >= in.w,
                  "expected n >= 0, h >= 1, 1 <= w <= padded width, got n = " << in.n << ", h = " << in.h
                                                                              << ", w = " << in.w << ", padded width = "
                                                                              << in.wp);
  NEUROADDA_CHECK(in.n_angles >= 1 && in.n_offsets >= 1,
                  "expected at least one angle and one offset, got " << in.n_angles << " and " << in.n_offsets);
  for (int64_t a = 0; a < in.n_angles; ++a) {
    NEUROADDA_CHECK(in.lens[a] >= 1 && in.lens[a] <= in.h,
                    "expected segment lengths in [1, " << in.h << "], got " << in.lens[a] << " at angle " << a);
    for (int64_t y = 0; y < in.h; ++y) {
      const int64_t o = in.offs[a * in.h + y];
      NEUROADDA_CHECK(o >= 0 && o + in.w <= in.wp, "expected shear offsets in [0, " << in.wp - in.w << "], got " << o
                                                                                    << " at angle " << a << ", row " << y);
    }
  }
  for (int64_t i = 0; i < in.n_offsets; ++i)
    NEUROADDA_CHECK(in.offsets[i] >= 1 && 2 * int64_t(in.offsets[i]) < in.w,
                    "expected ridge offsets k with 1 <= k and 2k < " << in.w << ", got " << in.offsets[i]);
}

float tile_ridge(const LineRidgeInput& in, const float* tile, std::vector<float>& cs, std::vector<float>& run) {
  const int64_t h = in.h, w = in.w, wp = in.wp;
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t a = 0; a < in.n_angles; ++a) {
    const int32_t* off = in.offs + a * h;
    float* c = cs.data();
    std::fill(c, c + w, 0.0f);
    for (int64_t y = 0; y < h; ++y) {  // running sums down the sheared rows
      const float* src = tile + y * wp + off[y];
      const float* prev = c + y * w;
      float* cur = c + (y + 1) * w;
      for (int64_t x = 0; x < w; ++x) cur[x] = prev[x] + src[x];
    }
    const int64_t len = in.lens[a];
    const float inv = static_cast<float>(1.0 / static_cast<double>(len));
    float* m = run.data();
    for (int64_t r = 0; r + len <= h; ++r) {
      const float* hi = c + (r + len) * w;
      const float* lo = c + r * w;
      for (int64_t x = 0; x < w; ++x) m[x] = (hi[x] - lo[x]) * inv;  // segment means of this row
      for (int64_t i = 0; i < in.n_offsets; ++i) {
        const int64_t k = in.offsets[i];
        float row_best = -std::numeric_limits<float>::infinity();
        for (int64_t x = k; x + k < w; ++x) {
          const float v = std::min(m[x - k], m[x + k]) - m[x];
          row_best = v > row_best ? v : row_best;
        }
        best = row_best > best ? row_best : best;
      }
    }
  }
  return best;
}

}  // namespace

void line_ridge(const LineRidgeInput& in, float* out) {
  check_input(in);
#pragma omp parallel
  {
    std::vector<float> cs(static_cast<size_t>((in.h + 1) * in.w)), run(static_cast<size_t>(in.w));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < in.n; ++n) out[n] = tile_ridge(in, in.tiles + n * in.h * in.wp, cs, run);
  }
}

}  // namespace neuroadda
