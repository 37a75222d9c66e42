// CUDA uncertainty reductions: one block per (tile, channel, chunk) work item, one voxel per
// thread per step, float32 per element through the shared NEUROADDA_HD helpers, float64 block
// sums written to a partials buffer and summed per tile in a fixed order (deterministic, no
// atomics on doubles).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "common/check.h"
#include "ops/uncertainty.h"

namespace neuroadda {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 32768;

__device__ __forceinline__ float voxel_value(const float* x, int64_t stride_t, int64_t T, int measure, bool keep,
                                             unsigned& bad) {
  if (T == 1) {
    const float p = x[0];
    bad |= (keep && !prob_valid(p)) ? 1u : 0u;
    return measure == 0 ? binary_entropy_f(p) : margin_f(p);
  }
  float sum = 0.0f, hsum = 0.0f;
  for (int64_t t = 0; t < T; ++t) {
    const float p = x[t * stride_t];
    sum += p;
    if (measure == 2) hsum += binary_entropy_f(p);
    bad |= (keep && !prob_valid(p)) ? 1u : 0u;
  }
  const float tf = static_cast<float>(T);
  const float mean = sum / tf;
  switch (measure) {
    case 0: return binary_entropy_f(mean);
    case 1: return margin_f(mean);
    case 2: return binary_entropy_f(mean) - hsum / tf;
    default: {
      float ss = 0.0f;
      for (int64_t t = 0; t < T; ++t) {
        const float d = x[t * stride_t] - mean;
        ss += d * d;
      }
      return ss / tf;
    }
  }
}

__global__ void items_kernel(UncertaintyInput in, int measure, int64_t n_chunks, double* part_sum,
                             long long* part_cnt, unsigned* tile_bad) {
  const int64_t item = blockIdx.x;
  const int64_t per_tile = in.C * n_chunks;
  const int64_t n = item / per_tile;
  const int64_t c = (item % per_tile) / n_chunks;
  const int64_t v0 = (item % n_chunks) * kChunk;
  const int64_t v1 = min(in.V, v0 + kChunk);
  const float* x = in.probs + n * in.stride_n + c * in.stride_c;
  const uint8_t* m = in.mask ? in.mask + n * in.mask_stride_n + c * in.mask_stride_c : nullptr;
  double acc = 0.0;
  long long cnt = 0;
  unsigned bad = 0;
  for (int64_t v = v0 + threadIdx.x; v < v1; v += blockDim.x) {
    const bool keep = m ? m[v] != 0 : true;
    const float val = voxel_value(x + v, in.stride_t, in.T, measure, keep, bad);
    if (keep) {
      acc += static_cast<double>(val);
      ++cnt;
    }
  }
  __shared__ double s_acc[kThreads];
  __shared__ long long s_cnt[kThreads];
  __shared__ unsigned s_bad;
  if (threadIdx.x == 0) s_bad = 0;
  s_acc[threadIdx.x] = acc;
  s_cnt[threadIdx.x] = cnt;
  __syncthreads();
  if (bad) atomicOr(&s_bad, 1u);
  for (int s = kThreads / 2; s > 0; s >>= 1) {  // fixed tree: deterministic
    if (threadIdx.x < s) {
      s_acc[threadIdx.x] += s_acc[threadIdx.x + s];
      s_cnt[threadIdx.x] += s_cnt[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    part_sum[item] = s_acc[0];
    part_cnt[item] = s_cnt[0];
    if (s_bad) atomicOr(&tile_bad[n], 1u);
  }
}

__global__ void finalize_kernel(const double* part_sum, const long long* part_cnt, int64_t per_tile, int64_t N,
                                double* out) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  double sum = 0.0;
  long long cnt = 0;
  for (int64_t k = 0; k < per_tile; ++k) {
    sum += part_sum[n * per_tile + k];
    cnt += part_cnt[n * per_tile + k];
  }
  out[n] = cnt > 0 ? sum / static_cast<double>(cnt) : nan("");
}

// Offsets (in elements) of the lowest and one-past-highest element a strided view touches.
void span(const int64_t* shape, const int64_t* strides, int nd, int64_t inner, int64_t& lo, int64_t& hi) {
  lo = 0;
  hi = inner;
  for (int d = 0; d < nd; ++d) {
    if (shape[d] <= 1) continue;
    const int64_t e = (shape[d] - 1) * strides[d];
    if (e < 0) lo += e; else hi += e;
  }
}

struct DeviceBuffer {
  void* p = nullptr;
  explicit DeviceBuffer(size_t bytes) { NEUROADDA_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 1))); }
  ~DeviceBuffer() { cudaFree(p); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

}  // namespace

