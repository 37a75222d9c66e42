// CUDA kernels for MMD²: 64x64 shared-memory tiles of the pooled pair matrix (upper triangle
// only), the same float32 distance / exp arithmetic as the CPU (ops/mmd.h), float64 sums.
// launch_* functions only enqueue work on the given stream; the host wrappers at the end copy,
// launch, and synchronise once.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/check.h"
#include "ops/mmd.h"

namespace neuroadda {
namespace cuda {
namespace {

constexpr int kTile = 64;  // rows / cols of a block tile
constexpr int kBK = 16;    // k-slice staged in shared memory
constexpr int kThreads = 256;

struct GaussParams {
  float coef[kMaxSigmas];  // -1 / (2 sigma²)
  int n_sigma;
  float inv_n;
};

GaussParams make_params(const float* neg_inv_2s2, int n_sigma) {
  NEUROADDA_CHECK(n_sigma >= 1 && n_sigma <= kMaxSigmas, "expected 1 to " << kMaxSigmas << " bandwidths, got " << n_sigma);
  GaussParams p{};
  for (int s = 0; s < n_sigma; ++s) p.coef[s] = neg_inv_2s2[s];
  p.n_sigma = n_sigma;
  p.inv_n = 1.0f / static_cast<float>(n_sigma);
  return p;
}

__global__ void row_norms_kernel(const float* __restrict__ z, int64_t N, int64_t d, float* __restrict__ norms) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (row >= N) return;
  double acc = 0.0;
  for (int64_t k = lane; k < d; k += 32) {
    const double v = z[row * d + k];
    acc += v * v;
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) norms[row] = static_cast<float>(acc);
}

// Dot products of a 64x64 tile (rows bi*64.., cols bj*64..) into acc[4][4] per thread.
__device__ __forceinline__ void tile_dots(const float* __restrict__ z, int64_t N, int64_t d, int64_t i0, int64_t j0,
                                          float (&As)[kBK][kTile], float (&Bs)[kBK][kTile], float (&acc)[4][4]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = 0.0f;
  for (int64_t k0 = 0; k0 < d; k0 += kBK) {
    // 64 rows x 16 k per operand: 1024 values, 4 per thread; k fastest for coalescing.
    for (int e = threadIdx.x; e < kTile * kBK; e += kThreads) {
      const int row = e / kBK, kk = e % kBK;
      const int64_t k = k0 + kk;
      const int64_t ia = i0 + row, jb = j0 + row;
      As[kk][row] = (ia < N && k < d) ? z[ia * d + k] : 0.0f;
      Bs[kk][row] = (jb < N && k < d) ? z[jb * d + k] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) a[r] = As[kk][ty * 4 + r];
#pragma unroll
      for (int c = 0; c < 4; ++c) b[c] = Bs[kk][tx * 4 + c];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
    }
    __syncthreads();
  }
}

__device__ __forceinline__ double block_sum(double v, double* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  double t = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) t += shared[w];
  return t;  // valid in thread 0
}

// mode 0: off-diagonal pair sums into sums[3] (upper triangle, i < j); mode 1: full K matrix.
template <int MODE>
__global__ void __launch_bounds__(kThreads) pair_tiles_kernel(const float* __restrict__ z, const float* __restrict__ norms,
                                                              int64_t N, int64_t n, int64_t d, GaussParams p,
                                                              double* __restrict__ sums, float* __restrict__ K) {
  const int64_t bi = blockIdx.y, bj = blockIdx.x;
  if (bi > bj) return;  // symmetric: upper triangle of tiles only
  __shared__ float As[kBK][kTile];
  __shared__ float Bs[kBK][kTile];
  __shared__ double red[kThreads / 32];
  const int64_t i0 = bi * kTile, j0 = bj * kTile;
  float acc[4][4];
  tile_dots(z, N, d, i0, j0, As, Bs, acc);
  float coef[kMaxSigmas];
  for (int s = 0; s < p.n_sigma; ++s) coef[s] = p.coef[s];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  double sxx = 0.0, syy = 0.0, sxy = 0.0;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t i = i0 + ty * 4 + r;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t j = j0 + tx * 4 + c;
      if (i >= N || j >= N || j < i) continue;
      if (MODE == 1 && i == j) {
        K[i * N + i] = 1.0f;  // k(a, a) = 1 exactly
        continue;
      }
      if (i == j) continue;
      const float d2 = sq_dist_from_dot(norms[i], norms[j], acc[r][c]);
      const float k = gaussian_mean_kernel(d2, coef, p.n_sigma, p.inv_n);
      if (MODE == 1) {
        K[i * N + j] = k;
        K[j * N + i] = k;
      } else if (j < n) {
        sxx += k;
      } else if (i >= n) {
        syy += k;
      } else {
        sxy += k;
      }
    }
  }
  if (MODE == 0) {
    const double a = block_sum(sxx, red);
    const double b = block_sum(syy, red);
    const double c = block_sum(sxy, red);
    if (threadIdx.x == 0) {
      atomicAdd(sums + 0, a);
      atomicAdd(sums + 1, b);
      atomicAdd(sums + 2, c);
    }
  }
}

