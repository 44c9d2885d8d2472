// The core's only file that includes pybind11 (beside py_status.h): exposes the native core as swapserve._native.
//
// Conventions: arguments are converted with the GIL held; the GIL is released
// inside the body only around work that can block or scale with input size
// (NextBatch, route_batch, large input copies), never for a single route().
// A non-OK Status becomes the swapserve.errors class of the same code (Check/RaiseStatus,
// py_status.h: the one mapping, shared with the front end's bindings).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <charconv>
#include <thread>
#include <unordered_map>

#include "batcher.h"
#include "py_status.h"
#include "router.h"
#include "snapshot.h"
#include "status.h"

namespace py = pybind11;
using namespace swapserve;

namespace {

// Canonical key text (router.h): str -> UTF-8, bool -> true/false, int -> decimal,
// float -> float.__repr__. Anything else is refused. `what` names the value in errors
// and is only evaluated on error (this runs on every route()).
template <typename What>
Status Canonical(PyObject* v, const What& what, std::string* out) {
  if (PyBool_Check(v)) {
    *out = (v == Py_True) ? "true" : "false";
  } else if (PyLong_Check(v)) {
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (!overflow && !(x == -1 && PyErr_Occurred())) {
      char buf[24];
      auto res = std::to_chars(buf, buf + sizeof(buf), x);
      out->assign(buf, res.ptr);
    } else {
      PyErr_Clear();
      py::object s = py::reinterpret_steal<py::object>(PyNumber_ToBase(v, 10));
      if (!s) throw py::error_already_set();
      *out = py::cast<std::string>(s);
    }
  } else if (PyUnicode_Check(v)) {
    Py_ssize_t n = 0;
    const char* p = PyUnicode_AsUTF8AndSize(v, &n);
    if (p == nullptr) {
      PyErr_Clear();
      return Status::InvalidArgument(what() + " is a str that is not valid UTF-8 (lone surrogate?); send UTF-8 text");
    }
    out->assign(p, static_cast<size_t>(n));
  } else if (PyFloat_Check(v)) {
    py::object s = py::reinterpret_steal<py::object>(PyFloat_Type.tp_repr(v));
    if (!s) throw py::error_already_set();
    *out = py::cast<std::string>(s);
  } else {
    return Status::InvalidArgument(what() + " has type " + std::string(Py_TYPE(v)->tp_name) +
                                   "; use str, int, bool or float");
  }
  return Status::Ok();
}

// Interned Python str for an attribute name, cached (attribute names come from a few
// published specs). Guarded by the GIL; the cache and its strings live for the process.
py::object InternedName(const std::string& name) {
  static auto* cache = new std::unordered_map<std::string, PyObject*>();
  auto it = cache->find(name);
  if (it != cache->end()) return py::reinterpret_borrow<py::object>(it->second);
  PyObject* s = PyUnicode_FromStringAndSize(name.data(), static_cast<Py_ssize_t>(name.size()));
  if (s == nullptr) throw py::error_already_set();
  PyUnicode_InternInPlace(&s);
  if (cache->size() < 4096) {  // bounded; the cache keeps one reference for the process
    Py_INCREF(s);
    cache->emplace(name, s);
  }
  return py::reinterpret_steal<py::object>(s);
}

// Request attributes straight from a Python dict (looked up lazily: only the key
// attribute and cohort attributes are ever converted). GIL held by the caller.
class DictAttributes final : public AttributeSource {
 public:
  explicit DictAttributes(PyObject* dict) : dict_(dict) {}
  Status Get(const std::string& name, bool* found, std::string* canonical) const override {
    *found = false;
    if (dict_ == nullptr) return Status::Ok();
    PyObject* v = PyDict_GetItemWithError(dict_, InternedName(name).ptr());  // borrowed
    if (v == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      return Status::Ok();
    }
    *found = true;
    return Canonical(v, [&name] { return "attribute '" + name + "'"; }, canonical);
  }