size_t workspace_items(const UncertaintyInput& in) { return static_cast<size_t>(in.N * in.C * ((in.V + kChunk - 1) / kChunk)); }

// `in` holds device pointers; part_sum / part_cnt have workspace_items(in) entries, tile_bad N
// zeroed entries, out N entries. Enqueues on `stream` and returns without synchronising.
void launch_tile_uncertainty(const UncertaintyInput& in, UncertaintyMeasure measure, double* part_sum,
                             long long* part_cnt, unsigned* tile_bad, double* out, cudaStream_t stream) {
  const int64_t n_chunks = (in.V + kChunk - 1) / kChunk;
  const int64_t items = in.N * in.C * n_chunks;
  NEUROADDA_CHECK(items < (int64_t(1) << 31), "expected fewer than 2^31 work items, got " << items);
  items_kernel<<<static_cast<unsigned>(items), kThreads, 0, stream>>>(in, static_cast<int>(measure), n_chunks,
                                                                       part_sum, part_cnt, tile_bad);
  NEUROADDA_CUDA_CHECK(cudaGetLastError());
  const int fin_threads = 128;
  const auto fin_blocks = static_cast<unsigned>((in.N + fin_threads - 1) / fin_threads);
  finalize_kernel<<<fin_blocks, fin_threads, 0, stream>>>(part_sum, part_cnt, in.C * n_chunks, in.N, out);
  NEUROADDA_CUDA_CHECK(cudaGetLastError());
}

namespace {

struct DeviceGuard {  // restores the caller's current device
  int prev = -1;
  explicit DeviceGuard(int dev) {
    NEUROADDA_CUDA_CHECK(cudaGetDevice(&prev));
    if (dev != prev) NEUROADDA_CUDA_CHECK(cudaSetDevice(dev));
  }
  ~DeviceGuard() {
    if (prev >= 0) cudaSetDevice(prev);
  }
};

// `dev` holds device pointers. Allocates the workspace, launches on `stream`, copies the N
// results back to host memory and synchronises that stream (this wrapper, not launch_*, does).
UncertaintyResult run_on_device(const UncertaintyInput& dev, UncertaintyMeasure measure, double* out,
                                cudaStream_t stream) {
  const size_t items = workspace_items(dev);
  DeviceBuffer d_sum(items * sizeof(double)), d_cnt(items * sizeof(long long));
  DeviceBuffer d_bad(static_cast<size_t>(dev.N) * sizeof(unsigned)), d_out(static_cast<size_t>(dev.N) * sizeof(double));
  NEUROADDA_CUDA_CHECK(cudaMemsetAsync(d_bad.p, 0, static_cast<size_t>(dev.N) * sizeof(unsigned), stream));
  launch_tile_uncertainty(dev, measure, static_cast<double*>(d_sum.p), static_cast<long long*>(d_cnt.p),
                          static_cast<unsigned*>(d_bad.p), static_cast<double*>(d_out.p), stream);
  std::vector<unsigned> bad(static_cast<size_t>(dev.N));
  NEUROADDA_CUDA_CHECK(cudaMemcpyAsync(out, d_out.p, static_cast<size_t>(dev.N) * sizeof(double),
                                       cudaMemcpyDeviceToHost, stream));
  NEUROADDA_CUDA_CHECK(cudaMemcpyAsync(bad.data(), d_bad.p, bad.size() * sizeof(unsigned), cudaMemcpyDeviceToHost,
                                       stream));
  NEUROADDA_CUDA_CHECK(cudaStreamSynchronize(stream));
  UncertaintyResult res;
  for (int64_t n = 0; n < dev.N; ++n)
    if (bad[static_cast<size_t>(n)]) {
      res.first_bad_tile = n;
      break;
    }
  return res;
}

void mask_span(const UncertaintyInput& in, int64_t& lo, int64_t& hi) {
  const int64_t m_shape[2] = {in.N, in.C}, m_str[2] = {in.mask_stride_n, in.mask_stride_c};
  span(m_shape, m_str, 2, in.V, lo, hi);
}

}  // namespace

