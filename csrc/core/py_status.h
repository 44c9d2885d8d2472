// Status -> Python exception: the one mapping (see status.h), shared by the two extension
// modules' bindings (csrc/core/bindings.cc for _native, csrc/frontend/bindings.cc for _frontend).
// Only binding files include this header: it needs pybind11 and the GIL.
#pragma once

#include <pybind11/pybind11.h>

#include "status.h"

namespace swapserve {

// Sets the Python error to the swapserve.errors class of st's code. GIL held.
inline void SetStatusError(const Status& st) {
  const char* name = "SwapserveError";
  switch (st.code()) {
    case StatusCode::kInvalidArgument: name = "InvalidInput"; break;
    case StatusCode::kFailedPrecondition: name = "FailedPrecondition"; break;
    case StatusCode::kNotFound: name = "ModelNotFound"; break;
    case StatusCode::kResourceExhausted: name = "ResourceExhausted"; break;
    case StatusCode::kUnavailable: name = "VersionNotReady"; break;
    default: break;
  }
  PyObject* errors = PyImport_ImportModule("swapserve.errors");
  PyObject* cls = errors ? PyObject_GetAttrString(errors, name) : nullptr;
  Py_XDECREF(errors);
  if (cls == nullptr) return;  // the import error stays set
  PyObject* msg = PyUnicode_DecodeUTF8(st.message().data(), static_cast<Py_ssize_t>(st.message().size()), "replace");
  PyErr_SetObject(cls, msg);
  Py_XDECREF(msg);
  Py_DECREF(cls);
}

[[noreturn]] inline void RaiseStatus(const Status& st) {
  SetStatusError(st);
  throw pybind11::error_already_set();
}

// Raise st (GIL held) unless it is OK.
inline void Check(const Status& st) {
  if (!st.ok()) RaiseStatus(st);
}

}  // namespace swapserve