 private:
  PyObject* dict_;  // borrowed, kept alive by the caller's argument
};

// route_fast(router_capsule, model, attributes: dict | None, request_id, route_type)
// -> route_type((version, shadows, generation)). A raw METH_FASTCALL function: this
// is the per-request path, and pybind11's generic dispatch costs more than the route.
PyObject* RouteFast(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  try {
    if (nargs != 5 || !PyUnicode_Check(args[1]) || !PyUnicode_Check(args[3]) ||
        !(args[2] == Py_None || PyDict_Check(args[2])) || !PyType_Check(args[4])) {
      PyErr_SetString(PyExc_TypeError, "route_fast(capsule, model: str, attributes: dict | None, request_id: str, type)");
      return nullptr;
    }
    auto* router = static_cast<const Router*>(PyCapsule_GetPointer(args[0], "swapserve.Router"));
    if (router == nullptr) return nullptr;
    Py_ssize_t n = 0;
    const char* p = PyUnicode_AsUTF8AndSize(args[1], &n);
    if (p == nullptr) return nullptr;
    std::string model(p, static_cast<size_t>(n));
    p = PyUnicode_AsUTF8AndSize(args[3], &n);
    if (p == nullptr) return nullptr;
    std::string_view request_id(p, static_cast<size_t>(n));
    DictAttributes source(args[2] == Py_None ? nullptr : args[2]);
    RouteResult res;
    Status st = router->Route(model, source, request_id, &res);
    if (!st.ok()) {
      SetStatusError(st);
      return nullptr;
    }
    PyObject* shadows = PyTuple_New(static_cast<Py_ssize_t>(res.shadows.size()));
    if (shadows == nullptr) return nullptr;
    for (size_t i = 0; i < res.shadows.size(); ++i)
      PyTuple_SET_ITEM(shadows, static_cast<Py_ssize_t>(i), PyLong_FromLongLong(res.shadows[i]));
    PyObject* items = PyTuple_Pack(3, py::int_(res.version).ptr(), shadows, py::int_(res.generation).ptr());
    Py_DECREF(shadows);
    if (items == nullptr) return nullptr;
    PyObject* wrapped = PyTuple_Pack(1, items);
    Py_DECREF(items);
    if (wrapped == nullptr) return nullptr;
    // tuple.__new__(route_type, items): route_type is a NamedTuple (a tuple subclass).
    PyObject* out = PyTuple_Type.tp_new(reinterpret_cast<PyTypeObject*>(args[4]), wrapped, nullptr);
    Py_DECREF(wrapped);
    return out;
  } catch (py::error_already_set& e) {
    e.restore();
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyMethodDef kRouteFastDef = {"route_fast", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(&RouteFast)),
                             METH_FASTCALL, "Router.route without pybind11 dispatch (see swapserve.native)."};

std::string CanonicalOrRaise(py::handle v, const char* what) {
  std::string s;
  Check(Canonical(v.ptr(), [what] { return std::string(what); }, &s));
  return s;
}

// Holds Py_buffer views of the submitted inputs for the duration of submit().
struct BufferViews {
  std::vector<Py_buffer> views;
  ~BufferViews() {
    for (Py_buffer& v : views) PyBuffer_Release(&v);
  }
};

ValueKind KindOf(py::handle v) {
  if (PyBool_Check(v.ptr())) return ValueKind::kBool;
  if (PyLong_Check(v.ptr())) return ValueKind::kInt;
  return ValueKind::kString;
}

py::object ValueFromKind(const std::string& text, ValueKind kind) {
  switch (kind) {
    case ValueKind::kBool: return py::bool_(text == "true");
    case ValueKind::kInt: return py::reinterpret_steal<py::object>(PyLong_FromString(text.c_str(), nullptr, 10));
    default: return py::str(text);
  }
}

// Bench: store -> visible latency on a bare SnapshotCell, and Router::Publish call
// -> visible through Router::Route. Each list holds one latency (ns) per trial.
std::pair<std::vector<int64_t>, std::vector<int64_t>> BenchPublishVisible(int trials) {
  struct Probe {
    uint64_t generation;
  };
  std::vector<int64_t> store_lat, publish_lat;
  {
    SnapshotCell<Probe> cell(std::make_unique<const Probe>(Probe{0}));
    std::atomic<bool> stop{false};
    std::atomic<uint64_t> seen{0};
    std::atomic<int64_t> seen_ns{0};
    std::thread reader([&] {
      uint64_t last = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        EpochDomain::ReadGuard guard;
        uint64_t g = cell.Load()->generation;
        if (g != last) {
          seen_ns.store(MonotonicNowNs(), std::memory_order_relaxed);
          seen.store(g, std::memory_order_release);
          last = g;
        }
      }
    });
    for (int t = 1; t <= trials; ++t) {
      auto next = std::make_unique<const Probe>(Probe{static_cast<uint64_t>(t)});
      int64_t t0 = MonotonicNowNs();
      cell.Publish(std::move(next));
      while (seen.load(std::memory_order_acquire) != static_cast<uint64_t>(t)) std::this_thread::yield();
      store_lat.push_back(seen_ns.load(std::memory_order_relaxed) - t0);
    }
    stop = true;
    reader.join();
  }
  {
    Router router;
    RoutingSpec spec;
    spec.generation = 1;
    spec.versions = {1, 2};
    spec.weights_bp = {5000, 5000};
    router.Publish("m", spec);
    std::atomic<bool> stop{false};
    std::atomic<uint64_t> seen{1};
    std::atomic<int64_t> seen_ns{0};
    std::thread reader([&] {
      VectorAttributes attrs;
      attrs.items.push_back({"routing_key", "user-1"});
      RouteResult r;
      uint64_t last = 1;
      while (!stop.load(std::memory_order_relaxed)) {
        router.Route("m", attrs, "", &r);
        if (r.generation != last) {
          seen_ns.store(MonotonicNowNs(), std::memory_order_relaxed);
          seen.store(r.generation, std::memory_order_release);
          last = r.generation;
        }
      }
    });
    for (int t = 2; t <= trials + 1; ++t) {
      spec.generation = static_cast<uint64_t>(t);
      int64_t t0 = MonotonicNowNs();
      router.Publish("m", spec);
      while (seen.load(std::memory_order_acquire) != static_cast<uint64_t>(t)) std::this_thread::yield();
      publish_lat.push_back(seen_ns.load(std::memory_order_relaxed) - t0);
    }
    stop = true;
    reader.join();
  }
  return {store_lat, publish_lat};
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "swapserve native core: routing snapshots, router and batcher (use swapserve.native)";
  m.attr("ABI_VERSION") = 2;

  m.def("hash64", [](py::handle key) { return Hash64(CanonicalOrRaise(key, "routing key")); },
        "mix64(fnv1a64(canonical bytes of key)); see csrc/core/router.h");
  m.def("bucket_of", [](py::handle key) { return BucketOf(CanonicalOrRaise(key, "routing key")); });
  m.def("canonical", [](py::handle key) { return py::bytes(CanonicalOrRaise(key, "routing key")); });
  m.def("atomics_lock_free", &EpochDomain::AtomicsAreLockFree);
  m.def("retired_pending", [] { return EpochDomain::Global().Collect(); },
        "Collect, then return how many retired snapshots still wait for readers.");

  py::class_<Router>(m, "Router")
      .def(py::init<>())
      .def("publish",
           [](Router& r, const std::string& model, uint64_t generation, std::vector<int64_t> versions,
              std::vector<int64_t> weights, std::vector<int64_t> shadows, py::list cohorts,
              std::string key_attribute) {
             RoutingSpec spec;
             spec.generation = generation;
             spec.versions = std::move(versions);
             spec.weights_bp = std::move(weights);
             spec.shadows = std::move(shadows);
             spec.key_attribute = std::move(key_attribute);
             for (py::handle item : cohorts) {
               auto t = py::reinterpret_borrow<py::tuple>(item);
               CohortRule rule;
               rule.attribute = t[0].cast<std::string>();
               if (PyFloat_Check(t[1].ptr()))
                 Check(Status::InvalidArgument("routing spec for model '" + model + "' is invalid: cohort rule on '" +
                                               rule.attribute + "' has a float value; write it as a str"));
               rule.value = CanonicalOrRaise(t[1], "cohort value");
               rule.kind = KindOf(t[1]);
               rule.version = t[2].cast<int64_t>();
               spec.cohorts.push_back(std::move(rule));
             }
             Check(r.Publish(model, std::move(spec)));
           })
      .def("remove",
           [](Router& r, const std::string& model) {
             bool removed = false;
             Check(r.Remove(model, &removed));
             return removed;
           })
      .def("route_batch",
           [](const Router& r, const std::string& model, py::iterable keys) {
             std::vector<std::string> canon;
             for (py::handle k : keys) canon.push_back(CanonicalOrRaise(k, "routing key"));
             std::vector<int64_t> out;
             Status st;
             {
               py::gil_scoped_release nogil;
               st = r.RouteKeys(model, canon, &out);
             }
             Check(st);
             return out;
           })
      .def("snapshot",
           [](const Router& r, const std::string& model) -> py::object {
             RoutingSpec spec;
             if (!r.Snapshot(model, &spec)) return py::none();
             py::list cohorts;
             for (const CohortRule& c : spec.cohorts)
               cohorts.append(py::make_tuple(c.attribute, ValueFromKind(c.value, c.kind), c.version));
             return py::make_tuple(spec.generation, spec.versions, spec.weights_bp, spec.shadows, cohorts,
                                   spec.key_attribute);
           })
      .def("models", &Router::Models)
      .def("capsule", [](Router& r) { return py::capsule(&r, "swapserve.Router"); },
           "Borrowed pointer for route_fast; valid only while this Router is alive.");
  m.add_object("route_fast",
               py::reinterpret_steal<py::object>(PyCFunction_NewEx(&kRouteFastDef, nullptr, m.ptr())));

  py::class_<Batcher>(m, "Batcher", py::release_gil_before_calling_cpp_dtor())
      .def(py::init([](int64_t max_batch_rows, std::vector<int64_t> preferred, int64_t max_queue_delay_us,
                       int64_t max_queue_size, int64_t max_queue_bytes, std::string name) {
             BatcherOptions o{max_batch_rows, std::move(preferred), max_queue_delay_us, max_queue_size,
                              max_queue_bytes, std::move(name)};
             std::unique_ptr<Batcher> b;
             Check(Batcher::Create(std::move(o), &b));
             return b;
           }),
           py::arg("max_batch_rows"), py::arg("preferred_batch_rows"), py::arg("max_queue_delay_us"),
           py::arg("max_queue_size"), py::arg("max_queue_bytes") = 0, py::arg("name") = "")
      .def("submit",
           [](Batcher& b, int64_t ticket, int64_t rows, py::sequence inputs, int64_t deadline_ns) {
             BufferViews held;
             held.views.reserve(inputs.size());
             std::vector<InputView> views;
             size_t total = 0;
             for (py::handle obj : inputs) {
               Py_buffer view;
               if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_C_CONTIGUOUS) != 0) {
                 PyErr_Clear();
                 Check(Status::InvalidArgument("input " + std::to_string(views.size()) + " of ticket " +
                                               std::to_string(ticket) +
                                               " is not a C-contiguous buffer; pass np.ascontiguousarray(x)"));
               }
               held.views.push_back(view);
               views.push_back({static_cast<const uint8_t*>(view.buf), static_cast<size_t>(view.len)});
               total += static_cast<size_t>(view.len);
             }
             Status st;
             if (total >= (1u << 18)) {  // large copies run without the GIL
               py::gil_scoped_release nogil;
               st = b.Submit(ticket, rows, views, deadline_ns);
             } else {
               st = b.Submit(ticket, rows, views, deadline_ns);
             }
             Check(st);
           },
           py::arg("ticket"), py::arg("rows"), py::arg("inputs"), py::arg("deadline_ns") = 0)
      .def("next_batch",
           [](Batcher& b, int64_t timeout_us) -> py::object {
             auto batch = std::make_unique<Batch>();
             bool got = false;
             {
               py::gil_scoped_release nogil;
               b.NextBatch(timeout_us, batch.get(), &got);
             }
             if (!got) return py::none();
             py::list inputs;
             for (size_t i = 0; i < batch->inputs.size(); ++i) {
               uint8_t* data = batch->inputs[i].release();
               py::capsule owner(data, [](void* p) { delete[] static_cast<uint8_t*>(p); });
               inputs.append(py::array_t<uint8_t>({static_cast<py::ssize_t>(batch->input_sizes[i])}, data, owner));
             }
             return py::make_tuple(batch->tickets, batch->rows, inputs, batch->queue_ns, batch->expired);
           },
           py::arg("timeout_us"))
      .def("close", &Batcher::Close)
      .def("pending", &Batcher::Pending)
      .def("stats", [](Batcher& b) {
        BatcherStats s = b.Stats();
        py::dict d;
        d["submitted"] = s.submitted;
        d["rejected_full"] = s.rejected_full;
        d["rejected_bytes"] = s.rejected_bytes;
        d["expired"] = s.expired;
        d["batches"] = s.batches;
        d["rows_histogram"] = s.rows_histogram;
        return d;
      });

  m.def("monotonic_ns", &MonotonicNowNs);
  m.def("bench_route",
        [](const Router& r, const std::string& model, py::iterable keys, int reps, int iters) {
          std::vector<VectorAttributes> attrs;
          for (py::handle k : keys) {
            VectorAttributes a;
            a.items.push_back({"routing_key", CanonicalOrRaise(k, "routing key")});
            attrs.push_back(std::move(a));
          }
          std::vector<double> per_call;
          Status st;
          {
            py::gil_scoped_release nogil;
            RouteResult res;
            int64_t sink = 0;
            for (int rep = 0; rep < reps && st.ok(); ++rep) {
              int64_t t0 = MonotonicNowNs();
              for (int it = 0; it < iters && st.ok(); ++it)
                for (const VectorAttributes& a : attrs) {
                  st = r.Route(model, a, "", &res);
                  sink += res.version;
                }
              int64_t dt = MonotonicNowNs() - t0;
              per_call.push_back(static_cast<double>(dt) / (static_cast<double>(iters) * attrs.size()));
            }
            asm volatile("" : : "r"(sink));
          }
          Check(st);
          return per_call;
        },
        "Per-call ns of Router::Route in a C++ loop (guard + lookup + hash), one value per rep.");
  m.def("bench_publish_visible",
        [](int trials) {
          py::gil_scoped_release nogil;
          return BenchPublishVisible(trials);
        },
        "(store->visible ns, publish-call->visible ns) per trial, spinning reader thread.");
}
