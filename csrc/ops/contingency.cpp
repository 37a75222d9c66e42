// ContingencyTable: argument checks, locking, and the order-independent scores.
#include "ops/contingency.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/check.h"

namespace neuroadda {
namespace {

using i128 = __int128;
// 2^64: x ln x is summed as round(x ln x * 2^64) in 128 bits, exact for any double term
// (ulp >= 2^-52 for x ln x >= 2 ln 2) and free of overflow below 2^57 voxels.
constexpr double kFixed = 18446744073709551616.0;

// x ln x scaled by 2^64, as an exact integer: summing these is associative, so the score does
// not depend on hash-map iteration order, block order or thread count.
inline i128 xlnx_fixed(uint64_t x) {
  if (x <= 1) return 0;
  const double v = static_cast<double>(x) * std::log(static_cast<double>(x));
  return static_cast<i128>(std::nearbyint(v * kFixed));
}

inline double fixed_to_double(i128 v) {
  // Split so that neither half loses bits before the final rounding.
  const bool neg = v < 0;
  unsigned __int128 u = neg ? static_cast<unsigned __int128>(-v) : static_cast<unsigned __int128>(v);
  const double hi = static_cast<double>(static_cast<uint64_t>(u >> 64)) * 18446744073709551616.0;
  const double lo = static_cast<double>(static_cast<uint64_t>(u));
  const double r = (hi + lo) / kFixed;
  return neg ? -r : r;
}

inline double u128_to_double(unsigned __int128 u) {
  return static_cast<double>(static_cast<uint64_t>(u >> 64)) * 18446744073709551616.0 +
         static_cast<double>(static_cast<uint64_t>(u));
}

struct Ignore {
  std::vector<uint64_t> v;
  explicit Ignore(std::vector<uint64_t> x) : v(std::move(x)) { std::sort(v.begin(), v.end()); }
  bool has(uint64_t x) const { return !v.empty() && std::binary_search(v.begin(), v.end(), x); }
};

// Marginal counts of the kept entries; map keyed by (label, 0).
struct Marginals {
  PairCountMap seg, gt;
  uint64_t n = 0;
};

Marginals marginals(const PairCountMap& map, const Ignore& ig_seg, const Ignore& ig_gt) {
  Marginals m;
  for (const auto& s : map.slots()) {
    if (!s.n || ig_seg.has(s.a) || ig_gt.has(s.b)) continue;
    m.seg.add(s.a, 0, s.n);
    m.gt.add(s.b, 0, s.n);
    m.n += s.n;
  }
  return m;
}

}  // namespace

void ContingencyTable::add(const LabelView& seg, const LabelView& gt) {
  NEUROADDA_CHECK(seg.data && gt.data, "expected two label buffers, got null");
  NEUROADDA_CHECK(seg.shape == gt.shape, "expected seg and gt of the same shape");
  NEUROADDA_CHECK(seg.strides.size() == seg.shape.size() && gt.strides.size() == gt.shape.size(),
                  "expected one stride per dimension");
  PairCountMap local;
  cpu::count_pairs(seg, gt, local);  // outside the lock: concurrent adds scan in parallel
  std::lock_guard<std::mutex> lock(mu_);
  if (map_.size() == 0 && local.size() > 0) {
    map_ = std::move(local);
  } else {
    map_.merge(local);
  }
}

void ContingencyTable::merge(const ContingencyTable& other) {
  if (&other == this) {
    std::lock_guard<std::mutex> lock(mu_);
    PairCountMap copy = map_;
    map_.merge(copy);
    return;
  }
  PairCountMap copy;
  {
    std::lock_guard<std::mutex> lock(other.mu_);
    copy = other.map_;
  }
  std::lock_guard<std::mutex> lock(mu_);
  map_.merge(copy);
}

void ContingencyTable::add_entries(const uint64_t* seg, const uint64_t* gt, const uint64_t* n, size_t k) {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < k; ++i)
    if (n[i]) map_.add(seg[i], gt[i], n[i]);
}

void ContingencyTable::entries(uint64_t* seg, uint64_t* gt, uint64_t* n) const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t j = 0;
  for (const auto& s : map_.slots()) {
    if (!s.n) continue;
    seg[j] = s.a;
    gt[j] = s.b;
    n[j] = s.n;
    ++j;
  }
}

size_t ContingencyTable::n_pairs() const {
  std::lock_guard<std::mutex> lock(mu_);
  return map_.size();
}

uint64_t ContingencyTable::total() const {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t t = 0;
  for (const auto& s : map_.slots()) t += s.n;
  return t;
}

size_t ContingencyTable::memory_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return map_.bytes();
}

ViResult ContingencyTable::variation_of_information(const std::vector<uint64_t>& ignore_seg,
                                                     const std::vector<uint64_t>& ignore_gt) const {
  std::lock_guard<std::mutex> lock(mu_);
  const Ignore ig_s(ignore_seg), ig_g(ignore_gt);
  const Marginals m = marginals(map_, ig_s, ig_g);
  if (m.n == 0) return {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::quiet_NaN(), 0};
  i128 joint = 0, sseg = 0, sgt = 0;
  for (const auto& s : map_.slots())
    if (s.n && !ig_s.has(s.a) && !ig_g.has(s.b)) joint += xlnx_fixed(s.n);
  for (const auto& s : m.seg.slots())
    if (s.n) sseg += xlnx_fixed(s.n);
  for (const auto& s : m.gt.slots())
    if (s.n) sgt += xlnx_fixed(s.n);
  const double n = static_cast<double>(m.n);
  // Exact integer differences first, one rounding after: tiny VIs keep their relative accuracy.
  return {std::max(0.0, fixed_to_double(sgt - joint) / n), std::max(0.0, fixed_to_double(sseg - joint) / n), m.n};
}

RandResult ContingencyTable::adapted_rand_error(const std::vector<uint64_t>& ignore_gt, double alpha) const {
  NEUROADDA_CHECK(alpha >= 0.0 && alpha <= 1.0, "expected alpha in [0, 1], got " << alpha);
  std::lock_guard<std::mutex> lock(mu_);
  const Ignore ig_s({}), ig_g(ignore_gt);
  const Marginals m = marginals(map_, ig_s, ig_g);
  using u128 = unsigned __int128;
  u128 joint = 0, sseg = 0, sgt = 0;
  for (const auto& s : map_.slots())
    if (s.n && !ig_g.has(s.b)) joint += static_cast<u128>(s.n) * s.n;
  for (const auto& s : m.seg.slots()) sseg += static_cast<u128>(s.n) * s.n;
  for (const auto& s : m.gt.slots()) sgt += static_cast<u128>(s.n) * s.n;
  const u128 n = m.n;
  // Pairs of distinct voxels (x2) that share a label: sum c^2 - N, exact.
  const double pj = u128_to_double(joint - n), pg = u128_to_double(sgt - n), ps = u128_to_double(sseg - n);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  // skimage's convention: "precision" divides by the gt term, "recall" by the seg term.
  const double precision = pg > 0 ? pj / pg : nan;
  const double recall = ps > 0 ? pj / ps : nan;
  const double denom = alpha * pg + (1.0 - alpha) * ps;
  const double error = denom > 0 ? 1.0 - pj / denom : nan;
  return {error, precision, recall, m.n};
}

}  // namespace neuroadda
