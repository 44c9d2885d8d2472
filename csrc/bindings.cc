// The only file that includes pybind11: exposes the native core as swapserve._native.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_native, m) {
  m.doc() = "swapserve native core: routing snapshots, router and batcher";
  m.attr("ABI_VERSION") = 1;
}
