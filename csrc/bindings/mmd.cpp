// Bindings of the MMD² kernels (private; the checked public API is neuroadda_rt.mmd).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings/nogil.h"
#include "ops/mmd.h"

namespace py = pybind11;
using neuroadda::Device;
using neuroadda::MatView;

namespace {

// A float32 2-D array of any strides (C, Fortran, sliced, read-only) as a view; no copy.
MatView as_view(const py::array& a, const char* name) {
  if (!py::isinstance<py::array_t<float>>(a) || a.dtype().kind() != 'f' || a.itemsize() != 4)
    throw py::type_error(std::string("expected float32 for ") + name + ", got " +
                         py::str(a.dtype()).cast<std::string>());
  if (a.ndim() != 2)
    throw py::value_error(std::string("expected a 2-D array for ") + name + ", got ndim=" + std::to_string(a.ndim()));
  if (a.strides(0) % 4 != 0 || a.strides(1) % 4 != 0)
    throw py::value_error(std::string("expected strides that are multiples of 4 bytes for ") + name);
  return MatView{static_cast<const float*>(a.data()), a.shape(0), a.shape(1), a.strides(0) / 4, a.strides(1) / 4};
}

Device as_device(const std::string& d) {
  if (d == "cpu") return Device::CPU;
  if (d == "cuda") return Device::CUDA;
  throw py::value_error("expected device 'cpu' or 'cuda', got '" + d + "'");
}

// Kernel input errors (std::invalid_argument) reach Python as ValueError through pybind11's
// own translation; neuroadda_rt.mmd re-raises them as InputValueError.
template <class F>
auto call_kernel(F&& f) -> decltype(f()) {
  // Safe without the GIL: the kernels read only the buffers of arrays the caller keeps alive for
  // the duration of this call and touch no Python object.
  return neuroadda_bindings::without_gil(std::forward<F>(f));
}

}  // namespace

void register_mmd(py::module_& m) {
  m.def(
      "_mmd_sums",
      [](const py::array& x, const py::array& y, const std::vector<double>& sigmas, int blocks,
         const std::string& device) {
        const MatView xv = as_view(x, "x"), yv = as_view(y, "y");
        const Device dev = as_device(device);
        const auto s = call_kernel([&] { return neuroadda::mmd_sums(xv, yv, sigmas, blocks, dev); });
        return py::make_tuple(s.kxx, s.kyy, s.kxy);
      },
      py::arg("x"), py::arg("y"), py::arg("sigmas"), py::arg("blocks"), py::arg("device"),
      "Off-diagonal pair sums (kxx, kyy, kxy) of the requested blocks (mask: 1 xx, 2 yy, 4 xy).");
  m.def(
      "_mmd2",
      [](const py::array& x, const py::array& y, const std::vector<double>& sigmas, bool unbiased,
         const std::string& device) {
        const MatView xv = as_view(x, "x"), yv = as_view(y, "y");
        const Device dev = as_device(device);
        return call_kernel([&] { return neuroadda::mmd2(xv, yv, sigmas, unbiased, dev); });
      },
      py::arg("x"), py::arg("y"), py::arg("sigmas"), py::arg("unbiased"), py::arg("device"));
  m.def(
      "_median_sigma",
      [](const py::array& x, const py::array& y, int64_t max_points) {
        const MatView xv = as_view(x, "x"), yv = as_view(y, "y");
        return call_kernel([&] { return neuroadda::median_sigma(xv, yv, max_points); });
      },
      py::arg("x"), py::arg("y"), py::arg("max_points") = 2048);
  m.def(
      "_mmd2_permutation",
      [](const py::array& x, const py::array& y, const std::vector<double>& sigmas,
         const py::array_t<int64_t, py::array::c_style>& x_index, bool unbiased, const std::string& device) {
        const MatView xv = as_view(x, "x"), yv = as_view(y, "y");
        const Device dev = as_device(device);
        if (x_index.ndim() != 2 || x_index.shape(1) != xv.rows)
          throw py::value_error("expected x_index of shape (P, " + std::to_string(xv.rows) + ")");
        const int64_t P = x_index.shape(0);
        py::array_t<double> null(P);
        double* out = null.mutable_data();
        const int64_t* idx = x_index.data();
        const double obs = call_kernel(
            [&] { return neuroadda::mmd2_permutation(xv, yv, sigmas, idx, P, unbiased, out, dev); });
        return py::make_tuple(obs, null);
      },
      py::arg("x"), py::arg("y"), py::arg("sigmas"), py::arg("x_index"), py::arg("unbiased"), py::arg("device"));
  m.def(
      "_mmd2_from_sums",
      [](double kxx, double kyy, double kxy, double n, double m, bool unbiased) {
        return neuroadda::mmd2_from_sums(kxx, kyy, kxy, n, m, unbiased);
      },
      py::arg("kxx"), py::arg("kyy"), py::arg("kxy"), py::arg("n"), py::arg("m"), py::arg("unbiased"));
  m.def(
      "_gaussian_kernel",
      [](const py::array& x, const py::array& y, const std::vector<double>& sigmas) {
        const MatView xv = as_view(x, "x"), yv = as_view(y, "y");
        py::array_t<float> out({xv.rows, yv.rows});
        float* o = out.mutable_data();
        call_kernel([&] { neuroadda::gaussian_kernel_matrix(xv, yv, sigmas, o); });
        return out;
      },
      py::arg("x"), py::arg("y"), py::arg("sigmas"),
      "float32 (n, m) Gaussian kernel matrix k(x_i, y_j), mean over the bandwidths (CPU).");
  m.def(
      "_exp_nonpositive", [](float v) { return neuroadda::exp_nonpositive(v); }, py::arg("x"),
      "The float32 exp used by the kernel epilogues (exposed for tests).");
}
