// Running kernels without the GIL.
//
// Exceptions thrown by a kernel are caught while the GIL is released and rethrown only after it
// is re-acquired, so C++ unwinding never crosses a GIL transition and pybind11 translates the
// error with the GIL held. (Unwinding through gil_scoped_release was seen to crash the
// interpreter on a GCC 13 / Python 3.12 build; this pattern is safe everywhere.)
#pragma once
#include <pybind11/pybind11.h>

#include <exception>
#include <optional>
#include <type_traits>
#include <utility>

namespace neuroadda_bindings {

// Call f() with the GIL released. f must touch no Python object: only raw buffers of arrays the
// calling frame keeps alive.
template <class F>
auto without_gil(F&& f) -> decltype(f()) {
  using R = decltype(f());
  std::exception_ptr error;
  if constexpr (std::is_void_v<R>) {
    {
      pybind11::gil_scoped_release release;
      try {
        f();
      } catch (...) {
        error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
  } else {
    std::optional<R> result;
    {
      pybind11::gil_scoped_release release;
      try {
        result.emplace(f());
      } catch (...) {
        error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return std::move(*result);
  }
}

}  // namespace neuroadda_bindings
