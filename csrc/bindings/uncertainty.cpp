// Bindings for the uncertainty reductions. Shapes and strides are read from the arrays here
// (never trusted from the caller) so no argument combination can read out of bounds.
#include "bindings/nogil.h"
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

#include "ops/uncertainty.h"

namespace py = pybind11;

namespace {

// True when dims [first, ndim) form a C-contiguous block of `itemsize`-byte elements.
bool spatial_contiguous(const py::array& a, int first, py::ssize_t itemsize) {
  py::ssize_t expect = itemsize;
  for (int d = static_cast<int>(a.ndim()) - 1; d >= first; --d) {
    if (a.shape(d) != 1 && a.strides(d) != expect) return false;
    expect *= a.shape(d);
  }
  return true;
}

std::pair<py::array_t<double>, int64_t> tile_uncertainty_py(const py::array& probs, bool mc, const py::object& mask_obj,
                                                            int measure, bool use_cuda) {
  NEUROADDA_CHECK(probs.dtype().is(py::dtype::of<float>()), "expected float32 probabilities, got dtype "
                                                                 << std::string(py::str(probs.dtype())));
  const int lead = mc ? 3 : 2;  // (T,) N, C before the spatial dims
  NEUROADDA_CHECK(probs.ndim() == lead + 2 || probs.ndim() == lead + 3,
                  "expected " << lead + 2 << " or " << lead + 3 << " dims, got " << probs.ndim());
  NEUROADDA_CHECK(spatial_contiguous(probs, lead, sizeof(float)),
                  "expected C-contiguous spatial dims, got strides that are not");
  neuroadda::UncertaintyInput in;
  in.probs = static_cast<const float*>(probs.data());
  in.T = mc ? probs.shape(0) : 1;
  in.stride_t = mc ? probs.strides(0) / static_cast<py::ssize_t>(sizeof(float)) : 0;
  in.N = probs.shape(lead - 2);
  in.C = probs.shape(lead - 1);
  in.stride_n = probs.strides(lead - 2) / static_cast<py::ssize_t>(sizeof(float));
  in.stride_c = probs.strides(lead - 1) / static_cast<py::ssize_t>(sizeof(float));
  in.V = 1;
  for (int d = lead; d < probs.ndim(); ++d) in.V *= probs.shape(d);
  NEUROADDA_CHECK(probs.strides(lead - 2) % sizeof(float) == 0 && probs.strides(lead - 1) % sizeof(float) == 0 &&
                      (!mc || probs.strides(0) % sizeof(float) == 0),
                  "expected float32-aligned strides, got a misaligned view");

  py::array mask;
  if (!mask_obj.is_none()) {
    mask = py::array::ensure(mask_obj);  // checked conversion: never reinterpret a non-array
    NEUROADDA_CHECK(mask, "expected a NumPy mask array");
    NEUROADDA_CHECK(mask.itemsize() == 1 && (mask.dtype().kind() == 'b' || mask.dtype().kind() == 'u'),
                    "expected a bool mask, got dtype " << std::string(py::str(mask.dtype())));
    NEUROADDA_CHECK(mask.ndim() == probs.ndim() - (mc ? 1 : 0), "expected the mask broadcast to (N, C, *spatial)");
    for (int d = 0; d < mask.ndim(); ++d)
      NEUROADDA_CHECK(mask.shape(d) == probs.shape(d + (mc ? 1 : 0)),
                      "expected the mask broadcast to (N, C, *spatial), got a mismatch in dim " << d);
    NEUROADDA_CHECK(spatial_contiguous(mask, 2, 1), "expected a mask with C-contiguous spatial dims");
    in.mask = static_cast<const uint8_t*>(mask.data());
    in.mask_stride_n = mask.strides(0);
    in.mask_stride_c = mask.strides(1);
  }
  py::array_t<double> out(in.N);
  double* out_ptr = out.mutable_data();
  // Safe: only raw pointers into arrays kept alive by this frame are used; no Python API calls.
  const neuroadda::UncertaintyResult res = neuroadda_bindings::without_gil([&] {
    return neuroadda::tile_uncertainty(in, static_cast<neuroadda::UncertaintyMeasure>(measure), out_ptr, use_cuda);
  });
  return {out, res.first_bad_tile};
}

// probs described by __cuda_array_interface__ (pointer, shape, strides in bytes); mask a host
// array already broadcast to (N, C, *spatial) or None.
std::pair<py::array_t<double>, int64_t> tile_uncertainty_cuda_array_py(uintptr_t ptr, const std::vector<int64_t>& shape,
                                                                       const std::vector<int64_t>& strides, bool mc,
                                                                       const py::object& mask_obj, int measure,
                                                                       uintptr_t stream) {
  const int lead = mc ? 3 : 2;
  const int nd = static_cast<int>(shape.size());
  NEUROADDA_CHECK(nd == lead + 2 || nd == lead + 3, "expected " << lead + 2 << " or " << lead + 3 << " dims, got " << nd);
  NEUROADDA_CHECK(strides.size() == shape.size(), "expected one stride per dimension");
  int64_t expect = sizeof(float);
  for (int d = nd - 1; d >= lead; --d) {
    NEUROADDA_CHECK(shape[d] >= 1, "expected a non-empty array");
    NEUROADDA_CHECK(shape[d] == 1 || strides[d] == expect,
                    "expected C-contiguous spatial dims on the GPU (call .contiguous()), got strides that are not");
    expect *= shape[d];
  }
  for (int d = 0; d < lead; ++d)
    NEUROADDA_CHECK(strides[d] % static_cast<int64_t>(sizeof(float)) == 0, "expected float32-aligned strides");
  neuroadda::UncertaintyInput in;
  in.probs = reinterpret_cast<const float*>(ptr);
  in.T = mc ? shape[0] : 1;
  in.stride_t = mc ? strides[0] / 4 : 0;
  in.N = shape[lead - 2];
  in.C = shape[lead - 1];
  in.stride_n = strides[lead - 2] / 4;
  in.stride_c = strides[lead - 1] / 4;
  in.V = 1;
  for (int d = lead; d < nd; ++d) in.V *= shape[d];
  py::array mask;
  if (!mask_obj.is_none()) {
    mask = py::array::ensure(mask_obj);  // checked conversion: never reinterpret a non-array
    NEUROADDA_CHECK(mask, "expected a NumPy mask array");
    NEUROADDA_CHECK(mask.itemsize() == 1 && (mask.dtype().kind() == 'b' || mask.dtype().kind() == 'u'),
                    "expected a bool mask");
    NEUROADDA_CHECK(mask.ndim() == nd - (mc ? 1 : 0), "expected the mask broadcast to (N, C, *spatial)");
    for (int d = 0; d < mask.ndim(); ++d)
      NEUROADDA_CHECK(mask.shape(d) == shape[d + (mc ? 1 : 0)], "expected the mask broadcast to (N, C, *spatial)");
    NEUROADDA_CHECK(spatial_contiguous(mask, 2, 1), "expected a mask with C-contiguous spatial dims");
    in.mask = static_cast<const uint8_t*>(mask.data());
    in.mask_stride_n = mask.strides(0);
    in.mask_stride_c = mask.strides(1);
  }
  py::array_t<double> out(in.N);
  double* out_ptr = out.mutable_data();
  // Safe: the caller keeps the GPU array and the mask alive; no Python API calls inside.
  const neuroadda::UncertaintyResult res = neuroadda_bindings::without_gil([&] {
    return neuroadda::tile_uncertainty_gpu_resident(in, static_cast<neuroadda::UncertaintyMeasure>(measure), out_ptr,
                                                    stream);
  });
  return {out, res.first_bad_tile};
}

}  // namespace

void register_uncertainty(py::module_& m) {
  m.def("tile_uncertainty", &tile_uncertainty_py, py::arg("probs"), py::arg("mc"), py::arg("mask"),
        py::arg("measure"), py::arg("use_cuda"),
        "Per-tile mean uncertainty; returns (values (N,) float64, first tile with invalid probabilities or -1).");
  m.def("tile_uncertainty_cuda_array", &tile_uncertainty_cuda_array_py, py::arg("ptr"), py::arg("shape"),
        py::arg("strides"), py::arg("mc"), py::arg("mask"), py::arg("measure"), py::arg("stream"),
        "tile_uncertainty for probabilities already in GPU memory (__cuda_array_interface__).");
  m.def("_fast_logf", [](float x) { return neuroadda::fast_logf(x); });
  m.def("_binary_entropy_f", [](float p) { return neuroadda::binary_entropy_f(p); });
}
