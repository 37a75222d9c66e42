// The private extension module neuroadda_rt._core. Users import from neuroadda_rt.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common/build_info.h"
#include "neuroadda_build_config.h"

namespace py = pybind11;

void register_mmd(py::module_& m);
void register_uncertainty(py::module_& m);
void register_metrics(py::module_& m);
void register_descriptors(py::module_& m);

PYBIND11_MODULE(_core, m) {
  m.doc() = "neuroadda_rt compiled kernels (private; use the neuroadda_rt package)";
  m.def("compiled_simd_levels", &neuroadda::compiled_simd_levels);
  m.def("active_simd_level", &neuroadda::active_simd_level);
  m.def("built_with_openmp", &neuroadda::built_with_openmp);
  m.def("openmp_max_threads", &neuroadda::openmp_max_threads);
  m.def("built_with_cuda", &neuroadda::built_with_cuda);
  m.def("cuda_version", &neuroadda::cuda_version);
  m.def("cuda_architectures", &neuroadda::cuda_architectures);
  m.def("cuda_device_count", &neuroadda::cuda_device_count);
  m.def("cuda_device_name", &neuroadda::cuda_device_name);
  m.attr("__version__") = NEUROADDA_VERSION;
  m.attr("compiler") = NEUROADDA_CXX_COMPILER;
  register_mmd(m);
  register_uncertainty(m);
  register_metrics(m);
  register_descriptors(m);
}
