// The front end's only file that includes pybind11 (beside ../py_status.h): exposes Frontend as
// swapserve._frontend. Typed in src/swapserve/_frontend.pyi; imported only by swapserve.native.
//
// Conventions (the core's, see ../bindings.cc): arguments are converted with the GIL held; the
// GIL is released inside the body around work that may block (Start, a waiting Poll, Stop) or
// take a call's lock (Write, Read, Finish), kept for what takes microseconds and touches no
// contended lock for long (a look without waiting, Drain). A non-OK Status raises the
// swapserve.errors class of its code. Frontend owns threads: its destructor (which joins them)
// runs without the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "../core/py_status.h"
#include "frontend.h"

namespace py = pybind11;
using swapserve::Check;
using swapserve::Status;
using swapserve::frontend::Event;
using swapserve::frontend::EventKind;
using swapserve::frontend::Frontend;
using swapserve::frontend::PollResult;
using swapserve::frontend::TlsFiles;
using swapserve::frontend::WriteResult;

PYBIND11_MODULE(_frontend, m) {
  m.doc() = "Native gRPC front end (grpc++ generic async server); typed access through swapserve.native.";
  m.attr("MESSAGE") = static_cast<int>(EventKind::kMessage);
  m.attr("HALF_CLOSE") = static_cast<int>(EventKind::kHalfClose);
  m.attr("CANCELLED") = static_cast<int>(EventKind::kCancelled);
  m.attr("WRITABLE") = static_cast<int>(EventKind::kWritable);
  m.attr("WRITE_GONE") = static_cast<int>(WriteResult::kGone);
  m.attr("WRITE_QUEUED") = static_cast<int>(WriteResult::kQueued);
  m.attr("WRITE_FULL") = static_cast<int>(WriteResult::kFull);
  m.attr("POLL_OFF") = static_cast<int>(PollResult::kOff);
  m.attr("POLL_IDLE") = static_cast<int>(PollResult::kIdle);
  m.attr("POLL_PENDING") = static_cast<int>(PollResult::kPending);

  py::class_<Frontend>(m, "Frontend", py::release_gil_before_calling_cpp_dtor())
      .def(py::init([](std::string address, int max_message_bytes, std::string tls_key, std::string tls_cert,
                       std::string tls_ca) {
             std::unique_ptr<Frontend> f;
             Check(Frontend::Create(std::move(address), max_message_bytes, &f,
                                    TlsFiles{std::move(tls_key), std::move(tls_cert), std::move(tls_ca)}));
             return f;
           }),
           py::arg("address"), py::arg("max_message_bytes"), py::arg("tls_key") = "", py::arg("tls_cert") = "",
           py::arg("tls_ca") = "")
      .def("start",
           [](Frontend& f, bool polled) {
             int port = 0;
             Status st;
             {
               py::gil_scoped_release nogil;
               st = f.Start(polled, &port);
             }
             Check(st);
             return port;
           },
           py::arg("polled") = false)
      .def("poll",
           [](Frontend& f, double timeout_s) {
             // A look without waiting takes microseconds and touches no Python object: keep the
             // GIL, so a thread waiting for it (control-path work) does not get a turn every time
             // the busy event loop looks for new requests.
             if (timeout_s == 0) return static_cast<int>(f.Poll(0));
             py::gil_scoped_release nogil;
             return static_cast<int>(f.Poll(timeout_s));
           },
           py::arg("timeout_s"))
      .def("watch", [](Frontend& f, int fd) { Check(f.Watch(fd)); }, py::arg("fd"))
      .def("fileno", &Frontend::fd)
      .def("drain",
           [](Frontend& f) {
             std::vector<Event> events = f.Drain();  // a swap under a mutex: the GIL stays held
             py::list out(events.size());
             for (size_t i = 0; i < events.size(); ++i) {
               Event& e = events[i];
               out[i] = py::make_tuple(e.call, static_cast<int>(e.kind), py::str(e.method), py::bytes(e.payload),
                                       e.deadline_ns);
             }
             return out;
           })
      .def("call_info",
           [](Frontend& f, uint64_t id) -> py::object {
             std::string peer;
             std::vector<std::pair<std::string, std::string>> metadata;
             if (!f.CallInfo(id, &peer, &metadata)) return py::none();
             py::tuple md(metadata.size());
             for (size_t i = 0; i < metadata.size(); ++i)
               md[i] = py::make_tuple(py::str(metadata[i].first), py::str(metadata[i].second));
             return py::make_tuple(py::str(peer), md);
           },
           py::arg("id"))
      .def("auth_info",
           [](Frontend& f, uint64_t id) -> py::object {
             std::vector<std::pair<std::string, std::string>> properties;
             if (!f.AuthInfo(id, &properties)) return py::none();
             py::dict out;
             for (const auto& [name, value] : properties) {
               py::str key(name);
               if (!out.contains(key)) out[key] = py::list();
               out[key].cast<py::list>().append(py::bytes(value));
             }
             return out;
           },
           py::arg("id"))
      .def("write",
           [](Frontend& f, uint64_t id, const py::bytes& data) {
             std::string s = data;
             py::gil_scoped_release nogil;
             return static_cast<int>(f.Write(id, std::move(s)));
           },
           py::arg("id"), py::arg("data"))
      .def("read",
           [](Frontend& f, uint64_t id) {
             py::gil_scoped_release nogil;
             return f.Read(id);
           },
           py::arg("id"))
      .def("finish",
           [](Frontend& f, uint64_t id, int code, std::string details, std::optional<py::bytes> last) {
             std::optional<std::string> s;
             if (last) s = std::string(*last);
             py::gil_scoped_release nogil;
             return f.Finish(id, code, std::move(details), std::move(s));
           },
           py::arg("id"), py::arg("code"), py::arg("details"), py::arg("last") = py::none())
      .def("stop",
           [](Frontend& f, double grace_s) {
             py::gil_scoped_release nogil;
             f.Stop(grace_s);
           },
           py::arg("grace_s"));
}
