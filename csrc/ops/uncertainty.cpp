// Checks and device dispatch for tile_uncertainty (decided once, outside the hot loops).
#include "ops/uncertainty.h"

namespace neuroadda {

namespace {
void check_input(const UncertaintyInput& in, UncertaintyMeasure measure) {
  NEUROADDA_CHECK(in.probs != nullptr, "expected a probability buffer, got null");
  NEUROADDA_CHECK(in.T >= 1 && in.N >= 1 && in.C >= 1 && in.V >= 1,
                  "expected non-empty (T, N, C, V), got (" << in.T << ", " << in.N << ", " << in.C << ", " << in.V
                                                          << ")");
  const int m = static_cast<int>(measure);
  NEUROADDA_CHECK(m >= 0 && m <= 3, "expected measure code 0..3, got " << m);
  NEUROADDA_CHECK(in.T >= 2 || m <= 1, "expected T >= 2 Monte-Carlo samples for bald/variance, got T = " << in.T);
}
}  // namespace

UncertaintyResult tile_uncertainty_gpu_resident(const UncertaintyInput& in, UncertaintyMeasure measure, double* out,
                                                uintptr_t stream) {
  check_input(in, measure);
#ifdef NEUROADDA_WITH_CUDA
  return cuda::tile_uncertainty_device(in, measure, out, reinterpret_cast<CUstream_st*>(stream));
#else
  (void)out;
  (void)stream;
  NEUROADDA_CHECK(false, "expected a CUDA build for GPU-resident probabilities, got a CPU-only build");
#endif
}

UncertaintyResult tile_uncertainty(const UncertaintyInput& in, UncertaintyMeasure measure, double* out,
                                   bool use_cuda) {
  check_input(in, measure);
  if (use_cuda) {
#ifdef NEUROADDA_WITH_CUDA
    return cuda::tile_uncertainty_host(in, measure, out);
#else
    NEUROADDA_CHECK(false, "expected a CUDA build for device='cuda', got a CPU-only build");
#endif
  }
  return cpu::tile_uncertainty_kernel(in, measure, out);
}

}  // namespace neuroadda