__global__ void scatter_indicator_kernel(const int64_t* __restrict__ x_index, int64_t P, int64_t n, int64_t N,
                                         float* __restrict__ ind) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= P * n) return;
  const int64_t p = e / n;
  ind[p * N + x_index[e]] = 1.0f;
}

// s_xx[p] += sum over rows i in x_p of sum_j K_ij a_pj (full rows: the diagonal 1 is included).
__global__ void quad_forms_kernel(const float* __restrict__ K, int64_t N, const float* __restrict__ ind,
                                  double* __restrict__ s_xx) {
  const int64_t p = blockIdx.y;
  const float* a = ind + p * N;
  const int warps = kThreads / 32, warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  double acc = 0.0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * warps + warp; i < N; i += static_cast<int64_t>(gridDim.x) * warps) {
    if (a[i] == 0.0f) continue;
    const float* row = K + i * N;
    for (int64_t j = lane; j < N; j += 32) acc += static_cast<double>(row[j] * a[j]);
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  __shared__ double red[kThreads / 32];
  if (lane == 0) red[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < warps; ++w) t += red[w];
    atomicAdd(s_xx + p, t);
  }
}

__global__ void row_sums_kernel(const float* __restrict__ K, int64_t N, double* __restrict__ r) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (row >= N) return;
  double acc = 0.0;
  for (int64_t j = lane; j < N; j += 32) acc += K[row * N + j];
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) r[row] = acc;
}

dim3 tile_grid(int64_t N) {
  const int64_t T = (N + kTile - 1) / kTile;
  NEUROADDA_CHECK(T <= 65535, "expected at most " << 65535 * kTile << " pooled rows on CUDA, got " << N);
  return dim3(static_cast<unsigned>(T), static_cast<unsigned>(T));
}

unsigned warp_blocks(int64_t rows) { return static_cast<unsigned>((rows * 32 + kThreads - 1) / kThreads); }

}  // namespace

void launch_row_norms(const float* z, int64_t N, int64_t d, float* norms, cudaStream_t stream) {
  if (N == 0) return;
  row_norms_kernel<<<warp_blocks(N), kThreads, 0, stream>>>(z, N, d, norms);
  NEUROADDA_CUDA_CHECK(cudaGetLastError());
}

void launch_mmd_sums(const float* z, const float* norms, int64_t N, int64_t n, int64_t d, const float* neg_inv_2s2,
                     int n_sigma, double* sums, cudaStream_t stream) {
  if (N == 0) return;
  pair_tiles_kernel<0><<<tile_grid(N), kThreads, 0, stream>>>(z, norms, N, n, d, make_params(neg_inv_2s2, n_sigma),
                                                              sums, nullptr);
  NEUROADDA_CUDA_CHECK(cudaGetLastError());
}

