// Placeholder: replaced by the uncertainty kernel bindings.
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_uncertainty(py::module_& m) { (void)m; }