UncertaintyResult tile_uncertainty_host(const UncertaintyInput& in, UncertaintyMeasure measure, double* out) {
  // Host arrays: copy the touched span of probs (and of the mask) once, then one pass on the GPU.
  const int64_t p_shape[3] = {in.T, in.N, in.C}, p_str[3] = {in.stride_t, in.stride_n, in.stride_c};
  int64_t p_lo, p_hi, m_lo = 0, m_hi = 0;
  span(p_shape, p_str, 3, in.V, p_lo, p_hi);
  if (in.mask) mask_span(in, m_lo, m_hi);
  cudaStream_t stream;
  NEUROADDA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  struct StreamGuard {
    cudaStream_t s;
    ~StreamGuard() { cudaStreamDestroy(s); }
  } guard{stream};
  DeviceBuffer d_probs(static_cast<size_t>(p_hi - p_lo) * sizeof(float));
  DeviceBuffer d_mask(static_cast<size_t>(m_hi - m_lo));
  NEUROADDA_CUDA_CHECK(cudaMemcpyAsync(d_probs.p, in.probs + p_lo, static_cast<size_t>(p_hi - p_lo) * sizeof(float),
                                       cudaMemcpyHostToDevice, stream));
  UncertaintyInput dev = in;
  dev.probs = static_cast<const float*>(d_probs.p) - p_lo;
  if (in.mask) {
    NEUROADDA_CUDA_CHECK(cudaMemcpyAsync(d_mask.p, in.mask + m_lo, static_cast<size_t>(m_hi - m_lo),
                                         cudaMemcpyHostToDevice, stream));
    dev.mask = static_cast<const uint8_t*>(d_mask.p) - m_lo;
  }
  return run_on_device(dev, measure, out, stream);
}

UncertaintyResult tile_uncertainty_device(const UncertaintyInput& in, UncertaintyMeasure measure, double* out,
                                          CUstream_st* stream) {
  cudaPointerAttributes attr;
  NEUROADDA_CUDA_CHECK(cudaPointerGetAttributes(&attr, in.probs));
  NEUROADDA_CHECK(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged,
                  "expected probabilities in GPU memory, got a pointer the CUDA runtime does not know as device "
                  "memory");
  DeviceGuard on(attr.device);
  UncertaintyInput dev = in;
  std::unique_ptr<DeviceBuffer> d_mask;
  if (in.mask) {  // a host mask (at most one byte per voxel of one sample) is copied once
    int64_t m_lo, m_hi;
    mask_span(in, m_lo, m_hi);
    d_mask = std::make_unique<DeviceBuffer>(static_cast<size_t>(m_hi - m_lo));
    NEUROADDA_CUDA_CHECK(cudaMemcpyAsync(d_mask->p, in.mask + m_lo, static_cast<size_t>(m_hi - m_lo),
                                         cudaMemcpyHostToDevice, stream));
    dev.mask = static_cast<const uint8_t*>(d_mask->p) - m_lo;
  }
  return run_on_device(dev, measure, out, stream);
}

}  // namespace cuda
}  // namespace neuroadda
