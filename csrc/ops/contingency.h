// Sparse contingency table of two label volumes, and the scores built on it: variation of
// information (Meila 2007) and the adapted Rand error (SNEMI3D, Arganda-Carreras et al. 2015).
//
// Algorithm: one pass over the voxels in memory order (any strides, any integer dtype, read in
// place); runs of equal (seg, gt) pairs are counted first and flushed into an open-addressing
// hash map keyed by the pair of 64-bit labels (linear probing, load <= 1/2). Each OpenMP thread
// fills its own map over a contiguous range of the iteration; the maps are merged under the
// table's mutex. Labels are keyed by their value as a 64-bit two's-complement word (signed
// dtypes are sign-extended), so ids up to 2^64 - 1 need no relabelling.
// Scores: with n_ij the joint counts, a_i the gt sizes, b_j the seg sizes and N = sum n_ij,
//   H(seg|gt) = (sum a ln a - sum n ln n) / N   ("split"),  H(gt|seg) = (sum b ln b - sum n ln n) / N
//   ("merge"); the adapted Rand terms are sum n^2 - N, sum a^2 - N, sum b^2 - N (exact integers).
// Invariants: counts are exact uint64; every sum is order independent (integers, or x ln x
// scaled by 2^64 and summed exactly in 128-bit fixed point), so a table filled block by block, merged
// from workers in any order, or filled by any number of threads gives bit-identical scores.
// Memory: O(K) for K distinct (seg, gt) pairs: 24-byte slots at a load factor between 1/4 and 1/2,
// i.e. 48-96 bytes per pair, for each thread's map and the merged map (and the marginals while
// scoring); nothing proportional to the number of voxels.
#pragma once
#include <cstdint>
#include <mutex>
#include <vector>

namespace neuroadda {

enum class LabelType : int { I8 = 0, U8, I16, U16, I32, U32, I64, U64 };

// A strided N-d label array; strides are in elements and may be negative or zero.
struct LabelView {
  const void* data = nullptr;
  LabelType type = LabelType::U64;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
};

class PairCountMap {
 public:
  struct Slot {
    uint64_t a, b, n;  // n == 0 marks an empty slot
  };
  PairCountMap() { reset(16); }
  void add(uint64_t a, uint64_t b, uint64_t n) {
    if ((size_ + 1) * 2 > slots_.size()) grow();
    size_t i = hash(a, b) & mask_;
    for (;;) {
      Slot& s = slots_[i];
      if (s.n == 0) {
        s = {a, b, n};
        ++size_;
        return;
      }
      if (s.a == a && s.b == b) {
        s.n += n;
        return;
      }
      i = (i + 1) & mask_;
    }
  }
  void merge(const PairCountMap& o) {
    for (const Slot& s : o.slots_)
      if (s.n) add(s.a, s.b, s.n);
  }
  size_t size() const { return size_; }
  size_t bytes() const { return slots_.size() * sizeof(Slot); }
  const std::vector<Slot>& slots() const { return slots_; }
  void clear() { reset(16); }

  static uint64_t mix(uint64_t h) {  // murmur3 fmix64
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
  }
  static uint64_t hash(uint64_t a, uint64_t b) { return mix(a ^ mix(b + 0x9e3779b97f4a7c15ULL)); }

 private:
  void reset(size_t cap) {
    slots_.assign(cap, Slot{0, 0, 0});
    mask_ = cap - 1;
    size_ = 0;
  }
  void grow() {
    std::vector<Slot> old;
    old.swap(slots_);
    reset(old.size() * 2);
    for (const Slot& s : old)
      if (s.n) add(s.a, s.b, s.n);
  }
  std::vector<Slot> slots_;
  size_t mask_ = 0, size_ = 0;
};

struct ViResult {
  double split_nats, merge_nats;  // H(seg|gt), H(gt|seg) in nats
  uint64_t n;                     // voxels counted after the ignore labels
};

struct RandResult {
  double error, precision, recall;  // skimage.metrics conventions (see metrics.py)
  uint64_t n;
};

class ContingencyTable {
 public:
  ContingencyTable() = default;
  // Counts the voxels of two same-shape arrays. Thread safe; the scan runs without the lock.
  void add(const LabelView& seg, const LabelView& gt);
  // Adds another table's counts (other may be *this: counts double).
  void merge(const ContingencyTable& other);
  // Adds raw (seg, gt, count) entries, e.g. a table serialised on another worker.
  void add_entries(const uint64_t* seg, const uint64_t* gt, const uint64_t* n, size_t k);
  // Writes the non-zero entries (unordered) into three arrays of length n_pairs().
  void entries(uint64_t* seg, uint64_t* gt, uint64_t* n) const;
  size_t n_pairs() const;
  uint64_t total() const;
  size_t memory_bytes() const;

  ViResult variation_of_information(const std::vector<uint64_t>& ignore_seg,
                                    const std::vector<uint64_t>& ignore_gt) const;
  RandResult adapted_rand_error(const std::vector<uint64_t>& ignore_gt, double alpha) const;

 private:
  mutable std::mutex mu_;
  PairCountMap map_;
};

namespace cpu {
// Counts (seg, gt) pairs of two same-shape views into `out` (multithreaded; out is overwritten).
void count_pairs(const LabelView& seg, const LabelView& gt, PairCountMap& out);
}

}  // namespace neuroadda
