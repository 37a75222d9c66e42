// Multithreaded pair counting for the contingency table: run-length counting in memory order,
// per-thread hash maps, merged at the end. Any strides, any pair of integer dtypes, no copies.
#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <type_traits>

#include "ops/contingency.h"
#ifdef NEUROADDA_WITH_OPENMP
#include <omp.h>
#endif

namespace neuroadda {
namespace cpu {
namespace {

template <class T>
inline uint64_t to_key(T v) {
  if constexpr (std::is_signed<T>::value) return static_cast<uint64_t>(static_cast<int64_t>(v));
  else return static_cast<uint64_t>(v);
}

struct Run {
  uint64_t a = 0, b = 0, n = 0;
  void flush(PairCountMap& map) {
    if (n) map.add(a, b, n);
    n = 0;
  }
};

// A loop nest over the common shape: inner dim (len, strides) plus outer dims as a mixed radix.
struct Nest {
  int64_t inner = 1, s_in = 0, g_in = 0;
  std::vector<int64_t> shape, s_str, g_str;  // outer dims, outermost first
  int64_t outer() const {
    int64_t o = 1;
    for (int64_t s : shape) o *= s;
    return o;
  }
};

Nest make_nest(const LabelView& seg, const LabelView& gt) {
  std::vector<int> dims;
  for (size_t d = 0; d < seg.shape.size(); ++d)
    if (seg.shape[d] != 1) dims.push_back(static_cast<int>(d));
  // Walk memory in seg's order (largest |stride| outermost) so the inner loop is seg's fastest axis.
  std::stable_sort(dims.begin(), dims.end(), [&](int x, int y) {
    const int64_t sx = std::llabs(seg.strides[x]), sy = std::llabs(seg.strides[y]);
    if (sx != sy) return sx > sy;
    return std::llabs(gt.strides[x]) > std::llabs(gt.strides[y]);
  });
  std::vector<int64_t> sh, ss, gs;
  for (int d : dims) {
    const int64_t n = seg.shape[d], s = seg.strides[d], g = gt.strides[d];
    if (!sh.empty() && ss.back() == s * n && gs.back() == g * n) {  // coalesce with the outer dim
      sh.back() *= n;
      ss.back() = s;
      gs.back() = g;
    } else {
      sh.push_back(n);
      ss.push_back(s);
      gs.push_back(g);
    }
  }
  Nest nest;
  if (!sh.empty()) {
    nest.inner = sh.back();
    nest.s_in = ss.back();
    nest.g_in = gs.back();
    sh.pop_back();
    ss.pop_back();
    gs.pop_back();
  }
  nest.shape = sh;
  nest.s_str = ss;
  nest.g_str = gs;
  return nest;
}

template <class A, class B>
void scan_range(const Nest& nest, const A* seg, const B* gt, int64_t g0, int64_t g1, PairCountMap& map) {
  const int64_t L = nest.inner;
  const size_t D = nest.shape.size();
  std::vector<int64_t> idx(D, 0);
  int64_t o = g0 / L, l = g0 % L;
  int64_t off_s = 0, off_g = 0;
  for (size_t d = D; d-- > 0;) {  // mixed-radix decomposition of the outer index
    idx[d] = o % nest.shape[d];
    o /= nest.shape[d];
    off_s += idx[d] * nest.s_str[d];
    off_g += idx[d] * nest.g_str[d];
  }
  Run run;
  int64_t remaining = g1 - g0;
  while (remaining > 0) {
    const int64_t len = std::min(L - l, remaining);
    const A* sp = seg + off_s + l * nest.s_in;
    const B* gp = gt + off_g + l * nest.g_in;
    if (nest.s_in == 1 && nest.g_in == 1) {
      for (int64_t i = 0; i < len; ++i) {
        const uint64_t a = to_key(sp[i]), b = to_key(gp[i]);
        if (a == run.a && b == run.b) {
          ++run.n;
        } else {
          run.flush(map);
          run = {a, b, 1};
        }
      }
    } else {
      const int64_t ss = nest.s_in, gs = nest.g_in;
      for (int64_t i = 0; i < len; ++i) {
        const uint64_t a = to_key(sp[i * ss]), b = to_key(gp[i * gs]);
        if (a == run.a && b == run.b) {
          ++run.n;
        } else {
          run.flush(map);
          run = {a, b, 1};
        }
      }
    }
    remaining -= len;
    l = 0;
    for (size_t d = D; d-- > 0;) {  // advance the outer counter
      off_s += nest.s_str[d];
      off_g += nest.g_str[d];
      if (++idx[d] < nest.shape[d]) break;
      off_s -= idx[d] * nest.s_str[d];
      off_g -= idx[d] * nest.g_str[d];
      idx[d] = 0;
    }
  }
  run.flush(map);
}

template <class A, class B>
void count_typed(const Nest& nest, const A* seg, const B* gt, PairCountMap& out) {
  const int64_t total = nest.outer() * nest.inner;
  constexpr int64_t kPiece = int64_t(1) << 20;  // voxels per scheduling unit
  const int64_t n_pieces = (total + kPiece - 1) / kPiece;
  if (n_pieces <= 1) {
    scan_range(nest, seg, gt, 0, total, out);
    return;
  }
#pragma omp parallel
  {
    PairCountMap local;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t p = 0; p < n_pieces; ++p) scan_range(nest, seg, gt, p * kPiece, std::min(total, (p + 1) * kPiece), local);
#pragma omp critical(neuroadda_contingency_merge)
    out.merge(local);
  }
}

template <class A>
void dispatch_gt(const Nest& nest, const A* seg, const LabelView& gt, PairCountMap& out) {
  switch (gt.type) {
    case LabelType::I8: return count_typed(nest, seg, static_cast<const int8_t*>(gt.data), out);
    case LabelType::U8: return count_typed(nest, seg, static_cast<const uint8_t*>(gt.data), out);
    case LabelType::I16: return count_typed(nest, seg, static_cast<const int16_t*>(gt.data), out);
    case LabelType::U16: return count_typed(nest, seg, static_cast<const uint16_t*>(gt.data), out);
    case LabelType::I32: return count_typed(nest, seg, static_cast<const int32_t*>(gt.data), out);
    case LabelType::U32: return count_typed(nest, seg, static_cast<const uint32_t*>(gt.data), out);
    case LabelType::I64: return count_typed(nest, seg, static_cast<const int64_t*>(gt.data), out);
    case LabelType::U64: return count_typed(nest, seg, static_cast<const uint64_t*>(gt.data), out);
  }
}

}  // namespace

void count_pairs(const LabelView& seg, const LabelView& gt, PairCountMap& out) {
  out.clear();
  for (int64_t s : seg.shape)
    if (s == 0) return;
  const Nest nest = make_nest(seg, gt);
  switch (seg.type) {
    case LabelType::I8: return dispatch_gt(nest, static_cast<const int8_t*>(seg.data), gt, out);
    case LabelType::U8: return dispatch_gt(nest, static_cast<const uint8_t*>(seg.data), gt, out);
    case LabelType::I16: return dispatch_gt(nest, static_cast<const int16_t*>(seg.data), gt, out);
    case LabelType::U16: return dispatch_gt(nest, static_cast<const uint16_t*>(seg.data), gt, out);
    case LabelType::I32: return dispatch_gt(nest, static_cast<const int32_t*>(seg.data), gt, out);
    case LabelType::U32: return dispatch_gt(nest, static_cast<const uint32_t*>(seg.data), gt, out);
    case LabelType::I64: return dispatch_gt(nest, static_cast<const int64_t*>(seg.data), gt, out);
    case LabelType::U64: return dispatch_gt(nest, static_cast<const uint64_t*>(seg.data), gt, out);
  }
}

}  // namespace cpu
}  // namespace neuroadda