void launch_kernel_matrix(const float* z, const float* norms, int64_t N, int64_t d, const float* neg_inv_2s2,
                          int n_sigma, float* K, cudaStream_t stream) {
  if (N == 0) return;
  pair_tiles_kernel<1><<<tile_grid(N), kThreads, 0, stream>>>(z, norms, N, N, d, make_params(neg_inv_2s2, n_sigma),
                                                              nullptr, K);
  NEUROADDA_CUDA_CHECK(cudaGetLastError());
}

void launch_permutation_quadratic_forms(const float* K, int64_t N, const int64_t* x_index, int64_t P, int64_t n,
                                        float* indicator, double* s_xx, cudaStream_t stream) {
  if (P == 0 || N == 0) return;
  NEUROADDA_CHECK(P <= 65535, "expected at most 65535 permutations per CUDA launch, got " << P);
  NEUROADDA_CUDA_CHECK(cudaMemsetAsync(indicator, 0, sizeof(float) * P * N, stream));
  const int64_t total = P * n;
  scatter_indicator_kernel<<<static_cast<unsigned>((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      x_index, P, n, N, indicator);
  NEUROADDA_CUDA_CHECK(cudaGetLastError());
  const unsigned row_blocks = static_cast<unsigned>(std::min<int64_t>(64, (N + 7) / 8));
  quad_forms_kernel<<<dim3(row_blocks, static_cast<unsigned>(P)), kThreads, 0, stream>>>(K, N, indicator, s_xx);
  NEUROADDA_CUDA_CHECK(cudaGetLastError());
}

void launch_row_sums(const float* K, int64_t N, double* r, cudaStream_t stream) {
  if (N == 0) return;
  row_sums_kernel<<<warp_blocks(N), kThreads, 0, stream>>>(K, N, r);
  NEUROADDA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace cuda

// ---- host wrappers ----------------------------------------------------------------------------
namespace {

struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) {
    if (bytes) NEUROADDA_CUDA_CHECK(cudaMalloc(&ptr, bytes));
  }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

struct Stream {
  cudaStream_t s = nullptr;
  Stream() { NEUROADDA_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~Stream() {
    if (s) cudaStreamDestroy(s);
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
};

// [x; y] gathered into a dense row-major host buffer (any input strides), finiteness checked.
std::vector<float> pooled_dense(const MatView& x, const MatView& y) {
  const int64_t d = x.cols;
  std::vector<float> z(static_cast<size_t>((x.rows + y.rows) * d));
  int64_t row0 = 0;
  for (const MatView* v : {&x, &y}) {
    int64_t bad = 0;
    for (int64_t i = 0; i < v->rows; ++i)
      for (int64_t k = 0; k < d; ++k) {
        const float val = v->at(i, k);
        bad += !std::isfinite(val);
        z[(row0 + i) * d + k] = val;
      }
    NEUROADDA_CHECK(bad == 0, "expected finite features, got " << bad << " NaN or inf values in "
                                                                << (v == &x ? "x" : "y"));
    row0 += v->rows;
  }
  return z;
}

}  // namespace

MMDSums mmd_sums_cuda(const MatView& x, const MatView& y, const float* neg_inv_2s2, int n_sigma) {
  const int64_t N = x.rows + y.rows, d = x.cols;
  const std::vector<float> z = pooled_dense(x, y);
  Stream stream;
  DeviceBuffer dz(sizeof(float) * z.size()), dnorm(sizeof(float) * N), dsums(sizeof(double) * 3);
  NEUROADDA_CUDA_CHECK(cudaMemcpyAsync(dz.ptr, z.data(), sizeof(float) * z.size(), cudaMemcpyHostToDevice, stream.s));
  NEUROADDA_CUDA_CHECK(cudaMemsetAsync(dsums.ptr, 0, sizeof(double) * 3, stream.s));
  cuda::launch_row_norms(dz.as<float>(), N, d, dnorm.as<float>(), stream.s);
  cuda::launch_mmd_sums(dz.as<float>(), dnorm.as<float>(), N, x.rows, d, neg_inv_2s2, n_sigma, dsums.as<double>(),
                        stream.s);
  double h[3];
  NEUROADDA_CUDA_CHECK(cudaMemcpyAsync(h, dsums.ptr, sizeof(h), cudaMemcpyDeviceToHost, stream.s));
  NEUROADDA_CUDA_CHECK(cudaStreamSynchronize(stream.s));
  MMDSums s;
  s.kxx = 2.0 * h[0];  // ordered pairs
  s.kyy = 2.0 * h[1];
  s.kxy = h[2];
  return s;
}

double mmd2_permutation_cuda(const MatView& x, const MatView& y, const float* neg_inv_2s2, int n_sigma,
                             const int64_t* x_index, int64_t P, bool unbiased, double* null_out) {
  const int64_t n = x.rows, m = y.rows, N = n + m, d = x.cols;
  const std::vector<float> z = pooled_dense(x, y);
  // The observed arrangement rides along as permutation P (rows 0..n-1).
  std::vector<int64_t> idx(static_cast<size_t>((P + 1) * n));
  if (P > 0) std::memcpy(idx.data(), x_index, sizeof(int64_t) * P * n);
  for (int64_t t = 0; t < n; ++t) idx[P * n + t] = t;
  Stream stream;
  DeviceBuffer dz(sizeof(float) * z.size()), dnorm(sizeof(float) * N), dK(sizeof(float) * N * N),
      dr(sizeof(double) * N), didx(sizeof(int64_t) * idx.size()), dsxx(sizeof(double) * (P + 1));
  NEUROADDA_CUDA_CHECK(cudaMemcpyAsync(dz.ptr, z.data(), sizeof(float) * z.size(), cudaMemcpyHostToDevice, stream.s));
  NEUROADDA_CUDA_CHECK(
      cudaMemcpyAsync(didx.ptr, idx.data(), sizeof(int64_t) * idx.size(), cudaMemcpyHostToDevice, stream.s));
  NEUROADDA_CUDA_CHECK(cudaMemsetAsync(dsxx.ptr, 0, sizeof(double) * (P + 1), stream.s));
  cuda::launch_row_norms(dz.as<float>(), N, d, dnorm.as<float>(), stream.s);
  cuda::launch_kernel_matrix(dz.as<float>(), dnorm.as<float>(), N, d, neg_inv_2s2, n_sigma, dK.as<float>(), stream.s);
  cuda::launch_row_sums(dK.as<float>(), N, dr.as<double>(), stream.s);
  // Indicator scratch in chunks of permutations so that it stays below ~256 MiB.
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>({P + 1, 65535, (int64_t{1} << 26) / N}));
  DeviceBuffer dind(sizeof(float) * chunk * N);
  for (int64_t p0 = 0; p0 < P + 1; p0 += chunk) {
    const int64_t cnt = std::min(chunk, P + 1 - p0);
    cuda::launch_permutation_quadratic_forms(dK.as<float>(), N, didx.as<int64_t>() + p0 * n, cnt, n, dind.as<float>(),
                                             dsxx.as<double>() + p0, stream.s);
  }
  std::vector<double> s_xx(static_cast<size_t>(P + 1)), r(static_cast<size_t>(N));
  NEUROADDA_CUDA_CHECK(
      cudaMemcpyAsync(s_xx.data(), dsxx.ptr, sizeof(double) * (P + 1), cudaMemcpyDeviceToHost, stream.s));
  NEUROADDA_CUDA_CHECK(cudaMemcpyAsync(r.data(), dr.ptr, sizeof(double) * N, cudaMemcpyDeviceToHost, stream.s));
  NEUROADDA_CUDA_CHECK(cudaStreamSynchronize(stream.s));
  double total = 0.0;
  for (int64_t i = 0; i < N; ++i) total += r[i];
  const double dn = static_cast<double>(n), dm = static_cast<double>(m);
  for (int64_t p = 0; p <= P; ++p) {
    double a_r = 0.0;
    for (int64_t t = 0; t < n; ++t) a_r += r[idx[p * n + t]];
    const double v = mmd2_from_quadratic_form(s_xx[p], a_r, total, dn, dm, unbiased);
    if (p < P) null_out[p] = v;
    else return v;
  }
  return 0.0;  // unreachable: p == P returns
}

}  // namespace neuroadda
