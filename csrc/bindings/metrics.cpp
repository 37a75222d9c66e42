// Bindings for ContingencyTable (variation of information, adapted Rand error).
#include "bindings/nogil.h"
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <vector>

#include "common/check.h"
#include "ops/contingency.h"

namespace py = pybind11;
using neuroadda::ContingencyTable;
using neuroadda::LabelType;
using neuroadda::LabelView;

namespace {

LabelView label_view(const py::array& a, const char* name) {
  const char kind = a.dtype().kind();
  const py::ssize_t size = a.itemsize();
  NEUROADDA_CHECK(kind == 'i' || kind == 'u' || kind == 'b',
                  "expected an integer " << name << " array, got dtype " << std::string(py::str(a.dtype())));
  LabelView v;
  v.data = a.data();
  const bool s = kind == 'i';
  switch (size) {
    case 1: v.type = s ? LabelType::I8 : LabelType::U8; break;  // bool reads as uint8 0/1
    case 2: v.type = s ? LabelType::I16 : LabelType::U16; break;
    case 4: v.type = s ? LabelType::I32 : LabelType::U32; break;
    case 8: v.type = s ? LabelType::I64 : LabelType::U64; break;
    default: NEUROADDA_CHECK(false, "expected a 1-, 2-, 4- or 8-byte integer " << name << ", got itemsize " << size);
  }
  for (int d = 0; d < a.ndim(); ++d) {
    NEUROADDA_CHECK(a.strides(d) % size == 0, "expected " << name << " strides aligned to its itemsize");
    v.shape.push_back(a.shape(d));
    v.strides.push_back(a.strides(d) / size);
  }
  return v;
}

void table_add(ContingencyTable& t, const py::array& seg, const py::array& gt) {
  LabelView s = label_view(seg, "seg"), g = label_view(gt, "gt");
  NEUROADDA_CHECK(s.shape == g.shape, "expected seg and gt of the same shape");
  // Safe: seg/gt stay referenced by the caller's frame; the table locks its own state.
  neuroadda_bindings::without_gil([&] { t.add(s, g); });
}

using U64Array = py::array_t<uint64_t, py::array::c_style>;

py::tuple table_entries(const ContingencyTable& t) {
  // The count can change between calls under concurrent adds; take both under one snapshot.
  ContingencyTable snap;
  snap.merge(t);
  const auto k = static_cast<py::ssize_t>(snap.n_pairs());
  U64Array seg(k), gt(k), n(k);
  snap.entries(seg.mutable_data(), gt.mutable_data(), n.mutable_data());
  return py::make_tuple(seg, gt, n);
}

void table_add_entries(ContingencyTable& t, const U64Array& seg, const U64Array& gt, const U64Array& n) {
  NEUROADDA_CHECK(seg.ndim() == 1 && gt.ndim() == 1 && n.ndim() == 1 && seg.size() == gt.size() &&
                      seg.size() == n.size(),
                  "expected three 1-d arrays of equal length");
  neuroadda_bindings::without_gil(
      [&] { t.add_entries(seg.data(), gt.data(), n.data(), static_cast<size_t>(seg.size())); });
}

}  // namespace

void register_metrics(py::module_& m) {
  py::class_<ContingencyTable>(m, "ContingencyTable")
      .def(py::init<>())
      .def("add", &table_add, py::arg("seg"), py::arg("gt"))
      .def(
          "merge",
          [](ContingencyTable& t, const ContingencyTable& o) {
            // Safe: both tables lock their own state.
            neuroadda_bindings::without_gil([&] { t.merge(o); });
          },
          py::arg("other"))
      .def("entries", &table_entries)
      .def("add_entries", &table_add_entries, py::arg("seg"), py::arg("gt"), py::arg("count"))
      .def_property_readonly("n_pairs", &ContingencyTable::n_pairs)
      .def_property_readonly("total", &ContingencyTable::total)
      .def_property_readonly("memory_bytes", &ContingencyTable::memory_bytes)
      .def(
          "variation_of_information",
          [](const ContingencyTable& t, const std::vector<uint64_t>& ignore_seg, const std::vector<uint64_t>& ignore_gt) {
            const auto r = neuroadda_bindings::without_gil(
                [&] { return t.variation_of_information(ignore_seg, ignore_gt); });
            return std::make_tuple(r.split_nats, r.merge_nats, r.n);
          },
          py::arg("ignore_seg"), py::arg("ignore_gt"))
      .def(
          "adapted_rand_error",
          [](const ContingencyTable& t, const std::vector<uint64_t>& ignore_gt, double alpha) {
            const auto r = neuroadda_bindings::without_gil([&] { return t.adapted_rand_error(ignore_gt, alpha); });
            return std::make_tuple(r.error, r.precision, r.recall, r.n);
          },
          py::arg("ignore_gt"), py::arg("alpha"));
}
