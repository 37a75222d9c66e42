// Strongest straight dark ridge per tile (the QC "fold" descriptor, neuroadda_rt.qc.descriptors).
//
// Input: N tiles, each padded along its columns to `wp` columns (the caller pads: reflect or edge),
// `h` rows, the unpadded width `w` (a segment's column runs over w positions). For every angle a,
// row y of the tile is read from padded column offs[a*h + y] + x (x in [0, w)): the shear that turns
// a direction within 45 degrees of the column axis into that axis. A segment of `lens[a]` rows
// starting at row r, column x has the mean of those sheared pixels; its ridge contrast at offset k
// is  min(mean(x - k), mean(x + k)) - mean(x)  (darker than both parallel neighbours k pixels
// away), over every r, x with both neighbours inside the tile. out[n] is the largest contrast over
// every angle, offset, row and column of tile n (-inf when no segment fits).
//
// Arithmetic is float32 in a fixed order (running sums down the sheared rows, then
// (sum[r + len] - sum[r]) * float32(1 / len)), so the result is independent of the thread count.
// Memory: one (h + 1) x w float32 buffer of running sums per thread.
#pragma once
#include <cstdint>

namespace neuroadda {

struct LineRidgeInput {
  const float* tiles = nullptr;  // (n, h, wp) C-contiguous
  int64_t n = 0, h = 0, wp = 0, w = 0;
  const int32_t* offs = nullptr;  // (n_angles, h): first padded column of each sheared row
  const int32_t* lens = nullptr;  // (n_angles,): segment length in rows, 1..h
  int64_t n_angles = 0;
  const int32_t* offsets = nullptr;  // (n_offsets,): k >= 1 with 2k < w
  int64_t n_offsets = 0;
};

// Validates every index the kernel will use, then fills out[0..n).
void line_ridge(const LineRidgeInput& in, float* out);

}  // namespace neuroadda
