// Bindings for the QC descriptor kernels. Dtypes, shapes and contiguity are checked here (never
// converted silently) and every index is validated by the kernel before it reads.
#include "bindings/nogil.h"
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "common/check.h"
#include "ops/line_ridge.h"

namespace py = pybind11;

namespace {

template <class T>
const T* checked(const py::array& a, int ndim, const char* name, const char* dtype) {
  NEUROADDA_CHECK(a.dtype().is(py::dtype::of<T>()),
                  "expected " << dtype << " " << name << ", got dtype " << std::string(py::str(a.dtype())));
  NEUROADDA_CHECK(a.ndim() == ndim, "expected " << ndim << "-d " << name << ", got " << a.ndim() << " dims");
  NEUROADDA_CHECK(a.flags() & py::array::c_style, "expected C-contiguous " << name << ", got a strided view");
  return static_cast<const T*>(a.data());
}

py::array_t<float> line_ridge_py(const py::array& tiles, int64_t width, const py::array& shear_offsets,
                                 const py::array& lengths, const py::array& ridge_offsets) {
  neuroadda::LineRidgeInput in;
  in.tiles = checked<float>(tiles, 3, "tiles", "float32");
  in.offs = checked<int32_t>(shear_offsets, 2, "shear offsets", "int32");
  in.lens = checked<int32_t>(lengths, 1, "segment lengths", "int32");
  in.offsets = checked<int32_t>(ridge_offsets, 1, "ridge offsets", "int32");
  in.n = tiles.shape(0);
  in.h = tiles.shape(1);
  in.wp = tiles.shape(2);
  in.w = width;
  in.n_angles = shear_offsets.shape(0);
  in.n_offsets = ridge_offsets.shape(0);
  NEUROADDA_CHECK(shear_offsets.shape(1) == in.h, "expected shear offsets of shape (angles, " << in.h << "), got (" <<
                  shear_offsets.shape(0) << ", " << shear_offsets.shape(1) << ")");
  NEUROADDA_CHECK(lengths.shape(0) == in.n_angles, "expected " << in.n_angles << " segment lengths, got "
                                                               << lengths.shape(0));
  py::array_t<float> out(in.n);
  float* dst = out.mutable_data();
  // Safe: only raw pointers into arrays kept alive by this frame are used; no Python API calls.
  neuroadda_bindings::without_gil([&] { neuroadda::line_ridge(in, dst); });
  return out;
}

}  // namespace

void register_descriptors(py::module_& m) {
  m.def("_line_ridge", &line_ridge_py, py::arg("tiles"), py::arg("width"), py::arg("shear_offsets"),
        py::arg("lengths"), py::arg("ridge_offsets"),
        "Strongest straight dark ridge per column-padded tile (float32 (n,)); see csrc/ops/line_ridge.h.");
}
