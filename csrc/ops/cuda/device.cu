// Device discovery. With static cudart and no driver, cudaGetDeviceCount returns an error
// (not a crash), which we report as zero devices.
#include <cuda_runtime.h>

#include <string>

namespace neuroadda {

int cuda_device_count_impl() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return 0;
  }
  return count;
}

std::string cuda_device_name_impl(int device) {
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    cudaGetLastError();
    return "";
  }
  return std::string(prop.name);
}

}  // namespace neuroadda
